"""What the all-gather and ring communicators share: rank arithmetic, chunk compute, byte counts.

A segment spanning ``g`` ranks is split into ``g`` shards, one per rank; rank ``t`` (its place in
the segment) holds the queries of shard ``t`` and must see the selected keys of every shard that
precedes them. ``layout="contiguous"``: shard ``t`` is chunk ``t``; when causal it sees shards
``0..t`` (``t`` itself causally, earlier ones fully, later ones not at all — skipped, never computed
and masked), otherwise all. ``layout="zigzag"`` (the segment is the whole sequence, ``g = p``):
shard ``t`` is chunks ``t`` and ``2p-1-t``, so when causal every other shard is half seen
(``piece``) and every rank does the same work. Only the selected (dilated) rows travel: a shard is
``[b, m/r, heads, d]`` for K and for V.
"""

from __future__ import annotations

from abc import abstractmethod
from copy import deepcopy

import torch
import torch.distributed as dist
from torch import Tensor

from ringattn import distributed
from ringattn.communicators.base import Communicator
from ringattn.computers.base import BlockComputer, Rows, RowsLSE, accumulation_dtype
from ringattn.memory.base import MemoryManager
from ringattn.memory.none import NoReuse


class SequenceParallel(Communicator):
    distributed = True

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        memory: MemoryManager | None = None,
        layout: str = "contiguous",
    ):
        distributed.check_layout(layout)
        self.layout = layout
        self.group = distributed.resolve_group(group)
        self.world_default = group is None  # (a destroyed world is told apart from a new one)
        self.ranks = dist.get_process_group_ranks(self.group)
        self.world_size = len(self.ranks)
        self.rank = dist.get_rank(self.group)
        self.memory = memory or NoReuse()
        self.bytes_sent = 0

    def __deepcopy__(self, memo: dict[int, object]) -> SequenceParallel:
        """A copy over the same process group (a handle on this process's communicator, which
        cannot be copied: deepcopy of a sequence-parallel module, e.g. an EMA model, raised
        "cannot pickle 'ProcessGroup' object")."""
        copy = self.__class__.__new__(self.__class__)
        memo[id(self)] = copy
        for key, value in self.__dict__.items():
            setattr(copy, key, value if key == "group" else deepcopy(value, memo))
        return copy

    def __getstate__(self) -> dict[str, object]:
        """Pickled over the world group only, which the loading process resolves again (as its
        ``init_process_group`` made it); a sub-group cannot be named in another process."""
        if self.group is not dist.group.WORLD:
            raise TypeError(
                "a sequence-parallel module over a sub-group cannot be pickled (another process "
                "cannot name the group): save its state_dict and build the module there"
            )
        state = self.__dict__.copy()
        state["group"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.group = distributed.resolve_group(None)
        # this process's place in the world, not the pickling process's: a module saved by
        # rank 0 and loaded everywhere had every rank call itself rank 0 (gloo: "Pair is not
        # connected"; its agreement saw equal signatures, so it could not tell)
        self.ranks = dist.get_process_group_ranks(self.group)
        self.world_size = len(self.ranks)
        self.rank = dist.get_rank(self.group)

    def check_group(self) -> None:
        """A ValueError where this communicator's process group, the world or a sub-group, was
        destroyed (torch's own error named the group object "not initialized in the world group
        map")."""
        if (
            not dist.is_initialized()
            or (self.world_default and self.group is not dist.group.WORLD)
            or not distributed.is_live(self.group)
        ):
            raise ValueError(
                "this sequence-parallel module's process group was destroyed "
                "(torch.distributed.destroy_process_group): build the module again over a live "
                "group (init_process_group, new_group; its state_dict carries the weights of a "
                "layer over)"
            )

    def place(self, span: int) -> tuple[int, list[int]]:
        """This rank's index in its segment and the global ranks of that segment, in order."""
        t = self.rank % span
        start = self.rank - t
        return t, self.ranks[start : start + span]

    def piece(self, t: int, other: int, causal: bool, rows: int) -> tuple[slice, slice] | None:
        return piece(self.layout, t, other, causal, rows)

    def count(self, *tensors: Tensor, times: int = 1) -> None:
        self.bytes_sent += times * sum(x.numel() * x.element_size() for x in tensors)

    def attend(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        span: int = 1,
    ) -> tuple[Rows, RowsLSE]:
        if span == 1:
            return computer.forward(q, k, v, causal, scale)
        return self._attend(computer, q, k, v, causal, scale, span, None)

    def attend_into(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        span: int,
        out: Rows,
        lse: RowsLSE | None,
    ) -> None:
        """A placed block whose keys travel. Where ``out`` has the accumulation dtype (float32,
        float64): its own shard written straight into ``out`` / ``lse`` (views of the core's
        tensors) and the other shards merged into them there, with no accumulator to copy back
        (four kernels fewer per call: two conversions, two copies). In bf16 / fp16 the shards
        merge in float32 accumulators, as merged (``lse``) blocks' do, and ``out`` rounds once:
        merged into the bf16 rows themselves, each of the ``span`` shards' merges rounded them,
        and the output's error against the float64 oracle grew with the ranks a segment spans
        (one segment over every rank, n = 1024: 1.2x / 1.6x / 2.1x one device's error at p =
        2 / 4 / 8 with ``math``'s float32 partials, 1.2x / 1.5x / 1.8x with ``sdpa``'s bf16 ones;
        1.0x / 1.0x / 1.0x and 1.2x / 1.2x / 1.2x in float32). The kernels that path saves did
        not move a host-bound call (docs/benchmarks/h200_perf.md, step 27)."""
        stats = accumulation_dtype(q.dtype)
        if span == 1 or out.dtype != stats:  # (the base's: in place, or accumulated and placed)
            super().attend_into(computer, q, k, v, causal, scale, span, out, lse)
            return
        if lse is None:  # the merges need it even where the caller does not
            lse = self.memory.scratch("placed_lse", tuple(q.shape[:3]), stats, q.device)
        self._attend(computer, q, k, v, causal, scale, span, (out, lse))

    @abstractmethod
    def _attend(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        span: int,
        into: tuple[Rows, RowsLSE] | None,
    ) -> tuple[Rows, RowsLSE]:
        """:meth:`attend` of a block whose segments span ``span > 1`` ranks, merged into
        ``into`` where given (:meth:`own_chunk`)."""

    def own_chunk(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        into: tuple[Rows, RowsLSE] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """This rank's own shard attended: written into ``into`` (a placed block's rows) where
        given, else as the float32 accumulators the other shards merge into."""
        if into is not None:
            computer.forward_into(q, k, v, causal, scale, *into)
            return into
        out, lse = computer.forward(q, k, v, causal, scale)
        acc = accumulation_dtype(q.dtype)
        return out.to(acc), lse.to(acc)


ALL = slice(None)


def piece(layout: str, t: int, other: int, causal: bool, rows: int) -> tuple[slice, slice] | None:
    """Which of rank ``t``'s query rows see which key rows of shard ``other`` (``!= t``) of a
    segment, each shard holding ``rows`` selected rows; ``None``: none see any. (Its own shard
    it attends causally or fully, as one call.) ``docs/img/zigzag.png`` draws it."""
    if not causal:
        return ALL, ALL
    if layout == "contiguous":
        return (ALL, ALL) if other < t else None
    head, tail = slice(0, rows // 2), slice(rows // 2, None)
    # shard t = chunks (t, 2p-1-t); shard other = chunks (other, 2p-1-other)
    if other < t:  # both of our chunks follow chunk `other`; its tail chunk follows both
        return ALL, head
    return tail, ALL  # only our tail chunk follows theirs, and it follows both


def causal_owners(n: int, p: int, layout: str) -> Tensor:
    """``[n, n]``: the rank that computes each (query, key) pair of dense causal attention over
    ``p`` ranks (-1: masked), following the schedule above: own shard causally, ``piece`` of
    every other. Tests hold it to the causal mask; ``docs/img/zigzag.png`` draws it."""
    m = n // p
    owner = torch.full((n, n), -1)
    held = [distributed.positions(m, rank, p, layout) for rank in range(p)]
    for t, rows in enumerate(held):
        owner[rows[:, None], rows[None, :]] = torch.where(rows[:, None] >= rows[None, :], t, -1)
        for other in range(p):
            live = None if other == t else piece(layout, t, other, True, m)
            if live is not None:
                owner[rows[live[0]][:, None], held[other][live[1]][None, :]] = t
    return owner


def stack_kv(k: Rows, v: Rows) -> Tensor:
    """One contiguous ``[2, B, L, H, d]`` buffer so K and V travel in one message."""
    return torch.stack((k, v)).contiguous()


__all__ = ["RowsLSE", "SequenceParallel", "causal_owners", "piece", "stack_kv"]
