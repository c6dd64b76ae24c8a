"""Sequence parallelism helpers: sharding along n, process groups, cross-rank consistency.

Each rank of a process group holds a shard ``[b, n/p, h, d]`` of q, k, v, in one of two layouts:

- ``"contiguous"``: rank ``i`` holds positions ``[i·n/p, (i+1)·n/p)``. A segment that spans ``g``
  shards is computed by the ``g`` consecutive ranks holding it.
- ``"zigzag"`` (load-balanced causal; PyTorch's context parallel calls it head-tail): the sequence
  is cut into ``2p`` chunks of ``c = n/(2p)`` and rank ``i`` holds chunks ``i`` and ``2p-1-i``,
  concatenated. Under causal attention every rank then does the same work (with ``"contiguous"``
  the last rank of a segment does ``2p-1`` times the first one's). Shard-local segments must fit
  in one chunk and segments that span ranks must cover the whole sequence (``w >= n``).

``shard`` / ``gather`` / ``positions`` convert between the full sequence and shards. No
sub-groups are made: ``new_group`` must be entered by every rank of the world, which ranks of
another sequence-parallel group never do (see ``communicators/all_gather.py``).
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from ringattn.config import an_int, checked_int

try:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor as DTensor  # (api's input rule reads it)
except ImportError:  # a torch built without distributed: isinstance(x, ()) is never true
    DeviceMesh = ()  # type: ignore[assignment,misc]
    DTensor = ()  # type: ignore[assignment,misc]

# torch 2.13 renamed these two and its old names warn (FutureWarning); torch 2.11 has only
# the old names
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def resolve_group(group: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "a sequence-parallel communicator needs torch.distributed initialised "
            "(launch with torchrun and call torch.distributed.init_process_group)"
        )
    group = group if group is not None else dist.group.WORLD
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"group: a DeviceMesh must be 1-D (the sequence-parallel dim, mesh['sp']), got "
                f"{group.ndim} dims {group.mesh_dim_names}"
            )
        group = group.get_group()
    # (new_group hands the ranks outside it a sentinel int, refused below by name)
    if not isinstance(group, dist.ProcessGroup) and group != dist.GroupMember.NON_GROUP_MEMBER:
        raise TypeError(
            "group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None (the "
            f"world), got {type(group).__name__}"
        )
    if isinstance(group, dist.ProcessGroup) and not is_live(group):
        raise ValueError(
            "group: this process group was destroyed (torch.distributed.destroy_process_group) "
            "or was not made by torch.distributed.new_group; pass a live group"
        )
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()}) is not a member of it (ranks "
            f"{dist.get_process_group_ranks(group)}); pass the group that holds this rank"
        )
    return group


LAYOUTS = ("contiguous", "zigzag")


def is_live(group: dist.ProcessGroup) -> bool:
    """Whether torch.distributed still knows ``group`` (``destroy_process_group(group)`` forgets
    it; torch's own error then names the group object "not initialized in the world group
    map"). Read from torch's group map, a private one: True where this torch has none."""
    group_map = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)
    return not isinstance(group_map, dict) or group in group_map


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunks_of(rank: int, p: int, layout: str) -> tuple[int, ...]:
    """Which chunks ``rank`` holds, in order (of ``p`` chunks if contiguous, else ``2p``)."""
    check_layout(layout)
    # checked as m is (config.checked_int): a float p gave float positions, and a bool rank
    # read as rank 0 or 1, silently
    checked_int("p", p)
    an_int("rank", rank)  # (its range is p's, below)
    if not 0 <= rank < p:
        raise ValueError(f"rank must be in [0, p={p}), got {rank}")
    return (rank,) if layout == "contiguous" else (rank, 2 * p - 1 - rank)


def positions(
    m: int, rank: int, p: int, layout: str, device: torch.device | str | None = None
) -> Tensor:
    """The sequence positions of the ``m`` rows that ``rank`` of ``p`` ranks holds in
    ``layout`` (e.g. for rotary embeddings): int64 ``[m]``. Each size is an int (a
    ``TypeError`` otherwise), ``m`` a whole number of the rank's chunks."""
    # (symbolic where a layer's call is traced with dynamic shapes: traced, it is an int there)
    checked_int("m", m)
    chunks = chunks_of(rank, p, layout)
    if m % len(chunks):
        raise ValueError(
            f"a shard of layout={layout!r} holds {len(chunks)} equal chunks: m={m} rows cannot "
            "be its rows"
        )
    c = m // len(chunks)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunks])


