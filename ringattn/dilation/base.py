"""DilationProcessor: how a block's dilated rows are laid out for the attention computer.

``read(x, block, index)`` turns ``x: [b, n, h, d]`` (or an LSE ``[b, n, h]``) into the block's
``[b * segments, length, heads, ...]`` problem batch. ``indices(plan, device, memory)`` runs
eagerly, outside the compiled core, and returns the index tensors ``read`` needs (one per block,
or an empty tuple): the memory manager decides whether they are cached.

Results are always written back through :meth:`ringattn.pattern.Block.rows`, a strided view of the
``[b, n, h, ...]`` accumulators, so both layouts share one output path.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from ringattn.component import Component
from ringattn.memory.base import MemoryManager
from ringattn.pattern import Block, Geometry, OffsetRun, Plan


class DilationProcessor(Component):
    def indices(
        self, plan: Plan, device: torch.device, memory: MemoryManager
    ) -> tuple[Tensor, ...]:
        return ()

    @abstractmethod
    def read(self, x: Tensor, block: Block, index: Tensor | None) -> Tensor: ...

    def geometry(
        self, block: Block | OffsetRun, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> Geometry | None:
        """Where :meth:`read` returns a view of ``x`` (of this shape and stride), its geometry
        (``ringattn.pattern.Geometry``), so the eager core can prepare it once per layout
        (``ringattn.launches``); None where ``read`` gathers or copies."""
        return None
