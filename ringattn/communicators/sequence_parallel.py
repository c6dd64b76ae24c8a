"""What the all-gather and ring communicators share: rank arithmetic, chunk compute, byte counts.

A segment spanning ``g`` ranks is split into ``g`` chunks, one per rank; rank ``t`` (its place in
the segment) holds the queries of chunk ``t`` and must see the selected keys of chunks ``0..t``
when causal (``t`` itself causally, earlier ones fully, later ones not at all — skipped, never
computed and masked), or all chunks otherwise. Only the selected (dilated) rows travel: a chunk is
``[b, m/r, heads, d]`` for K and for V.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ringattn import distributed
from ringattn.communicators.base import Communicator
from ringattn.computers.base import BlockComputer, Rows, RowsLSE, accumulation_dtype
from ringattn.memory.base import MemoryManager
from ringattn.memory.none import NoReuse
from ringattn.merge import merge_into_


class SequenceParallel(Communicator):
    distributed = True

    def __init__(self, group: dist.ProcessGroup | None = None, memory: MemoryManager | None = None):
        self.group = distributed.resolve_group(group)
        self.ranks = dist.get_process_group_ranks(self.group)
        self.world_size = len(self.ranks)
        self.rank = dist.get_rank(self.group)
        self.memory = memory or NoReuse()
        self.bytes_sent = 0

    def place(self, span: int) -> tuple[int, list[int]]:
        """This rank's index in its segment and the global ranks of that segment, in order."""
        t = self.rank % span
        start = self.rank - t
        return t, self.ranks[start : start + span]

    def needed(self, chunk: int, t: int, causal: bool) -> bool:
        return not causal or chunk < t

    def count(self, *tensors: Tensor, times: int = 1) -> None:
        self.bytes_sent += times * sum(x.numel() * x.element_size() for x in tensors)

    @staticmethod
    def merge_chunk(out: Tensor, lse: Tensor, out_c: Tensor, lse_c: Tensor) -> None:
        merge_into_(out, lse, out_c, lse_c)

    def own_chunk(self, computer: BlockComputer, q, k, v, causal, scale) -> tuple[Tensor, Tensor]:
        out, lse = computer.forward(q, k, v, causal, scale)
        acc = accumulation_dtype(q.dtype)
        return out.to(acc), lse.to(acc)


def stack_kv(k: Rows, v: Rows) -> Tensor:
    """One contiguous ``[2, B, L, H, d]`` buffer so K and V travel in one message."""
    return torch.stack((k, v)).contiguous()


__all__ = ["RowsLSE", "SequenceParallel", "stack_kv"]
