"""Several placed blocks' backwards as one FA4 launch (``head_groups``: every config at once,
up to :data:`ALL_TILES_MAX` tiles).

The backward of :mod:`ringattn.kernels.fa4_group`: each group a placed block part ``[B_g, L,
H_g, d]`` (dout, q, k, v, and the dq, dk, dv it writes) of one length ``L``; the statistics laid
out by *unit* (``(segment, head)`` of every group, in group order, ``[B, H]`` within one: the
order of :func:`ringattn.launches.packed`). Per call:

1. :func:`ringattn.kernels.unit_stats.unit_stats_`: dPsum = rowsum(out * dout) and LSE *
   log2(e) for every unit row (one Triton launch, from the contiguous ``[b, n, h, ...]``
   tensors through the packed index), and the unit dQ accumulator zeroed (a memset);
2. :class:`ringattn.kernels.fa4_group_bwd_sm90.GroupedBackwardSm90`: FA4's SM90 backward over
   every group's key tiles, dK / dV stored into each group's views, dQ added into the unit
   accumulator, and the zeros of the rows each group's config leaves out written into dQ, dK
   and dV by the key tile that holds their stride group (where the core passes the group's
   shifts: the gradients' fill then skips those configs, as the forward's fill skips what
   FA4's zeroing forward writes);
3. :class:`ringattn.kernels.fa4_group_bwd_sm90.GroupedPostprocessSm90`: dQ from the accumulator
   into each group's view.

Four launches, against three per config (FA4's preprocess, main kernel and postprocess: 15 at
issue 5's shape). Held to FA4's per-part backward by a first-call guard (dK / dV and dQ within a
relative 1e-3 of FA4's: dQ is added atomically, and dPsum is summed in another order).

Measured on an H200 (docs/benchmarks/h200_perf.md step 33): at issue 5's 32K forward+backward
back to back 24-30% faster causal and -3% to +12% non-causal (three runs); from 65K equal back to
back and up to 7% slower in single calls (the GPU waits for the host's whole launch set before it
starts, where per-config launches let the first config's kernels run while the host launches the
next). Hence :data:`ALL_TILES_MAX`. Replayed from CUDA graphs it was 2-3% slower than the configs'
kernels on lanes (it saves host time only), so the core leaves it out while capturing. Having no
deterministic schedule for its atomic dQ, it is not offered under
``torch.use_deterministic_algorithms`` (``SDPAComputer.grouped_backward_launcher``): each config
then takes FA4's deterministic backward.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

from ringattn.kernels import fa4, fa4_group, fa4_merge
from ringattn.kernels.unit_stats import unit_stats_
from ringattn.kernels.unselected import shifted

ENABLED = True
# where the kernel writes the zeros of each group's unselected rows (the core's fill then skips
# them): "causal", "always" or "never" (the A/B of experiments/overheads.py --group-bwd-zero). On
# an H200 at 32K (h200_perf.md step 35, 16-byte stores) they took 5-7% off causal single calls
# of forward+backward and were even back to back; non-causal moved within its spread either way
ZEROING = "causal"
ZEROINGS = fa4.WHEN
# the most query tiles (128 rows, every segment and head of every group) one launch takes: issue 5's
# configs at 32K have 1744, at 65K 3488 (step 33: no faster there, slower in single calls; step
# 35, causal with its zeros: within 1-3% at 65K-1M, for 0.04x more memory). Larger plans on a
# persistent grid (a CTA's producer loading its next key tile's Q / dO during the last one's
# epilogue; steps 37-38, kept at 59e7a22) were exact and 3-30% slower than the configs' own
# backwards at 131K and 1M causal, in either tile order: removed
ALL_TILES_MAX = 2048
# what compiled kernels are specialised for (:func:`_key`)
Key = tuple[
    torch.dtype, int, bool, tuple[int, ...], tuple[tuple[int, ...], ...], fa4.BackwardTiles | None
]
# the compiled backward and postprocess (the CuTe DSL's, untyped; :func:`_compile`)
Kernels = tuple[Any, Any]
# by key; False: failed to compile or agree
_COMPILED: dict[Key, Kernels | Literal[False]] = {}
_LOCK = threading.Lock()
last_refusal: str | None = None


def zeroing(causal: bool) -> bool:
    """Whether a launch of these configs writes their unselected rows' zeros (see
    :data:`ZEROING`)."""
    return fa4.takes(ZEROING, "fa4_group_bwd.ZEROING", causal)


# float32 workspaces by tag and shape (the memory manager's scratch, bound to a device)
Scratch = Callable[[str, tuple[int, ...]], Tensor]

# one group: the views a placed backward launch takes, (dout, q, k, v, out [B_g, L, H_g, d],
# lse [B_g, L, H_g], dq, dk, dv [B_g, L, H_g, d]); out and lse may be None where only the
# kernels read them (:func:`grouper`'s calls once its kernels are kept)
Group = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor, Tensor, Tensor]
# a call's groups, made when asked: ``groups_of(full)``, full: with out and lse (for the
# first call's check against FA4's own backward)
GroupsOf = Callable[[bool], Sequence[Group]]


# the head dims this kernel was checked right at on an H200 (the GPU oracle check: 64; issue 5's
# shape: 128). At 32 its gradients came out 1.19 off (its first-call check refused it there,
# experiments/gpu_fuzz.py); a first call whose gradients are all zero would not have.
HEAD_DIMS = (64, 128)


def supported(groups: Sequence[Group]) -> bool:
    """Two or more groups of one length, dtype and head dim (one of :data:`HEAD_DIMS`), with no
    more than :data:`ALL_TILES_MAX` query tiles in all, self-attention, every view one
    :func:`ringattn.kernels.fa4_merge.layout_ok` accepts, on an SM90 GPU with FA4."""
    if len(groups) < 2:
        return False
    if fa4_group.tiles(g[1] for g in groups) > ALL_TILES_MAX:
        return False
    q0 = groups[0][1]
    if q0.shape[-1] not in HEAD_DIMS:
        return False
    for dout, q, k, v, out, _, dq, dk, dv in groups:
        if out is None or any(x.shape != q.shape for x in (dout, k, v, out, dq, dk, dv)):
            return False
        if q.shape[1] != q0.shape[1] or q.shape[3] != q0.shape[3] or q.dtype != q0.dtype:
            return False
        if not (
            fa4_merge.layout_ok(q, k, v, dout, None) and fa4_merge.layout_ok(dq, dk, dv, dq, None)
        ):
            return False
    return fa4.sm90(q0)


def _config(head_dim: int, causal: bool) -> Any:  # (FA4's BwdConfig, untyped)
    """FA4's SM90 backward tile configuration for this head dim: ``fa4.BACKWARD_CONFIG``'s
    where it has one (read on every call, for the workspaces' shapes)."""
    return _tile_config(head_dim, causal, fa4.backward_config(head_dim, causal))


@cache
def _tile_config(head_dim: int, causal: bool, config: fa4.BackwardTiles | None) -> Any:
    interface = importlib.import_module("flash_attn.cute.interface")
    if config is not None:
        return interface.BwdConfig(*config)
    return interface._tile_size_bwd_sm90(head_dim, head_dim, causal, False)


def _key(groups: Sequence[Group], causal: bool, shifts: Sequence[tuple[int, ...]] = ()) -> Key:
    """What a compiled kernel is specialised for: dtype, head dim, causality, each group's head
    count and shifts, and ``fa4.BACKWARD_CONFIG``'s tiles (None: FA4's)."""
    q0 = groups[0][1]
    heads = tuple(group[1].shape[2] for group in groups)
    shifts = tuple(map(tuple, shifts)) or ((),) * len(heads)
    config = fa4.backward_config(q0.shape[-1], causal)
    return q0.dtype, q0.shape[-1], causal, heads, shifts, config


def _compile(key: Key, groups: Sequence[Group], stats: tuple[Tensor, Tensor, Tensor]) -> Kernels:
    """The grouped backward and postprocess compiled for operands like these, as
    ``(backward(qs, ks, vs, douts, lse_log2, dpsum, dq_accum, dks, dvs, dqs, scale),
    postprocess(dq_accum, dqs, scale))`` (the backward writes only the zeros of dqs)."""
    cute = importlib.import_module("cutlass.cute")
    dsl_utils = importlib.import_module("flash_attn.cute.cute_dsl_utils")
    sm90 = importlib.import_module("ringattn.kernels.fa4_group_bwd_sm90")
    dtype, head_dim, causal, heads, shifts, _ = key
    cfg = _config(head_dim, causal)
    backward = sm90.GroupedBackwardSm90(
        dsl_utils.torch2cute_dtype_map[dtype],
        head_dim,
        head_dim,
        1,
        causal,
        is_local=False,
        deterministic=False,
        tile_m=cfg.m_block_size,
        tile_n=cfg.n_block_size,
        Q_stage=cfg.num_stages_Q,
        dO_stage=cfg.num_stages_dO,
        PdS_stage=cfg.num_stages_PdS,
        SdP_swapAB=cfg.SdP_swapAB,
        dKV_swapAB=cfg.dKV_swapAB,
        dQ_swapAB=cfg.dQ_swapAB,
        AtomLayoutMSdP=cfg.AtomLayoutMSdP,
        AtomLayoutNdKV=cfg.AtomLayoutNdKV,
        AtomLayoutMdQ=cfg.AtomLayoutMdQ,
        num_threads=(cfg.num_wg + 1) * 128,
        dQ_single_wg=cfg.dQ_single_wg,
        heads=heads,
        zero_shifts=shifts,
    )
    postprocess = sm90.GroupedPostprocessSm90(
        dsl_utils.torch2cute_dtype_map[dtype],
        head_dim,
        90,
        cfg.m_block_size,
        128 if cfg.dQ_single_wg else cfg.num_wg * 128,
        cfg.AtomLayoutMdQ,
        cfg.dQ_swapAB,
        heads=heads,
    )

    def views(i: int) -> tuple[Any, ...]:  # (CuTe DSL tensors)
        return tuple(dsl_utils.to_cute_tensor(group[i]) for group in groups)

    douts, qs, ks, vs, _, _, dqs, dks, dvs = (None if i in (4, 5) else views(i) for i in range(9))
    lse_log2, dpsum, dq_accum = (dsl_utils.to_cute_tensor(x, assumed_align=16) for x in stats)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    compiled_backward = cute.compile(
        backward,
        qs,
        ks,
        vs,
        douts,
        lse_log2,
        dpsum,
        dq_accum,
        dks,
        dvs,
        dqs,
        1.0,
        stream,
        options="--enable-tvm-ffi",
    )
    compiled_postprocess = cute.compile(
        postprocess, dq_accum, dqs, 1.0, stream, options="--enable-tvm-ffi"
    )
    return compiled_backward, compiled_postprocess


def workspaces(
    groups: Sequence[Group], causal: bool, scratch: Scratch | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The unit statistics ``[U, 1, L_rounded]`` (LSE * log2(e), dPsum) and the dQ accumulator
    ``[U, 1, L_rounded * d]``, float32 (``L_rounded``: ``L`` up to FA4's backward ``tile_m``),
    from ``scratch(tag, shape)`` (the memory manager's) or new."""
    q0 = groups[0][1]
    return _workspaces(
        _shapes(_units(groups), q0.shape[1], q0.shape[3], causal), q0.device, scratch
    )


def _units(groups: Sequence[Group]) -> int:
    return sum(q.shape[0] * q.shape[2] for _, q, *_ in groups)


def _shapes(units: int, length: int, head_dim: int, causal: bool) -> tuple[tuple[int, ...], ...]:
    tile_m = _config(head_dim, causal).m_block_size
    rounded = -(-length // tile_m) * tile_m
    return (units, 1, rounded), (units, 1, rounded), (units, 1, rounded * head_dim)


def _workspaces(
    shapes: tuple[tuple[int, ...], ...], device: torch.device, scratch: Scratch | None
) -> tuple[Tensor, Tensor, Tensor]:
    if scratch is None:
        scratch = lambda tag, shape: torch.empty(  # noqa: E731
            shape, dtype=torch.float32, device=device
        )
    tags = ("group_bwd_lse_log2", "group_bwd_dpsum", "group_bwd_dq_accum")
    lse_log2, dpsum, dq_accum = (scratch(tag, shape) for tag, shape in zip(tags, shapes))
    return lse_log2, dpsum, dq_accum


def backward_group_(
    groups: Sequence[Group],
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    index: Tensor,
    causal: bool,
    scale: float,
    scratch: Scratch | None = None,
    shifts: Sequence[tuple[int, ...]] = (),
) -> bool:
    """Every group's dq, dk, dv <- the backward of attention(q, k, v) given the merged ``out``
    and ``lse`` (``[b, n, h, d]`` / ``[b, n, h]``, contiguous; ``index``: the groups' units'
    positions in ``lse``, :func:`ringattn.launches.packed`), and 0 into ``shifted(x, s)`` of
    each of its dq, dk, dv for each ``s`` of the group's ``shifts`` (its config's unselected
    rows; none where empty), as four launches, its workspaces from ``scratch``
    (:func:`workspaces`). False where not usable (the caller launches the groups' backwards
    itself, and writes those zeros)."""
    key = _key(groups, causal, shifts)
    if not ENABLED or _COMPILED.get(key) is False:  # (refused: no workspaces to allocate)
        return False
    stats = workspaces(groups, causal, scratch)
    length = groups[0][1].shape[1]

    def run(kernels: Kernels) -> None:
        _run(kernels, lambda full: groups, stats, out, dout, lse, index, length, scale)

    def first_call() -> bool:
        neighbours = [
            shifted(grad, s)
            for group, group_shifts in zip(groups, key[4], strict=True)
            for grad in group[6:]
            for s in group_shifts
        ]
        for x in neighbours:
            x.fill_(float("nan"))  # a kernel that skips its zeros cannot pass
        try:
            kernels = _compile(key, groups, stats)
            run(kernels)
        except Exception as exc:  # the CuTe DSL or this FA4 version rejects the kernels
            _refuse(key, f"{type(exc).__name__}: {exc}")
            return False
        if not all(bool((x == 0).all()) for x in neighbours):
            _refuse(key, "an unselected row's gradient not zeroed")
            return False
        errors = []  # each group's gradients against FA4's own backward of it
        for dout_g, q, k, v, out_g, lse_g, dq, dk, dv in groups:
            assert out_g is not None and lse_g is not None  # (a first call's groups are full)
            want = fa4.backward(dout_g, q, k, v, out_g, lse_g, causal, scale)
            for got, ref in zip((dq, dk, dv), want, strict=True):
                norm = ref.float().norm().clamp_min(1e-30)
                errors.append(float((got.float() - ref.float()).norm() / norm))
        # each error on its own: a running max() drops a NaN that does not come first
        if all(error <= 1e-3 for error in errors):
            _COMPILED[key] = kernels
            return True
        worst = next((e for e in errors if e != e), max(errors))  # a NaN, or the largest
        _refuse(key, f"gradients off by {worst:.3g} (relative)")
        return False  # (the caller rewrites every group's gradients)

    return fa4.call_guarded(_COMPILED, _LOCK, key, groups[0][1], first_call, run)


def grouper(
    groups: Sequence[Group],
    causal: bool,
    scratch: Scratch | None = None,
    shifts: Sequence[tuple[int, ...]] = (),
) -> Callable[[GroupsOf, Tensor, Tensor, Tensor, Tensor, float], bool]:
    """:func:`backward_group_` for views of these (example) groups' layouts, as ``call(groups_of,
    out, dout, lse, index, scale)``, the compile key decided here once (a prepared launch calls
    it every backward: ``ringattn.core``). Once its kernels are kept, a call asks
    ``groups_of(False)`` for the views only after launching the statistics (the GPU starts on
    them while the host makes the views), and without out and lse (only the statistics read
    them, from the whole tensors); until then ``groups_of(True)`` goes to
    :func:`backward_group_` (``shifts``: as there)."""
    key = _key(groups, causal, shifts)
    length, device = groups[0][1].shape[1], groups[0][1].device
    # (its shapes, not the example views: those are not kept alive)
    shape = (_units(groups), length, groups[0][1].shape[3])

    def call(
        groups_of: GroupsOf, out: Tensor, dout: Tensor, lse: Tensor, index: Tensor, scale: float
    ) -> bool:
        kernels = _COMPILED.get(key)
        if kernels is False or not ENABLED:
            return False
        if kernels is None:  # the first call: compiled, checked, kept or refused
            return backward_group_(
                groups_of(True), out, dout, lse, index, causal, scale, scratch, shifts
            )
        stats = _workspaces(_shapes(*shape, causal), device, scratch)
        _run(kernels, groups_of, stats, out, dout, lse, index, length, scale)
        return True

    return call


def _run(
    kernels: Kernels,
    groups_of: GroupsOf,
    stats: tuple[Tensor, Tensor, Tensor],
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    index: Tensor,
    length: int,
    scale: float,
) -> None:
    """The four launches: the statistics and the accumulator's zeros first, then the groups'
    views (made now: ``groups_of(False)``), the backward and the postprocess."""
    backward, postprocess = kernels
    lse_log2, dpsum, dq_accum = stats
    unit_stats_(out, dout, lse, index, length, dpsum.squeeze(1), lse_log2.squeeze(1))
    dq_accum.zero_()
    douts, qs, ks, vs, _, _, dqs, dks, dvs = zip(*groups_of(False))
    backward(qs, ks, vs, douts, lse_log2, dpsum, dq_accum, dks, dvs, dqs, scale)
    postprocess(dq_accum, dqs, scale)


def _refuse(key: Key, why: str) -> None:
    global last_refusal
    last_refusal = fa4.refuse(
        _COMPILED,
        key,
        why,
        "FA4's backward over several configs in one launch",
        "each config's blocks take their own FA4 backward",
    )


__all__ = [
    "ALL_TILES_MAX",
    "Group",
    "GroupsOf",
    "Scratch",
    "backward_group_",
    "grouper",
    "supported",
    "workspaces",
]
