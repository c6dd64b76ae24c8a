"""Several placed blocks' forwards as one FA4 kernel (``head_groups``: every config in one launch).

Why: ``head_groups`` launches one FA4 forward per config. With LongNet's usual configs every
config's dilated segment has one length (issue 5's: 2048 rows), but the small configs are few
CTAs (``r = 16``: 48 at 32K tokens on 132 SMs), each kernel lasting as long as its longest
query tile, so causal forwards ran those configs at 93-172 TFLOP/s against 524 for ``r = 1``
(``docs/benchmarks/h200_perf.md``, step 31); and every launch costs host time, which is what
bounds 32K. :mod:`ringattn.kernels.fa4_group_sm90` runs the blocks of every config in one
kernel whose scheduler walks all of their tiles (longest first for causal), each group through
TMA descriptors of its own, writing each group's output rows, LSE and (where its config leaves
rows out) those rows' zeros, as :mod:`ringattn.kernels.fa4_zero` does per config.

A group is a placed block part ``[B_g, L, H_g, d]`` (q, k, v, out, LSE ``[B_g, L, H_g]`` or
None) of full segments, with the shifts of its unselected rows (``ringattn.core.
neighbour_shifts``; () for ``r = 1``). Every group has the same ``L``, dtype and head dim.

Held to FA4's plain forward like the other fused kernels: the first call of each compiled
kernel fills the neighbour rows of every group's first entries (``fa4.CHECKED_BATCH``) with NaN,
runs it on those, and keeps it only if each group's rows and LSE agree with FA4's forward of
that group and every neighbour is 0, then launches it on the call's groups; a kernel that fails
to compile or agree is not used again in this process (with a warning that says why). A False
return means the kernel did not run on the call's groups: the caller launches them one by one,
which writes every row this call would have (the checked entries' NaN included). SM90 only.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ringattn.kernels import fa4, fa4_merge
from ringattn.kernels.unselected import shifted

# the A/B switch (experiments/overheads.py --group), read on every call: False declines, and the
# caller launches the groups one by one
ENABLED = True

# the most 128-row query tiles (all groups together) one launch of one CTA per tile takes. On an
# H200 (issue 5's configs, docs/benchmarks/h200_perf.md step 32) one launch paid at 32K tokens
# (1744 tiles: forward+backward 9-20% faster back to back, the forward's host time halved), where
# the host and the small configs' partial waves bound the forward; from 131K (6976 tiles) the
# configs' own kernels on concurrent streams were 0-7% faster, and no faster one launch's host
# time. Larger plans go to a persistent launch where PERSISTENT says so, else config by config.
ALL_TILES_MAX = 4096

# which plans of more than ALL_TILES_MAX tiles take one launch on a persistent grid of one CTA
# per SM (ringattn.kernels.fa4_group_sm90.PersistentLPTScheduler): "causal", "always" or
# "never" (experiments/overheads.py --group-persistent; read when a plan's launches are made,
# and with ALL_TILES_MAX in SDPAComputer.launch_options: a change takes effect on the next call).
# Step 35 on an H200: causal forwards back to back 2-4% faster than the configs' own kernels at
# 131K, 262K and 1M (single calls within their spread), bit-identical; non-causal 131K 6-7%
# slower, until step 36 walked non-causal plans unit by unit (FA4's one-CTA-per-tile order, not
# its L2 sections): then 4-5% faster at 131K and 1-3% at 1M (one run; the kernel alone 3-10%
# faster than one CTA per tile at 131K). At 32K (one CTA per tile already one launch) causal was
# 3-7% slower in step 35, hence the persistent grid only past ALL_TILES_MAX
PERSISTENT = "always"
PERSISTENCE = fa4.WHEN

# what a compiled kernel is specialised for (:func:`_key`): dtype, head dim, causality, tiles,
# no LSE, each group's heads, shifts and LSE unit dim, and the persistent grid's SM count
Key = tuple[
    torch.dtype,
    int,
    bool,
    fa4.ForwardTiles | None,
    bool,
    tuple[int, ...],
    tuple[tuple[int, ...], ...],
    tuple[int | None, ...],
    int,
]
# compiled kernels (Launch) by key; False: failed to compile or agree
_COMPILED: dict[Key, Any] = {}
_LOCK = threading.Lock()
# why the latest kernel was refused (for probes)
last_refusal: str | None = None

# one group: its (q, k, v, out, lse or None) views
Group = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]
# one view per group
Views = tuple[Tensor, ...]
# the kernel's arguments before the scale: every group's q, k, v, out and ``[B, H, L]`` LSE view
# (None: no LSE)
Operands = tuple[Views, Views, Views, Views, Views | None]
# a compiled kernel, as ``launch(qs, ks, vs, outs, lses_bhl, scale)``
Launch = Callable[[Views, Views, Views, Views, Views | None, float], None]


def tiles(qs: Iterable[Tensor]) -> int:
    """The 128-row tiles of these ``[B, L, H, d]`` blocks (the grouped backward's key tiles
    too: self-attention)."""
    return sum(q.shape[0] * q.shape[2] * -(-q.shape[1] // 128) for q in qs)


def persistent(groups: Sequence[Group], causal: bool) -> bool:
    """Whether these groups' launch runs on a persistent grid: more than :data:`ALL_TILES_MAX`
    tiles, and :data:`PERSISTENT` takes such a plan."""
    takes = fa4.takes(PERSISTENT, "fa4_group.PERSISTENT", causal)
    return takes and tiles(group[0] for group in groups) > ALL_TILES_MAX


def supported(groups: Sequence[Group], shifts: Sequence[tuple[int, ...]], causal: bool) -> bool:
    """Whether one kernel takes these groups here: two or more, with no more than
    :data:`ALL_TILES_MAX` query tiles in all or a :func:`persistent` launch, on an SM90 GPU with
    FA4, each in a layout :func:`ringattn.kernels.fa4_merge.layout_ok` accepts, self-attention
    blocks of one length, dtype and head dim, all with an LSE or none, and shifts that keep the
    output's 16-byte vector stores aligned."""
    if len(groups) < 2 or len(shifts) != len(groups):
        return False
    if tiles(group[0] for group in groups) > ALL_TILES_MAX and not persistent(groups, causal):
        return False
    q0, lse0 = groups[0][0], groups[0][4]
    for (q, k, v, out, lse), group_shifts in zip(groups, shifts):
        if (lse is None) != (lse0 is None) or k.shape != q.shape or v.shape != q.shape:
            return False
        if q.shape[1] != q0.shape[1] or q.shape[3] != q0.shape[3] or q.dtype != q0.dtype:
            return False
        if any(shift * q.element_size() % 16 for shift in group_shifts):
            return False
        if not fa4_merge.layout_ok(q, k, v, out, lse):
            return False
    return fa4.sm90(q0)


