"""The dilation pattern as plain integers: which rows and heads each piece of work covers.

A *job* is one config ``(w, r)`` with one row offset and the heads that use it. A *block* is the
part of a job that one batched attention call computes: either all full segments at once (each
contributes ``w // r`` equally spaced rows) or the partial tail segment. Everything here depends on
``(n, h, configs, mixing)`` only, is computed once per shape (memoised) and is free of
tensors, so the compiled core sees it as constants.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ringattn.capture import compiling
from ringattn.lru import remember

# Each kernel call allocates block-sized temporaries next to the full [b, n, h, d] accumulators:
# its output and LSE in the forward; in the backward its three gradients and cuDNN's float32 dq
# workspace (about five block-sized tensors for the r = 1 block). Cutting a block into parts
# that each cover at most 1/BLOCK_SPLIT of the (row, head) pairs bounds that transient (H200, issue
# 5's shape: forward+backward peak 1.26x -> 1.13x of q, k, v, out and their gradients, 1.10x with
# strided dout/out in the cuDNN backward; experiments/overheads.py).
BLOCK_SPLIT = 8

# a view's (size, stride, storage offset relative to its base) for ``Tensor.as_strided``
Geometry = tuple[tuple[int, ...], tuple[int, ...], int]


@dataclass(frozen=True)
class Job:
    config: int  # index i of (w_i, r_i)
    w: int
    r: int
    offset: int  # selected rows satisfy ((p mod w) - offset) mod r == 0
    head_start: int
    head_stop: int
    head_step: int

    @property
    def heads(self) -> slice:
        return slice(self.head_start, self.head_stop, self.head_step)

    @property
    def num_heads(self) -> int:
        return len(range(self.head_start, self.head_stop, self.head_step))


@dataclass(frozen=True)
class Block:
    """``segments`` segments of ``length`` selected rows each, starting at position ``start``."""

    job: Job
    start: int
    segments: int
    length: int
    tail: bool

    def rows(self, x: Tensor) -> Tensor:
        """Strided view ``[b, segments, length, heads, ...]`` of ``x: [b, n, h, ...]``.

        Never copies: segment-local dilation is a reshape plus two strided slices (rows and heads).
        Eagerly that view is made in one ``as_strided`` call: the core makes ~5 views per kernel
        call, and the three-op slicing chain (~25 µs of host time each) kept short sequences
        launch-bound. Traced code keeps the slicing chain, which Dynamo and functionalization read
        as plain views (``tests/test_pattern.py`` holds the two to the same view).
        """
        if not compiling():
            return self._rows_strided(x)
        return self._rows_sliced(x)

    def _rows_strided(self, x: Tensor) -> Tensor:
        size, stride, offset = self.rows_geometry(x.shape, x.stride())
        return x.as_strided(size, stride, x.storage_offset() + offset)

    def rows_geometry(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> Geometry:
        """``(size, stride, offset)`` of :meth:`rows` as a view of an ``x`` with this ``shape``
        and ``stride`` (offset relative to ``x``'s own). Integers only: the eager core computes
        it once per layout and then makes each view with one ``as_strided``."""
        job = self.job
        stride_b, stride_n, stride_h, *stride_rest = stride
        return (
            (shape[0], self.segments, self.length, job.num_heads, *shape[3:]),
            (stride_b, job.w * stride_n, job.r * stride_n, job.head_step * stride_h, *stride_rest),
            (self.start + job.offset) * stride_n + job.head_start * stride_h,
        )

    def flat_geometry(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> Geometry | None:
        """The geometry of ``rows(x).flatten(0, 1)`` (:meth:`rows_geometry`), or None where
        merging the batch and segment dims would copy (:func:`ringattn.core.flat_view`'s rule)."""
        return _flat(self.rows_geometry(shape, stride))

    def _rows_sliced(self, x: Tensor) -> Tensor:
        job = self.job
        if self.tail:
            return x[:, self.start + job.offset :: job.r, job.heads].unsqueeze(1)
        seg: Tensor = x[:, self.start : self.start + self.segments * job.w].unflatten(
            1, (self.segments, job.w)
        )
        return seg[:, :, job.offset :: job.r, job.heads]

    def cut(self, n: int, h: int, split: int) -> tuple[Block, ...]:
        """This block cut into parts of at most ``n * h / split`` (row, head) pairs.

        By segments where it has enough of them: a part then writes whole rows of its heads, so
        for a block of every head (``r = 1`` under ``lse``) each part's gradients land in one
        contiguous slab (H200: copies into place ~3x faster than into a head slice). Else by
        heads (the tail, or fewer segments than heads). A part of one segment or one head is
        not cut further."""
        job, heads = self.job, self.job.num_heads
        parts = parts_for(self.segments * self.length * heads, n, h, split)
        if parts <= 1:
            return (self,)
        if not self.tail and self.segments > 1 and self.segments >= min(parts, heads):
            parts = min(parts, self.segments)
            bounds = [self.segments * c // parts for c in range(parts + 1)]
            return tuple(
                replace(self, start=self.start + lo * job.w, segments=hi - lo)
                for lo, hi in itertools.pairwise(bounds)
            )
        # as many heads per part as the bound allows (whole heads: an even cut of 5 heads into
        # the 4 parts the pair count asks for put 2 heads, 1.6x the bound, in one of them)
        per_part = max(1, n * h // (split * self.segments * self.length))
        parts = -(-heads // per_part)
        if parts <= 1:
            return (self,)
        bounds = [job.head_start + job.head_step * (heads * c // parts) for c in range(parts + 1)]
        return tuple(
            replace(self, job=replace(job, head_start=lo, head_stop=hi))
            for lo, hi in itertools.pairwise(bounds)
        )

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """Sequence positions of the rows, ``[segments * length]``, segment-major."""
        job = self.job
        if self.tail:
            return torch.arange(
                self.start + job.offset,
                self.start + job.offset + self.length * job.r,
                job.r,
                device=device,
            )
        seg_starts = torch.arange(self.segments, device=device) * job.w + self.start
        in_seg = torch.arange(job.offset, job.w, job.r, device=device)
        return (seg_starts[:, None] + in_seg[None, :]).flatten()


def parts_for(pairs: int, n: int, h: int, split: int) -> int:
    """How many kernel calls a problem of ``pairs`` (row, head) pairs takes when each call may
    cover at most ``n * h / split`` of them (``BLOCK_SPLIT``'s bound on transients)."""
    return -(-pairs * split // (n * h))


def _flat(geometry: Geometry) -> Geometry | None:
    """A ``[b, S, L, ...]`` geometry as ``[b * S, L, ...]``, or None where that is not one view."""
    (b, segments, *size), (stride_b, stride_segment, *stride_rest), offset = geometry
    if b == 1 or (segments > 1 and stride_b == segments * stride_segment):
        stride_batch = stride_segment
    elif segments == 1:
        stride_batch = stride_b
    else:
        return None
    return (b * segments, *size), (stride_batch, *stride_rest), offset


@dataclass(frozen=True)
class OffsetRun:
    """One config's offsets ``0..R-1`` under ``lse``, as one problem: for each offset ``o`` its
    ``index``-th head, ``o + index * r``, over the config's full segments (or its tail segment).

    Row ``o`` of a segment's dilated grid sits ``o`` rows and (its head) ``o`` heads after row
    ``0``, so the R offsets line up along one stride, ``stride_n + stride_h``: the run is a plain
    strided view whose *head* dim walks the offsets, and ``K = heads per offset`` runs replace the
    config's ``R`` kernel calls and merges (``R = 16, K = 1`` for issue 5's ``r = 16`` at 16 heads).
    It has a :class:`Block`'s geometry methods, which is all prepared launches use
    (``ringattn.launches``); the general path keeps the blocks.
    """

    first: Block  # offset 0's block (full segments or the tail)
    offsets: int
    index: int

    def rows_geometry(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> Geometry:
        size, steps, offset = self.first.rows_geometry(shape, stride)
        # offset 0's view with its head dim replaced by the walk over the offsets
        return (
            (*size[:3], self.offsets, *size[4:]),
            (*steps[:3], stride[1] + stride[2], *steps[4:]),
            offset + self.index * self.first.job.r * stride[2],
        )

    def flat_geometry(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> Geometry | None:
        return _flat(self.rows_geometry(shape, stride))


Runs = tuple[tuple[tuple[int, ...], tuple[OffsetRun, ...]], ...]


def offset_runs(plan: Plan, split: int) -> Runs:
    """``(block indices, runs)`` for each config of an ``lse`` plan whose blocks can be computed as
    :class:`OffsetRun` s: its full-segment blocks, and apart from them its tail blocks (the
    partial last segment, or the whole sequence where ``w > n``). A group qualifies where every
    offset has a block of one part and equally many heads (``r >= h`` or ``r | h``) and rows,
    there are fewer runs than offsets, and a run is no larger than the block parts ``split``
    allows (its transients stay bounded like theirs)."""
    if plan.mixing != "lse":
        return ()
    groups = []
    for (config, (_, r)), tail in itertools.product(enumerate(plan.configs), (False, True)):
        members = [
            i
            for i, block in enumerate(plan.blocks)
            if block.job.config == config and block.tail == tail
        ]
        offsets = min(r, plan.h)
        heads = len(range(0, plan.h, r))
        if len(members) != offsets or heads >= offsets:
            continue
        blocks = [plan.blocks[i] for i in members]
        first = blocks[0]
        if any(
            len(plan.parts[i]) != 1
            or block.job.num_heads != heads
            or block.job.offset != o
            or block.length != first.length  # tails: offsets past the last row have fewer
            for o, (i, block) in enumerate(zip(members, blocks))
        ):
            continue
        if parts_for(first.segments * first.length * offsets, plan.n, plan.h, split) > 1:
            continue
        runs = tuple(OffsetRun(first, offsets, index) for index in range(heads))
        groups.append((tuple(members), runs))
    return tuple(groups)


@dataclass(frozen=True)
class Plan:
    n: int
    h: int
    configs: tuple[tuple[int, int], ...]
    mixing: str
    blocks: tuple[Block, ...]
    # True when every (row, head) is written by at most one block ("head_groups"), so results are
    # placed into their rows instead of LSE-merged.
    disjoint: bool
    # parts[i]: blocks[i] cut (by segments, else heads) into kernel calls of bounded size
    # (BLOCK_SPLIT)
    parts: tuple[tuple[Block, ...], ...]
    # the BLOCK_SPLIT those parts were cut with: a module's plan outlives a change of it, which
    # must then make a new one (DilatedAttention's specs) and cut everything else alike
    split: int
    # disjoint plans: each head's (rates, offsets), row p of head j written iff p % rates[j] ==
    # offsets[j] (offset -1: a head no block writes); the rest stays 0. None for "lse"
    selection: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def head_offsets(self) -> tuple[tuple[int, ...], ...]:
        """``offsets[i][head]``: the row offset ``head`` uses in config ``i``, or -1 if none."""
        table = [[-1] * self.h for _ in self.configs]
        for job in jobs_for(self.h, self.configs, self.mixing):
            for head in range(job.head_start, job.head_stop, job.head_step):
                table[job.config][head] = job.offset
        return tuple(tuple(row) for row in table)


def head_groups(h: int, k: int) -> tuple[tuple[int, int], ...]:
    """``k`` contiguous head ranges, the first ``h mod k`` one head larger (some may be empty)."""
    base, extra = h // k, h % k  # (not divmod: Dynamo cannot trace it on a symbolic h)
    out, start = [], 0
    for g in range(k):
        size = base + (1 if g < extra else 0)
        out.append((start, start + size))
        start += size
    return tuple(out)


def jobs_for(h: int, configs: tuple[tuple[int, int], ...], mixing: str) -> tuple[Job, ...]:
    jobs: list[Job] = []
    if mixing == "lse":
        # off = hd mod r, so the heads sharing offset o are exactly o, o + r, o + 2r, ...
        for i, (w, r) in enumerate(configs):
            for o in range(min(r, h)):
                jobs.append(Job(i, w, r, o, o, h, r))
    elif mixing == "head_groups":
        for g, ((w, r), (lo, hi)) in enumerate(zip(configs, head_groups(h, len(configs)))):
            if hi > lo:
                jobs.append(Job(g, w, r, g % r, lo, hi, 1))
    else:  # validated earlier; kept for a clear message if called directly
        raise ValueError(f"unknown mixing {mixing!r}")
    return tuple(jobs)


_PLANS: dict[tuple[int, int, tuple[tuple[int, int], ...], str, int], Plan] = {}
_MAX_PLANS = 256


def make_plan(n: int, h: int, configs: tuple[tuple[int, int], ...], mixing: str) -> Plan:
    """The plan for one shape, memoised (a plain dict, which Dynamo can trace through). A trace
    builds its own: its guard on the dict's contents failed once the opaque ops' eager side
    added the plan at run time (one recompile of every model compiled before an eager call)."""
    key = (n, h, configs, mixing, BLOCK_SPLIT)
    if compiling():
        return _build_plan(n, h, configs, mixing, BLOCK_SPLIT)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(n, h, configs, mixing, BLOCK_SPLIT)
        remember(_PLANS, key, plan, _MAX_PLANS)  # bounded: the oldest dropped
    return plan


def _build_plan(
    n: int, h: int, configs: tuple[tuple[int, int], ...], mixing: str, split: int
) -> Plan:
    blocks: list[Block] = []
    for job in jobs_for(h, configs, mixing):
        full = n // job.w
        if full:
            blocks.append(Block(job, 0, full, job.w // job.r, tail=False))
        tail_len = n - full * job.w
        tail_rows = len(range(job.offset, tail_len, job.r))
        if tail_rows:
            blocks.append(Block(job, full * job.w, 1, tail_rows, tail=True))
    parts = tuple(block.cut(n, h, split) for block in blocks)
    disjoint = mixing == "head_groups"
    selection = None
    if disjoint:  # r divides w, so the definition's ((p mod w) - o) mod r == 0 is p mod r == o
        rates, offsets = [1] * h, [-1] * h
        for job in jobs_for(h, configs, mixing):
            for head in range(job.head_start, job.head_stop, job.head_step):
                rates[head], offsets[head] = job.r, job.offset
        selection = (tuple(rates), tuple(offsets))
    return Plan(n, h, configs, mixing, tuple(blocks), disjoint, parts, split, selection)
