"""Prepared launches: the eager core's host work per block cut to views and one call.

Why: at 32K tokens an H200 finishes a ``head_groups`` forward in ~0.45 ms of GPU time, while the
host took 1.1–1.5 ms to issue it (``docs/benchmarks/h200_perf.md``, step 13): ~900 Python calls
per forward, ~150 per kernel call, spread over the views of five operands (dilation processor,
``Block.rows``, flatten), the communicator, the computer's checks and the cuDNN frontend's graph
lookup. For a block that stays on this device, all of that depends only on the *layouts* of the
core's tensors (shape, strides, dtype, device), never on their data.

So the first call with given layouts prepares, for every block part, the geometry of each
operand's view (size, strides, offset from the tensor's own: ``ringattn.pattern.Geometry``) and
a *launcher* for those layouts: for a placed block the computer's
(``BlockComputer.forward_launcher``; for ``sdpa`` with the cuDNN frontend, the built graph
itself), for a merged one the computer's kernel and the merge (``ringattn.core``). Later calls
make each view with one ``as_strided`` and call the launcher. Same kernels, same views, same
results as the general path (``tests/test_launches.py`` holds the two to identical outputs and
gradients), but for a part of several segments at ``b > 1`` (below): the general path copies its
rows where the launches read views, and CPU's kernels round a view's rows that start off their
vector alignment a few ulps otherwise than a copy's.

One difference in what is launched: under ``lse`` a config's ``R = min(r, h)`` offsets, each a
block of ``K`` heads, line up along one stride (:class:`ringattn.pattern.OffsetRun`), so where
``K < R`` they go as ``K`` launches of ``R`` heads each (one kernel call and one merge, or one
backward and one add, per launch) instead of ``R`` of ``K``: issue 5's ``r = 16`` config at
16 heads is then one launch instead of 16, and ``r = 8`` two instead of eight. Same results to
rounding (a kernel's reduction order may depend on the heads batched with a row);
``FUSE_OFFSETS = False`` turns it off (the A/B of ``experiments/overheads.py --fuse``).

With ``b > 1`` a part of some of a block's segments has its ``b * S`` segments at two strides,
which no one view holds: such parts are launched once per batch entry (each entry's rows are
one view), the block cut ``BLOCK_SPLIT / b`` times rather than ``BLOCK_SPLIT`` so about as many
launches of about as many pairs run as with views over the whole batch.

Prepared only eagerly (never while tracing), for dilation processors whose reads are views
(``segment_local``; ``global`` gathers), and for blocks whose segments stay on this device (a
block that travels goes through its communicator's general path), with one exception: a run
group of a config whose segments span ranks is prepared too, its launcher calling the
communicator with the run's views. Such a config's local blocks are always one tail segment
each, whose rows are one view at any layout, so every rank of a segment takes the same path
(the same collectives, in the same order: a rank that took the runs while a peer took the
blocks would hang both). Issue 5's ``(32768, 16)`` config at 16K tokens per rank then moves
and computes its 16 offsets in one exchange instead of 16. The preparations live on the
:class:`ringattn.core.CoreSpec` (one per module and shape), a few per spec at most.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ringattn import pattern
from ringattn.capture import compiling
from ringattn.lru import drop_oldest
from ringattn.pattern import Geometry

if TYPE_CHECKING:
    from ringattn.core import CoreSpec

    # what a preparation depends on of one tensor (None: no tensor), :func:`layouts_of`
    Layout = tuple[torch.Size, tuple[int, ...], torch.dtype, torch.device] | None
    # a preparation's key in ``CoreSpec.launches``: (kind, placed, split, block ids, layouts,
    # FUSE_OFFSETS, PER_ENTRY, the computer's launch options)
    PreparedKey = tuple[
        str, bool, int | None, tuple[int, ...], tuple[Layout, ...], bool, bool, tuple[object, ...]
    ]
    # what a launch covers: a plan's block (or part of one), or a config's offsets as one run
    Part = pattern.Block | pattern.OffsetRun
    # a block's parts' (geometry of each operand, launcher)
    Launches = tuple[tuple[tuple[Geometry | None, ...], Callable[..., None]], ...]
    # a view's geometry from a tensor's (shape, stride), None where it is no view of it
    GeometryOf = Callable[[tuple[int, ...], tuple[int, ...]], Geometry | None]


class Prepared(dict[int, tuple[tuple[tuple[Geometry | None, ...], Callable[..., None]], ...]]):
    """Block index -> its parts' (geometry of each operand, launcher). ``derived``: what a caller
    computes from a preparation, kept with it so each call does not redo it (the forward's fill
    selection, ``ringattn.core``)."""

    def __init__(self) -> None:
        super().__init__()
        # (each key's own kind of value: the fill's selection, a grouped launch, a packed LSE)
        self.derived: dict[str | tuple[str, bool], Any] = {}


# lse: a config's offsets as runs where they line up (see the module's docstring)
FUSE_OFFSETS = True

# b > 1: parts whose rows over the batch are no one view launched once per batch entry (see the
# module's docstring); False leaves them to the general path, as before h200_perf.md step 71 (the
# A/B of gpu_session.sh batch). Both switches are in the preparations' key: a change takes
# effect on the next call
PER_ENTRY = True

# preparations kept per spec, most recently used last (one per (kind, layouts); one layout
# takes up to five: forward, no-grad forward and the backward's three): 8 re-prepared everything
# on every call of two alternating batch sizes
MAX_PREPARED = 32
# (the bookkeeping of every spec's preparations: two threads evicting from one raised)
_PREPARED_LOCK = threading.Lock()


def views(
    tensors: tuple[Tensor | None, ...], geometry: tuple[Geometry | None, ...]
) -> list[Tensor | None]:
    """Each tensor's view of this geometry (None stays None)."""
    return [
        None if g is None or x is None else x.as_strided(g[0], g[1], x.storage_offset() + g[2])
        for x, g in zip(tensors, geometry)
    ]