def _key(groups: Sequence[Group], causal: bool, shifts: Sequence[tuple[int, ...]]) -> Key:
    """What a compiled kernel is specialised for: dtype, head dim, causality, the tiles
    (``fa4.FORWARD_CONFIG``), each group's head count and shifts, which dim of each ``[B, H,
    L]`` LSE view has stride 1 (compiled in as a constant; None: none, or no LSE), and the
    persistent grid's bound (the GPU's SM count; 0: one CTA per tile)."""
    q0, lse0 = groups[0][0], groups[0][4]
    units = tuple(
        None
        if lse is None
        else next((i for i, s in enumerate(lse.transpose(1, 2).stride()) if s == 1), None)
        for *_, lse in groups
    )
    heads = tuple(group[0].shape[2] for group in groups)
    config = fa4.FORWARD_CONFIG.get(causal)
    sms = _sm_count(q0) if persistent(groups, causal) else 0
    return q0.dtype, q0.shape[-1], causal, config, lse0 is None, heads, tuple(shifts), units, sms


def _sm_count(q: Tensor) -> int:
    """The persistent grid's bound: ``q``'s GPU's SM count (an H100/H200's, 132, elsewhere: the
    CPU machine compiles for one)."""
    if not (q.is_cuda and torch.cuda.is_available()):
        return 132
    return torch.cuda.get_device_properties(q.device).multi_processor_count