def _check_sequence_tensor(x: object) -> None:
    """``x`` is a tensor ``[b, n, ...]`` (shard and gather cut and join it along dim 1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [b, n, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be [b, n, ...] (at least 2 dims), got shape {tuple(x.shape)}")


def shard(
    x: Tensor, group: dist.ProcessGroup | DeviceMesh | None = None, layout: str = "contiguous"
) -> Tensor:
    """This rank's shard of ``x: [b, n, ...]`` along n in ``layout`` (n must divide evenly).
    ``group``: a process group, a 1-D ``DeviceMesh`` (``mesh["sp"]``) or None (the world)."""
    group = resolve_group(group)
    _check_sequence_tensor(x)
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[1]
    pieces = p * len(chunks_of(rank, p, layout))
    if n % pieces:
        raise ValueError(
            f"sequence length n={n} must be divisible by {pieces} (group size p={p}, "
            f"layout={layout!r})"
        )
    return torch.cat(_chunk_views(x, rank, p, layout), dim=1)


def _chunk_views(x: Tensor, rank: int, p: int, layout: str) -> list[Tensor]:
    """Views of the chunks of ``x: [b, n, ...]`` that ``rank``'s shard holds, in order (n
    divides evenly: the callers checked it)."""
    chunks = chunks_of(rank, p, layout)
    c = x.shape[1] // (p * len(chunks))
    return [x[:, i * c : (i + 1) * c] for i in chunks]


# how gather's backward forms each rank's shard gradient
GATHER_GRADS = ("shard", "sum")


def gather(
    x: Tensor,
    group: dist.ProcessGroup | DeviceMesh | None = None,
    layout: str = "contiguous",
    grad: str = "shard",
) -> Tensor:
    """Reassemble the full ``[b, n, ...]`` tensor from every rank's shard (all ranks get it).

    Differentiable. ``grad`` says what each rank's loss is:

    - ``"shard"`` (DTensor's ``full_tensor()``): every rank computes the same loss from the
      gathered tensor. This rank's shard gets its shard of the full tensor's gradient, with no
      communication; sum the ranks' shards' gradients (the parameters' all-reduce) for the full
      gradient.
    - ``"sum"`` (``torch.distributed.nn.all_gather``'s): each rank computes a loss of its own,
      and their sum is what is trained. The backward sums the ranks' gradients of the full
      tensor and returns this rank's shard of the sum (one reduce-scatter, in float32 for bf16
      and fp16, rounded once), so every rank must call backward.

    Under DDP (which averages the parameters' gradients over the group) pass ``"sum"``, also
    where every rank computes the same loss: the layers before the gather then get ``p`` times
    their shard's share, whose mean is the whole gradient, and the layers after it (computed on
    every rank) their whole gradient. With ``"shard"`` the layers before would get ``1/p`` of
    theirs under DDP's mean, and the layers after ``p`` times theirs under a sum.

    Every rank must pass the same ``layout`` and ``grad``, and under ``"sum"`` build a graph
    on every rank or on none (checked with the shards' shapes: a mismatch raises on every rank,
    before the backward could hang or pair with another collective). Bad arguments raise on
    every rank too. (gather returned a tensor without a graph once: a loss on it trained
    nothing before the gather, silently.)"""
    group = resolve_group(group)
    try:  # a rank's own refusal joins the agreement: raised there alone, the others would hang
        _check_sequence_tensor(x)
        check_layout(layout)
        if grad not in GATHER_GRADS:
            raise ValueError(f"grad must be one of {GATHER_GRADS}, got {grad!r}")
        pieces = len(chunks_of(dist.get_rank(group), dist.get_world_size(group), layout))
        if x.shape[1] % pieces:  # (chunk() split it unevenly: scrambled rows, silently)
            raise ValueError(
                f"a shard of layout={layout!r} holds {pieces} equal chunks: its length "
                f"x.shape[1]={x.shape[1]} must be divisible by {pieces}"
            )
        refusal = None
    except (TypeError, ValueError) as exc:
        refusal = exc
    graph = torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad
    # unequal shards (an uneven last batch) would pad with garbage on one rank and abort another
    held = (
        tuple(x.shape) if isinstance(x, Tensor) else None,
        str(x.dtype) if isinstance(x, Tensor) else None,
        layout,
        grad,
        graph if grad == "sum" else None,  # (a graph on some ranks only: their all-reduce hangs)
        None if refusal is None else f"{type(refusal).__name__}: {refusal}",
    )
    fields = ("shape", "dtype", "layout", "grad", "builds a graph under grad='sum'", "refusal")
    require_agreement(
        group,
        held,
        "the shards to gather",
        fields=fields,
        device=device_of(x),
    )
    if refusal is not None:  # (every rank holds it: the agreement passed)
        raise refusal
    if graph:
        gathered: Tensor = _Gather.apply(x, group, layout, grad)  # type: ignore[no-untyped-call]
        return gathered
    return _gathered(x, group, layout)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,  # (autograd's context object, which keeps whatever is set on it)
        x: Tensor,
        group: dist.ProcessGroup,
        layout: str,
        grad: str,
    ) -> Tensor:
        ctx.group, ctx.layout, ctx.grad = group, layout, grad
        return _gathered(x, group, layout)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.grad == "sum":
            return _summed_shard(grad, ctx.group, ctx.layout), None, None, None
        return shard(grad, ctx.group, ctx.layout), None, None, None


def _summed_shard(grad: Tensor, group: dist.ProcessGroup, layout: str) -> Tensor:
    """This rank's shard of the sum of every rank's ``grad`` (``[b, n, ...]``): one
    reduce-scatter of the ranks' shards, stacked, in float32 (float64 stays), rounded once to
    ``grad``'s dtype. It was an all-reduce of the whole ``grad`` in its own dtype, of which each
    rank kept its shard: in bf16 the reduction's adds rounded one by one, and the error against
    the exact sum grew with the ranks (1.0x / 1.6x / 2.2x one rounding's at p = 2 / 4 / 8, bf16
    and fp16 alike). A float32 reduce-scatter sends as many bytes as that bf16 all-reduce did
    (half the elements at twice the size). ``grad``, which may be the caller's own tensor
    (``backward(g)``), is only read."""
    p = dist.get_world_size(group)
    dtype = torch.promote_types(grad.dtype, torch.float32)
    shape = (grad.shape[0], grad.shape[1] // p, *grad.shape[2:])
    stacked = torch.empty((p, *shape), dtype=dtype, device=grad.device)
    for rank, slot in enumerate(stacked):  # (converted as they are copied: one pass)
        torch.cat(_chunk_views(grad, rank, p, layout), dim=1, out=slot)
    mine = torch.empty(shape, dtype=dtype, device=grad.device)
    reduce_scatter_single(mine, stacked.flatten(0, 1), group=group)
    return mine.to(grad.dtype)


def _gathered(x: Tensor, group: dist.ProcessGroup, layout: str) -> Tensor:
    """The full tensor from every rank's shard (their shapes and dtypes agree: gather checked)."""
    p = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(parts, x.contiguous(), group=group)
    pieces: dict[int, Tensor] = {}
    for rank, part in enumerate(parts):
        chunks = chunks_of(rank, p, layout)
        for chunk, piece in zip(chunks, part.chunk(len(chunks), dim=1)):
            pieces[chunk] = piece
    return torch.cat([pieces[i] for i in sorted(pieces)], dim=1)


def spans_for(
    configs: Sequence[tuple[int, int]], m: int, p: int, layout: str = "contiguous"
) -> tuple[int, ...]:
    """How many shards each config's segments span (1: shard-local), validating the layout."""
    check_layout(layout)
    if p == 1:  # the whole sequence is here: any segment length, tails included, as on one device
        return (1,) * len(configs)
    if layout == "zigzag":
        return _zigzag_spans(configs, m, p)
    n = m * p
    spans = []
    for i, (w, r) in enumerate(configs):
        # one segment over the whole sequence: (p mod w) = p for every position, so it selects
        # what w = n selects, whatever w's remainder against the shard length
        w = min(w, n)
        if w <= m:
            if m % w:
                raise ValueError(
                    f"segment_lengths[{i}]={w} must divide the shard length n/p={m} or be a "
                    f"multiple of it"
                )
            spans.append(1)
            continue
        if w % m:
            raise ValueError(
                f"segment_lengths[{i}]={w} must divide the shard length n/p={m} or be a "
                f"multiple of it"
            )
        if n % w:
            raise ValueError(
                f"segment_lengths[{i}]={w} spans shards, so it must divide n={n} (or be >= n)"
            )
        if m % r:
            raise ValueError(
                f"dilation_rates[{i}]={r} must divide the shard length n/p={m} when its segment "
                f"spans shards (each rank then holds m/r selected rows)"
            )
        spans.append(min(w // m, p))
    return tuple(spans)


def _zigzag_spans(configs: Sequence[tuple[int, int]], m: int, p: int) -> tuple[int, ...]:
    if m % 2:
        raise ValueError(f"layout='zigzag' needs an even shard length n/p, got {m}")
    c, n = m // 2, m * p
    spans = []
    for i, (w, r) in enumerate(configs):
        if w <= c and c % w == 0:
            spans.append(1)
            continue
        if w < n:
            raise ValueError(
                f"under layout='zigzag', segment_lengths[{i}]={w} must divide the chunk length "
                f"n/(2p)={c} or be >= n={n} (a rank's two chunks are not adjacent)"
            )
        if c % r:
            raise ValueError(
                f"under layout='zigzag', dilation_rates[{i}]={r} must divide the chunk length "
                f"n/(2p)={c} (each chunk then holds c/r selected rows)"
            )
        spans.append(p)
    return tuple(spans)


# gloo groups of an NCCL-only WORLD, for each call's agreement check: a collective on the GPU's
# stream would make the host wait for the GPU to read its answer
_SIDE_GROUPS: weakref.WeakKeyDictionary[dist.ProcessGroup, dist.ProcessGroup]
_SIDE_GROUPS = weakref.WeakKeyDictionary()


# every sequence-parallel forward that keeps its backward (eager), numbered per process group:
# the group's ranks make the same calls over it (checked), so a call's number is the same on each
# of them, and a backward's agreement names it (two backwards run in other orders on two ranks
# paired their messages across calls: wrong gradients, silently). Per group, not per process: a
# rank's calls over another group (its data-parallel neighbours') do not shift the count
_CALLS: weakref.WeakKeyDictionary[dist.ProcessGroup, itertools.count[int]]
_CALLS = weakref.WeakKeyDictionary()


def next_call(group: dist.ProcessGroup) -> int:
    """The number of the forward call being made over ``group`` (see ``_CALLS``)."""
    calls = _CALLS.get(group)
    if calls is None:
        calls = _CALLS[group] = itertools.count()
    return next(calls)


# The ranks' agreement (agree, require_agreement, check_consistent) runs eagerly, never in a
# Dynamo trace. A call Dynamo gave back to eager (a graph break in a user's torch.compile) still
# has Dynamo trace each frame it calls; traced, all_gather_object's read of the group's device
# types raised Dynamo's internal UnsafeScriptObjectError on every rank instead of the ValueError
# naming their calls
def fingerprint(signature: tuple[object, ...]) -> int:
    """A 63-bit digest of a call's signature, equal on every rank for equal signatures (Python's
    own ``hash`` of strings is salted per process)."""
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# a rank's "no call number" in agree's all-reduce: below every number, so the others' decide
_UNNUMBERED = -(2**62)


@torch.compiler.disable  # (never traced: see the note above fingerprint)
def agree(
    group: dist.ProcessGroup,
    digest: int,
    device: torch.device | None = None,
    call: int | None = None,
) -> bool:
    """Whether every rank of ``group`` passed the same ``digest``, and the same ``call`` among
    the ranks that passed one (None matches any: a compiled graph's backward has no number): one
    all-reduce of four integers (collective: every rank calls it, whatever it passes, so none
    hangs; a forward's and a backward's pair up and disagree). On the host where the group has a
    CPU backend (gloo, or ``init_process_group()``'s default ``cpu:gloo,cuda:nccl``); an
    NCCL-only WORLD gets a gloo twin, made at its first check (collectively, without local
    synchronisation, whose group names can differ between ranks with different group counts);
    an NCCL-only sub-group agrees on the GPU and reads the answer back (a host sync per call):
    on ``device``, the call's own GPU, where given (:func:`nccl_device`)."""
    number = [_UNNUMBERED] * 2 if call is None else [call, -call]
    extremes = torch.tensor([digest, -digest, *number], dtype=torch.int64)
    side = host_group(group)
    if side is None:
        extremes = extremes.to(nccl_device(device))
        side = group
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=side)
    top, low_negated, highest, lowest_negated = extremes.tolist()
    if [top, low_negated] != [digest, -digest]:
        return False
    if highest == _UNNUMBERED:  # (no rank numbered its call)
        return True
    return highest == -lowest_negated and call in (None, highest)


def device_of(x: object) -> torch.device | None:
    """``x``'s device where it is a tensor: what a refusal hands the ranks' agreement (the
    argument it refuses may be anything)."""
    return x.device if isinstance(x, Tensor) else None


def nccl_device(device: torch.device | None) -> torch.device:
    """The GPU an NCCL-only sub-group's agreement runs on: the call's tensors' own (the one its
    ring uses), else the current one. (The current one alone put every rank that never set its
    device on GPU 0, where NCCL refuses or hangs.)"""
    if device is not None and device.type == "cuda":
        return device
    return torch.device("cuda", torch.cuda.current_device())


def host_group(group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """``group`` where it has a CPU backend, its gloo twin where it is an NCCL-only WORLD (made
    at the first call, :func:`agree` says how), None for an NCCL-only sub-group (no twin)."""
    if "gloo" in str(dist.get_backend(group)):
        return group
    if group is dist.group.WORLD or dist.get_world_size(group) == dist.get_world_size():
        side = _SIDE_GROUPS.get(group)
        if side is None:
            side = _SIDE_GROUPS[group] = dist.new_group(backend="gloo")
        return side
    return None


@torch.compiler.disable  # (never traced: see the note above fingerprint)
def require_agreement(
    group: dist.ProcessGroup,
    signature: tuple[object, ...],
    what: str = "the dilated attention call",
    digest: int | None = None,
    fields: tuple[str, ...] = (),
    device: torch.device | None = None,
    call: int | None = None,
) -> None:
    """Return where every rank of ``group`` holds the same ``signature`` (one all-reduce of its
    ``digest``, :func:`fingerprint`'s unless given) and the same ``call`` number where given
    (:func:`agree`; a ``signature`` holding it passes a ``digest`` made without it); else raise
    :func:`check_consistent`'s ValueError on every rank, naming each rank's signature.
    ``device``: the call's tensors' (an NCCL-only sub-group agrees there, :func:`nccl_device`)."""
    if not agree(group, fingerprint(signature) if digest is None else digest, device, call):
        check_consistent(group, signature, what, fields, device)


def refuse_on_every_rank(
    group: dist.ProcessGroup, exc: Exception, device: torch.device | None = None
) -> NoReturn:
    """Raise ``exc``, this rank's refusal of a call its peers are making over ``group``, after
    joining the call's agreement with a signature that cannot match theirs: they raise a
    ValueError naming this rank's error instead of waiting for it in their exchanges. (Where
    every rank refused alike the agreement passes and each raises its own.)"""
    signature = ("refused before the call", f"{type(exc).__name__}: {exc}")
    try:
        require_agreement(group, signature, device=device)
    except ValueError as disagreement:
        raise exc from disagreement
    raise exc


@torch.compiler.disable  # (never traced: see the note above fingerprint)
def check_consistent(
    group: dist.ProcessGroup,
    signature: tuple[object, ...],
    what: str = "the dilated attention call",
    fields: tuple[str, ...] = (),
    device: torch.device | None = None,
) -> None:
    """Raise the same ValueError on every rank if ranks disagree on ``signature`` (no hang).
    ``fields``: names of the signature's entries, for the message to say which differ;
    ``device``: as :func:`require_agreement`'s."""
    # (the ranks' signatures, whatever each passed: compared field by field below)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    # on the host where a gloo group or twin exists, as the agreement was; an NCCL group's
    # objects travel as tensors on the current GPU, so it is made the call's own (ranks that
    # never set theirs would share GPU 0)
    side = host_group(group)
    if side is None:
        with torch.cuda.device(nccl_device(device)):
            dist.all_gather_object(everyone, signature, group=group)
    else:
        dist.all_gather_object(everyone, signature, group=side)
    if any(s != everyone[0] for s in everyone):
        # (a rank that refused its call holds another kind of signature: no field to name)
        comparable = all(isinstance(s, tuple) and len(s) == len(fields) for s in everyone)
        differ = [
            name
            for i, name in enumerate(fields)
            if comparable and any(s[i] != everyone[0][i] for s in everyone)
        ]
        which = f" (they differ in: {', '.join(differ)})" if differ else ""
        # each by its global rank, the one its process knows (a strided group's group rank 1
        # is global rank 3 of mesh["sp"]'s [1, 3]: "rank 1" named a process that passed the
        # other signature)
        ranks = dist.get_process_group_ranks(group)
        lines = "; ".join(
            f"rank {ranks[i]}{'' if ranks[i] == i else f' (group rank {i})'}: {s}"
            for i, s in enumerate(everyone)
        )
        raise ValueError(f"ranks disagree on {what}{which}: {lines}")
