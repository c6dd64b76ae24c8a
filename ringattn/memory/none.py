"""``none``: no reuse. Every pattern is rebuilt and every buffer freshly allocated, each call."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from ringattn.memory.base import MemoryManager, T
from ringattn.registry import register


@register("memory", "none")
class NoReuse(MemoryManager):
    """``none``: every pattern built and every buffer allocated afresh, in each call."""

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        return build()

    def scratch(
        self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=device)