def _restrided(groups: Sequence[Group]) -> list[Group]:
    """Each view with its size-1 dims of stride 0 given a stride the kernel accepts."""
    restride = fa4_merge._unit_dims_restrided
    return [
        (
            restride(q),
            restride(k),
            restride(v),
            restride(out),
            None if lse is None else restride(lse),
        )
        for q, k, v, out, lse in groups
    ]


def _operands(groups: Sequence[Group]) -> Operands:
    """The kernel's arguments: tuples of q, k, v, out and of the ``[B, H, L]`` LSE views (or
    None)."""
    qs, ks, vs, outs, lses = zip(*groups)
    lses_bhl = None if lses[0] is None else tuple(lse.transpose(1, 2) for lse in lses)
    return qs, ks, vs, outs, lses_bhl


def forward_group_(
    groups: Sequence[Group], causal: bool, scale: float, shifts: Sequence[tuple[int, ...]]
) -> bool:
    """Every group's ``out``, ``lse`` (may be None) <- attention(q, k, v), and 0 into
    ``shifted(out, s)`` for each ``s`` of its ``shifts``, as one kernel. False where that kernel
    is not usable (see the module docstring: the caller launches the groups itself)."""
    if not ENABLED:
        return False
    key = _key(groups, causal, shifts)
    groups = _restrided(groups)
    return fa4.call_guarded(
        _COMPILED,
        _LOCK,
        key,
        groups[0][0],
        lambda: _first_call(key, groups, causal, scale),
        lambda kernel: kernel(*_operands(groups), scale),
    )


def grouper(
    groups: Sequence[Group], causal: bool, shifts: Sequence[tuple[int, ...]]
) -> Callable[[Sequence[Group], float], bool]:
    """:func:`forward_group_` for views of these (example) views' layouts, as ``call(groups,
    scale)``, with the compile key and the re-striding decided here once (a prepared launch
    calls it every forward: ``ringattn.core``)."""
    key = _key(groups, causal, shifts)
    restride = any(0 in x.stride() for group in groups for x in group if x is not None)
    shifts = tuple(shifts)

    def call(groups: Sequence[Group], scale: float) -> bool:
        kernel = _COMPILED.get(key)
        if not kernel or restride or not ENABLED:  # first call, refused, off, or unusual
            return forward_group_(groups, causal, scale, shifts)
        kernel(*_operands(groups), scale)
        return True

    return call


