"""A placed block's forward as one FA4 kernel that also zeroes the rows its config leaves out.

Why: under ``mixing="head_groups"`` a config ``(w, r)`` with offset ``o`` writes rows ``p mod r
== o`` of its heads and the definition leaves the others at 0; the core zeroed those with one
memory-bound pass over the output before the blocks (``ringattn.kernels.unselected``), 9% of the
causal forward's GPU time at 131K tokens on an H200 (``docs/benchmarks/h200_perf.md``, step 22).
:mod:`ringattn.kernels.fa4_zero_sm90` writes them from FA4's own epilogue instead, as stores
issued at the end of each compute-bound tile; this module compiles and launches it (with
:func:`ringattn.kernels.fa4_merge.compile_forward`: the LSE views are strided, as there).

A launch is handed the output rows of a block of *full* segments and the ``shifts`` (elements)
from each selected row to the rest of its stride group: ``(k - o) * stride_n`` for ``k != o``,
all inside the output (:func:`ringattn.core.neighbour_shifts`).

Held to FA4's plain forward: the first call of each compiled kernel fills the neighbour rows of
its blocks' first entries (``fa4.CHECKED_BATCH``) with NaN, runs it on those, and keeps it only
if their rows and LSE agree with FA4's forward and every neighbour is 0, then launches it on the
call's blocks; a kernel that fails to compile or to agree is not used again in this process
(with a warning that says why), and the call's result is written by the plain path. SM90 only.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

from ringattn.kernels import fa4, fa4_merge
from ringattn.kernels.unselected import shifted

# the A/B switch (experiments/fa4_probe.py --part zero): read when a module prepares its launches
# (False: they leave the zeros to the core's fill) and on every call (False: declined, and the
# launch zeroes the rows itself)
ENABLED = True

# a compile key: fa4_merge's (or the no-LSE one), then the shifts (of mixed types: the dtype,
# ints, flags, the tile configuration)
_Key = tuple[Any, ...]
# a compiled kernel, as launch(q, k, v, out, lse_bhl, scale) (fa4_merge.compile_forward's)
_Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, "Tensor | None", float], object]

# compiled kernels by key (fa4_merge's key with the shifts); False: failed to compile or agree
_COMPILED: dict[_Key, _Kernel | Literal[False]] = {}
_LOCK = threading.Lock()
# why the latest kernel was refused (for probes)
last_refusal: str | None = None


def supported(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None, shifts: tuple[int, ...]
) -> bool:
    """Whether the kernel takes these blocks here: an SM90 GPU with FA4, layouts
    :func:`ringattn.kernels.fa4_merge.layout_ok` accepts, and shifts that keep the output's
    16-byte vector stores aligned."""
    aligned = all(shift * q.element_size() % 16 == 0 for shift in shifts)
    return bool(shifts) and aligned and fa4.sm90(q) and fa4_merge.layout_ok(q, k, v, out, lse)


def _key(q: Tensor, causal: bool, lse: Tensor | None, shifts: tuple[int, ...]) -> _Key:
    if lse is None:
        return q.dtype, q.shape[-1], causal, "no lse", fa4.FORWARD_CONFIG.get(causal), shifts
    return *fa4_merge._key(q, causal, lse), shifts


def forward_zero_(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    out: Tensor,
    lse: Tensor | None,
    shifts: tuple[int, ...],
) -> bool:
    """``out``, ``lse`` (``[B, L, H, d]`` / ``[B, L, H]`` views; lse may be None) <-
    attention(q, k, v), and 0 into ``shifted(out, s)`` for every ``s`` in ``shifts``, as one
    kernel. False where that kernel is not usable: the caller runs the plain forward and zeroes
    the neighbours itself (nothing written, but for a refused first call's checked entries,
    which those then overwrite)."""
    if not ENABLED:
        return False
    key = _key(q, causal, lse, shifts)
    q, k, v, out = (fa4_merge._unit_dims_restrided(x) for x in (q, k, v, out))
    lse_bhl = None if lse is None else fa4_merge._unit_dims_restrided(lse).transpose(1, 2)
    return fa4.call_guarded(
        _COMPILED,
        _LOCK,
        key,
        q,
        lambda: _first_call(key, q, k, v, causal, scale, out, lse_bhl),
        lambda kernel: kernel(q, k, v, out, lse_bhl, scale),
    )


def zeroer(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    out: Tensor,
    lse: Tensor | None,
    shifts: tuple[int, ...],
) -> Callable[..., bool]:
    """:func:`forward_zero_` for views of these (example) views' layouts, as ``call(q, k, v,
    scale, out, lse)``, with the compile key and the re-striding decided here once (a prepared
    launch calls it every forward: ``ringattn.core.placing_launch``)."""
    key = _key(q, causal, lse, shifts)
    restride = any(0 in x.stride() for x in (q, k, v, out, lse) if x is not None)

    def call(
        q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor, lse: Tensor | None
    ) -> bool:
        kernel = _COMPILED.get(key)
        if not kernel or restride or not ENABLED:  # first call, refused, off, or unusual
            return forward_zero_(q, k, v, causal, scale, out, lse, shifts)
        kernel(q, k, v, out, None if lse is None else lse.transpose(1, 2), scale)
        return True

    return call


def _compile(
    key: _Key, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_bhl: Tensor | None
) -> _Kernel:
    sm90 = importlib.import_module("ringattn.kernels.fa4_zero_sm90")
    kernel_class = functools.partial(sm90.ZeroingForwardSm90, zero_shifts=key[-1])
    return fa4_merge.compile_forward(key, q, k, v, out, lse_bhl, kernel_class, sm90.__file__)


def _first_call(
    key: _Key,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    out: Tensor,
    lse_bhl: Tensor | None,
) -> bool:
    """Compile ``key``'s kernel, hold it to FA4's plain forward on the blocks' first entries
    (:func:`_checked`) and, where kept, launch it on the call's blocks. False where it was
    refused: the caller's plain path then writes the call's rows, LSE and zeros, the checked
    entries' (which the check may have left written or NaN) included."""
    kernel = _checked(key, fa4.first_entries(q, k, v, out, lse_bhl), causal, scale)
    if kernel is None:
        return False
    kernel(q, k, v, out, lse_bhl, scale)
    return True