def prepared(
    spec: CoreSpec,
    kind: str,
    reads: tuple[Tensor, ...],
    writes: tuple[Tensor | None, ...],
    block_ids: Iterable[int],
    make_launcher: Callable[..., Callable[..., None]],
    placed: bool,
    split: int | None = None,
    layouts: tuple[Layout, ...] | None = None,
) -> Prepared:
    """The prepared launches of ``spec``'s blocks ``block_ids`` for tensors of these layouts:
    ``reads`` go through the dilation processor (``[b, n, h, ...]`` inputs); ``writes`` (the
    output and LSE, or the gradients; None: not written) are viewed as each part's rows,
    ``[b * S, L, H, ...]`` where results are ``placed`` straight into them, else ``[b, S, L, H,
    ...]`` (merged or added into). ``make_launcher(span, part, *views)`` builds a part's launcher
    from example views, for blocks whose segments span ``span`` ranks (``part``: the
    :class:`ringattn.pattern.Block` or :class:`ringattn.pattern.OffsetRun` it launches). Blocks
    missing from the result take the general path. ``split``: each local block is launched in
    the parts :meth:`ringattn.pattern.Block.cut` makes with it rather than in ``Plan.parts``
    (``pattern.BLOCK_SPLIT``'s, which bound a kernel's temporaries): 1 launches it whole, for a
    computer without block-sized temporaries (``BlockComputer.places_whole_blocks``).
    ``layouts``: :func:`layouts_of` ``(*reads, *writes)``, where the caller has them already."""
    if compiling():
        return Prepared()
    if layouts is None:
        layouts = layouts_of(reads + writes)
    block_ids = tuple(block_ids)  # (may be a generator: read once)
    # (with the switches read when launches are made, the computer's and this module's:
    # flipping one on a live module, e.g. SDPAComputer.cuda_forward or FUSE_OFFSETS for an A/B,
    # kept the launches of before)
    options = spec.block_computer.launch_options()
    key = (kind, placed, split, block_ids, layouts, FUSE_OFFSETS, PER_ENTRY, options)
    cache = spec.launches
    with _PREPARED_LOCK:
        found = cache.pop(key, None)
        if found is not None:
            cache[key] = found  # the most recently used, last
            return found
    found = _prepare(spec, reads, writes, block_ids, make_launcher, placed, split)
    with _PREPARED_LOCK:
        cache[key] = found
        while len(cache) > MAX_PREPARED:  # bounded: drop the least recently used
            drop_oldest(cache)
    return found