def _compile(key: Key, groups: Sequence[Group]) -> Launch:
    """The grouped kernel compiled for operands like these (kept in FA4's JIT cache as
    :func:`ringattn.kernels.fa4_merge.compile_forward` keeps its kernels), as ``launch(qs, ks,
    vs, outs, lses_bhl, scale)``."""
    cute = importlib.import_module("cutlass.cute")
    dsl_utils = importlib.import_module("flash_attn.cute.cute_dsl_utils")
    sm90 = importlib.import_module("ringattn.kernels.fa4_group_sm90")
    dtype, head_dim, causal, config, _, heads, shifts, units, sms = key
    kernel = fa4_merge.forward_kernel(
        sm90.GroupedForwardSm90,
        dtype,
        head_dim,
        causal,
        config,
        heads=heads,
        zero_shifts=shifts,
        persistent_sms=sms,
    )
    qs, ks, vs, outs, lses_bhl = _operands(groups)
    args: list[tuple[Any, ...] | None] = [  # (CuTe DSL tensors, untyped)
        tuple(dsl_utils.to_cute_tensor(x) for x in xs) for xs in (qs, ks, vs)
    ]
    args.append(tuple(dsl_utils.to_cute_tensor(x, assumed_align=16) for x in outs))
    if lses_bhl is None:
        args.append(None)
    else:
        args.append(tuple(fa4_merge.lse_tensor(x, unit) for x, unit in zip(lses_bhl, units)))
    cache = fa4_merge._jit_cache()
    # (the kernel's source: its module, the zeroing kernel it extends, and the modules that
    # make it and its arguments)
    zeroing = importlib.import_module("ringattn.kernels.fa4_zero_sm90")
    sources = (sm90.__file__, zeroing.__file__, fa4_merge.__file__, __file__)
    cache_key = (*(fa4_merge._digest(source) for source in sources), *key)
    if cache_key in cache:
        compiled = cache[cache_key]
    else:
        stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        compiled = cute.compile(kernel, *args, 1.0, stream, options="--enable-tvm-ffi")
        cache[cache_key] = compiled

    def launch(
        qs: Views, ks: Views, vs: Views, outs: Views, lses_bhl: Views | None, scale: float
    ) -> None:
        compiled(qs, ks, vs, outs, lses_bhl, scale)

    return launch


def _first_call(key: Key, groups: Sequence[Group], causal: bool, scale: float) -> bool:
    """Compile ``key``'s kernel, hold it to FA4's plain forward on every group's first entries
    (:func:`_checked`) and, where kept, launch it on the call's groups. False where it was
    refused: the caller launches the groups itself, which writes every row this call would have
    (the checked entries', NaN or written by the check, included)."""
    first: list[Group] = [fa4.first_entries(*group) for group in groups]
    kernel = _checked(key, first, causal, scale)
    if kernel is None:
        return False
    kernel(*_operands(groups), scale)
    return True


def _checked(key: Key, groups: Sequence[Group], causal: bool, scale: float) -> Launch | None:
    """``key``'s kernel compiled and run on these groups (a few entries each, for a whole
    block's copies here took GBs at 2M tokens) with their neighbour rows poisoned, each group
    then held to FA4's plain forward: the kernel where every group's rows and LSE agree and
    every neighbour is 0, else None (refused: recorded as False, not used again)."""
    shifts = key[6]
    neighbours = [shifted(group[3], s) for group, ss in zip(groups, shifts) for s in ss]
    for x in neighbours:
        x.fill_(float("nan"))  # a kernel that skips its zeros cannot pass
    try:
        kernel = _compile(key, groups)
        kernel(*_operands(groups), scale)
    except Exception as exc:  # the CuTe DSL or this FA4 version rejects the kernel
        _refuse(key, f"it failed to compile or launch ({type(exc).__name__}: {exc})")
        return None
    why = None
    for g, (q, k, v, out, lse) in enumerate(groups):
        out_ref, lse_ref = fa4.forward(q, k, v, causal, scale)
        out_ok, out_err = fa4.output_agrees(out, out_ref)
        lse_ok = lse is None or fa4.lse_agrees(lse, lse_ref)
        if not (out_ok and lse_ok):
            why = f"group {g}: output error {out_err:.3g}, LSE {'ok' if lse_ok else 'wrong'}"
            break
    if why is None and not all(bool((x == 0).all()) for x in neighbours):
        why = "a neighbour row not zeroed"
    if why is not None:
        _refuse(key, f"it disagreed with FA4's forward ({why})")
        return None
    _COMPILED[key] = kernel
    return kernel


def _refuse(key: Key, why: str) -> None:
    global last_refusal
    last_refusal = fa4.refuse(
        _COMPILED,
        key,
        why,
        "FA4's forward over several configs in one launch",
        "each config's blocks take their own FA4 forward",
    )