def _checked(
    key: _Key,
    blocks: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None],
    causal: bool,
    scale: float,
) -> _Kernel | None:
    """``key``'s kernel compiled and run on ``blocks`` (q, k, v, out, ``[B, H, L]`` LSE or None:
    a few entries, for a whole block's copies here took GBs at 2M tokens) with their neighbour
    rows poisoned, then held to FA4's plain forward: the kernel where the rows and LSE agree and
    every neighbour is 0, else None (refused: recorded as False, not used again)."""
    q, k, v, out, lse_bhl = blocks
    neighbours = [shifted(out, shift) for shift in key[-1]]
    for x in neighbours:
        x.fill_(float("nan"))  # a kernel that skips its zeros cannot pass
    try:
        kernel = _compile(key, q, k, v, out, lse_bhl)
        kernel(q, k, v, out, lse_bhl, scale)
    except Exception as exc:  # the CuTe DSL or this FA4 version rejects the kernel
        _refuse(key, f"it failed to compile or launch ({type(exc).__name__}: {exc})")
        return None
    out_ref, lse_ref = fa4.forward(q, k, v, causal, scale)
    out_ok, out_err = fa4.output_agrees(out, out_ref)
    lse_ok = lse_bhl is None or fa4.lse_agrees(lse_bhl.transpose(1, 2), lse_ref)
    zeros_ok = all(bool((x == 0).all()) for x in neighbours)
    if not (out_ok and lse_ok and zeros_ok):
        _refuse(
            key,
            f"it disagreed with FA4's forward (output error {out_err:.3g}, LSE "
            f"{'ok' if lse_ok else 'wrong'}, neighbour zeros {'ok' if zeros_ok else 'wrong'})",
        )
        return None
    _COMPILED[key] = kernel
    return kernel


def _refuse(key: _Key, why: str) -> None:
    global last_refusal
    last_refusal = fa4.refuse(
        _COMPILED,
        key,
        why,
        "FA4's forward with the unselected rows' zeros in its epilogue",
        "placed blocks take FA4's forward and the core zeroes the rows they leave out",
    )
