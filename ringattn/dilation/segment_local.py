"""``segment_local``: each segment's dilated rows as strided views, no index tensors, no copy
where ``w`` divides ``n`` or ``b == 1``.

``x[:, :S*w].unflatten(1, (S, w))[:, :, offset::r, heads]`` is the whole block. Merging the batch
and segment dims is free whenever ``n`` is a multiple of ``w`` (or ``b == 1``); otherwise
``flatten`` has to copy, which is the only copy this layout ever makes.
"""

from __future__ import annotations

from torch import Tensor

from ringattn.dilation.base import DilationProcessor
from ringattn.pattern import Block, Geometry, OffsetRun
from ringattn.registry import register


@register("dilation", "segment_local")
class SegmentLocalDilation(DilationProcessor):
    """``segment_local``: each block's rows as a strided view of the inputs, with no index
    tensors (this module's docstring says when merging its batch dims copies)."""

    def read(self, x: Tensor, block: Block, index: Tensor | None) -> Tensor:
        return block.rows(x).flatten(0, 1)

    def geometry(
        self, block: Block | OffsetRun, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> Geometry | None:
        return block.flat_geometry(shape, stride)