def packed(
    launches: Prepared, slot: int, x: Tensor, twin: bool = False
) -> tuple[Tensor, int, Prepared]:
    """Operand ``slot`` of ``launches`` (``x``, an LSE ``[b, n, h]``, whose part views are
    ``[B, L, H]``) gathered into one buffer: each part's view as a contiguous ``[B, H, L]`` block
    (what FA4's backward reads; ``B * H * L`` floats per part either way), and ``launches`` with
    that operand's geometry replaced by its block's, seen as ``[B, L, H]`` again (strides ``(H *
    L, 1, L)``: transposed back, contiguous). ``twin``: each geometry also ends with that
    block's once more, for a tensor laid out as ``x`` gathered with the same index, which the
    launches then read as an extra last operand (the core's given dPsum).

    Returns ``(index, span, repacked)``: :func:`gather` ``(x, index, span)`` is the buffer
    (``span``: the largest index + 1, known on the host). The index is made on ``x``'s device by
    kernels (no host-to-device copy, which CUDA-graph capture forbids); memory: one int32 per
    gathered float (int64 where the positions pass 2**31), kept with the preparation."""
    blocks = [
        (i, geometry, _operand_geometry(geometry, slot), launch)
        for i, parts in launches.items()
        for geometry, launch in parts
    ]
    span = 1 + max((_last_position(part) for _, _, part, _ in blocks), default=-1)
    # int32 where it reaches (half the memory kept; issue 5's 4M tokens are 64M LSE floats)
    dtype = torch.int32 if span <= torch.iinfo(torch.int32).max else torch.int64

    def arange(count: int) -> Tensor:
        return torch.arange(count, device=x.device, dtype=dtype)

    pieces: list[Tensor] = []
    repacked = Prepared()
    start = 0
    for i, geometry, part, launch in blocks:
        (batch, length, heads), (s_batch, s_row, s_head), offset = part
        index = (
            arange(batch)[:, None, None] * s_batch
            + arange(heads)[None, :, None] * s_head
            + arange(length)[None, None, :] * s_row
            + offset
        )
        pieces.append(index.flatten())
        block = ((batch, length, heads), (heads * length, 1, length), start)
        geometry = (*geometry[:slot], block, *geometry[slot + 1 :], *([block] if twin else []))
        repacked[i] = (*repacked.get(i, ()), (geometry, launch))
        start += batch * length * heads
    index = torch.cat(pieces) if pieces else arange(0)
    return index, span, repacked


def _operand_geometry(geometry: tuple[Geometry | None, ...], slot: int) -> Geometry:
    part = geometry[slot]
    assert part is not None, "a packed operand is read by every launch"
    return part


def _last_position(geometry: Geometry) -> int:
    """The storage position (from the tensor's offset) of a view's last element."""
    size, stride, offset = geometry
    return offset + sum((count - 1) * step for count, step in zip(size, stride, strict=True))


def gather(x: Tensor, index: Tensor, span: int) -> Tensor:
    """The buffer of :func:`packed`: ``x``'s storage from its offset on, read at ``index`` (whose
    largest entry is ``span - 1``)."""
    return x.as_strided((span,), (1,), x.storage_offset()).index_select(0, index)


def layouts_of(tensors: tuple[Tensor | None, ...]) -> tuple[Layout, ...]:
    """What a preparation depends on of each tensor (its key, with the blocks and the kind)."""
    return tuple(None if x is None else (x.shape, x.stride(), x.dtype, x.device) for x in tensors)


