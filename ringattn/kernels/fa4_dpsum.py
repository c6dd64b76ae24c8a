"""FA4's backward handed each row's ``dPsum`` instead of reading ``O`` and ``dO`` to form it.

Why: FA4's backward launcher runs a preprocess before its main kernel that reads the block's
``O`` and ``dO`` rows and forms ``dPsum = rowsum(O∘dO) − dLSE`` (its ``dLSE``: a gradient flowing
into the LSE, which ringattn's blocks never have), zeroes its float32 dQ accumulator and scales
the LSE. Under ``mixing="lse"`` every config's block is handed the merged output, so the same
sums were formed once per config selecting a (row, head): issue 5's plan read ``O`` and ``dO``
1.94 times over per backward, about half of the preprocess's 4.6–6% of the 131K
forward+backward on an H200 (``docs/benchmarks/h200_perf.md``, step 29). Now the core forms them
once, negated, for every (row, head) (:func:`ringattn.kernels.dpsum.minus_dpsum`), gathers each
launch's rows with its LSE's (``ringattn.core``), and hands them to FA4's backward as its
``dLSE``, compiled here with the preprocess's ``O`` / ``dO`` loads swapped for zero fills (its
module's ``copy_utils.copy``, which the preprocess uses for those loads only): it forms ``0 −
dLSE`` then, the given sums, and still zeroes the accumulator and scales the LSE. Into a compile
cache of its own (:func:`given_dpsum_kernels`), so FA4's own calls with a ``dLSE`` keep theirs.

Guarded like :mod:`ringattn.kernels.fa4_add`: the first call of each signature runs FA4's
backward with the given sums and without, and keeps the swap only if the gradients agree; a swap
that fails to compile or to agree is refused with a warning and never used again in this process
(the launches then form their own sums). SM90 only, as the other swaps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import cache
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ringattn.kernels import fa4

# the switch, read on every backward (by sdpa's shares_backward_dpsum: the core forms no sums)
# and every launch (given sums ignored): False has every launch form its own
ENABLED = True

# signature -> True (kept) / False (refused); missing: not tried yet
_CHECKED: dict[fa4.BackwardSignature, bool] = {}
# why the latest swap was refused (for probes)
last_refusal: str | None = None


@contextmanager
def given_dpsum_kernels() -> Iterator[None]:
    """While inside: FA4's backward launcher compiles and finds its preprocess without the ``O``
    / ``dO`` loads (``dPsum = −dLSE``), in a compile cache of its own."""
    with fa4.swapped_kernels(
        "_bwd_preprocess",
        "ringattn_given_dpsum_preprocess",
        "flash_attn.cute.flash_bwd_preprocess",
        "copy_utils",
        _unloading,
    ):
        yield


def _zeros_for(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
    """The preprocess's ``O`` / ``dO`` load of ``src`` into the registers ``dst``, as zeros."""
    dst.fill(0.0)


@cache
def _unloading(copy_utils: ModuleType) -> SimpleNamespace:
    """``copy_utils`` whose ``copy`` fills its destination with zeros."""
    return SimpleNamespace(**{**vars(copy_utils), "copy": _zeros_for})


@cache
def with_given_dpsum(
    kernels: Callable[[], AbstractContextManager[None]] | None,
) -> Callable[[], AbstractContextManager[None]]:
    """``kernels`` (a context manager factory for ``fa4.backward``, or None: FA4's own) with
    :func:`given_dpsum_kernels` inside it; named for the replays' keys."""

    @contextmanager
    def given() -> Iterator[None]:
        with ExitStack() as stack:
            if kernels is not None:
                stack.enter_context(kernels())
            stack.enter_context(given_dpsum_kernels())  # (looked up here: the tests' stand-in)
            yield

    given.__name__ = "given_dpsum" if kernels is None else f"{kernels.__name__}+given_dpsum"
    return given


def supported(q: Tensor) -> bool:
    """Whether FA4's backward may take given sums for blocks like ``q`` here: an SM90 GPU."""
    return fa4.sm90(q)


def usable(
    minus_dpsum: Tensor | None,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
) -> Tensor | None:
    """``minus_dpsum`` (the block's ``−rowsum(out∘dout)`` rows, ``[B, L, H]``) where FA4's
    backward may take it as its ``dLSE`` for blocks like these, else None (FA4 then forms the sums
    itself). A signature's first call checks the swap (not while a CUDA graph is captured: the
    check syncs; None until a later call has checked it)."""
    if minus_dpsum is None or not ENABLED or q.numel() == 0:
        return None
    key = fa4.backward_signature(q, causal)
    kept = _CHECKED.get(key)
    if kept is None:
        if fa4.capturing(q):
            return None
        kept = _first_call(key, dout, q, k, v, out, lse, causal, scale)
    return minus_dpsum if kept else None


def _first_call(
    key: fa4.BackwardSignature,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
) -> bool:
    """FA4's backward with given sums and without, into temporaries; keep the swap only if
    their gradients agree. On these blocks with ``out`` and ``dout`` of random values: the
    caller's may make gradients vanish exactly (a row that sees one key has ``out`` equal to its
    value row, so dP equals dPsum), where the given sums' float32 rounding would be all of the
    difference."""
    global last_refusal
    # (on a few leading entries: fa4.CHECKED_BATCH)
    dout, q, k, v, out, lse = fa4.first_entries(dout, q, k, v, out, lse)
    gen = torch.Generator(device=q.device).manual_seed(0)
    out, dout = (
        torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) for x in (out, dout)
    )
    minus_dpsum = torch.linalg.vecdot(out.float(), dout.float()).neg_()
    try:
        given = fa4.backward(dout, q, k, v, out, lse, causal, scale, dlse=minus_dpsum)
    except Exception as exc:  # the CuTe DSL or this FA4 version rejects the swap
        why = f"it failed to compile or launch ({type(exc).__name__}: {exc})"
    else:
        own = fa4.backward(dout, q, k, v, out, lse, causal, scale)
        errors = [
            ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
            for a, b in zip(given, own, strict=True)
        ]
        # the sums differ in their order of addition only, the gradients by FA4's atomic dQ
        # order and a rounding here and there: two units in the last place, over each whole
        # gradient (a preprocess that still adds its own sums, or loads something other than
        # zeros, is off by O(1)), at least 2**-16 (float32 blocks, which only the tests'
        # stand-in takes: its own sums are float64); each on its own (max() of several dropped
        # a NaN behind a finite error)
        bound = max(2 * torch.finfo(q.dtype).eps, 2.0**-16)
        if all(error <= bound for error in errors):
            _CHECKED[key] = True
            return True
        worst = ", ".join(f"{n} {e:.3g}" for n, e in zip(("dQ", "dK", "dV"), errors, strict=True))
        why = f"its gradients disagreed with FA4's own (relative errors {worst})"
    last_refusal = fa4.refuse(
        _CHECKED,
        key,
        why,
        "FA4's backward taking each row's dPsum as given",
        "each launch forms its own",
    )
    return False