def _prepare(
    spec: CoreSpec,
    reads: tuple[Tensor, ...],
    writes: tuple[Tensor | None, ...],
    block_ids: Iterable[int],
    make_launcher: Callable[..., Callable[..., None]],
    placed: bool,
    split: int | None,
) -> Prepared:
    plan, tensors = spec.plan, (*reads, *writes)
    batch = reads[0].shape[0]

    def entries(parts: tuple[Part, ...], span: int, per_entry: bool = False) -> Launches | None:
        """Each part's (geometry, launcher), or None if some operand is not one view;
        ``per_entry``: each part once per batch entry (see below)."""
        found: list[tuple[tuple[Geometry | None, ...], Callable[..., None]]] = []
        for part in parts:
            rows: GeometryOf = part.flat_geometry if placed else part.rows_geometry
            read = partial(spec.dilation.geometry, part)
            for start, count in ((e, 1) for e in range(batch)) if per_entry else ((0, batch),):
                geometry = (
                    *(_entry(read, x, start, count) for x in reads),
                    *(None if x is None else _entry(rows, x, start, count) for x in writes),
                )
                if any(g is None and x is not None for x, g in zip(tensors, geometry)):
                    return None  # a read that gathers, or rows that are not one view
                found.append((geometry, make_launcher(span, part, *views(tensors, geometry))))
        return tuple(found)

    def local_entries(parts: tuple[Part, ...], block: pattern.Block | None) -> Launches | None:
        """:func:`entries` of these local parts or, where some are not one view over a batch of
        more than one, of each batch entry's: a part of some of a block's segments has its
        ``b * S`` segments at two strides (``ringattn.core.flat_view``), so it took the general
        path (copies of its q, k, v; under ``lse`` every block past the first, at issue 5's shape
        with ``b > 1``). Each entry's rows are one view; ``block`` (None: the parts as they are)
        is cut coarser for them, so about as many launches of about as many pairs run as with
        views over the whole batch."""
        found = entries(parts, 1)
        if found is not None or batch == 1 or not PER_ENTRY:
            return found
        if block is not None:
            parts = block.cut(plan.n, plan.h, max(1, (split or plan.split) // batch))
        return entries(parts, 1, per_entry=True)

    def span_of(i: int) -> int:
        return spec.spans[plan.blocks[i].job.config]

    block_ids = set(block_ids)
    local = {i for i in block_ids if span_of(i) == 1}
    result = Prepared()
    # merged blocks: a config's offsets as K runs, launched at its first block (each (row, head)
    # still merges its configs in config order; the kernels round as their head batch makes them)
    groups = pattern.offset_runs(plan, plan.split) if FUSE_OFFSETS and not placed else ()
    for members, runs in groups:
        span = span_of(members[0])
        # a spanning config's blocks are single tail segments: one view at every layout, so
        # entries() is None on every rank (a gathering dilation) or on none
        if not set(members) <= block_ids:
            continue
        fused = entries(runs, span) if span > 1 else local_entries(runs, None)
        if fused is not None:
            result.update({i: () for i in members})
            result[members[0]] = fused
    for i in sorted(local - set(result)):  # the rest: each part on its own
        parts = plan.parts[i] if split is None else plan.blocks[i].cut(plan.n, plan.h, split)
        if (found := local_entries(parts, plan.blocks[i])) is not None:
            result[i] = found
    return result


def _entry(geometry_of: GeometryOf, x: Tensor, start: int, count: int) -> Geometry | None:
    """``geometry_of(shape, stride)`` of ``x``'s batch entries ``start .. start + count``: the
    geometry of ``x[start : start + count]``'s view, its offset from ``x``'s own."""
    geometry = geometry_of((count, *x.shape[1:]), x.stride())
    if geometry is None:
        return None
    size, stride, offset = geometry
    return size, stride, offset + start * x.stride(0)
