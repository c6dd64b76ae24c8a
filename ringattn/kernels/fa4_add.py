"""A merged block's backward with its dK and dV *added* into the gradients by FA4's kernel.

Why: under ``mixing="lse"`` every block after the first adds its ``(dq, dk, dv)`` into the
gradients; FA4's backward wrote them to temporaries and :mod:`ringattn.kernels.add` read them
back with the gradient rows and wrote the sums: 6% of the causal forward+backward's GPU time at
131K (``docs/benchmarks/h200_perf.md``, step 23). FA4's SM90 backward writes each dK / dV tile
from shared memory with a TMA store; Hopper's TMA also has a reduce-add form of that store
(``cp.reduce.async.bulk.tensor.add``, bf16/fp16 included), which adds the tile into global
memory in the L2, with no extra pass and nothing for the SMs to wait on. So here FA4's own
launcher compiles its backward with that one op swapped (:func:`adding_kernels`: its module's
``cpasync`` namespace answers ``CopyBulkTensorTileS2GOp`` with ``CopyReduceBulkTensorTileS2GOp``
while it compiles, into a compile cache of its own), and is handed the gradients' rows as its
``dk`` / ``dv``. dQ comes out of FA4's float32 workspace through its postprocess kernel, a plain
store that :mod:`ringattn.kernels.add` then read back with the gradient's rows to add: at 131K
~2 GB moved, ~2.5% of the causal forward+backward (step 63's estimate). So where the caller hands
over dQ's rows too, the postprocess is swapped as well (:func:`adding_all_kernels`: FA4's
interface compiles :class:`~ringattn.kernels.fa4_group_bwd_sm90.AddingPostprocessSm90`, its own
postprocess whose last step adds the tile into the rows, into a cache of its own), and all three
gradients are added by FA4's launches. ``ADD_DQ`` is its A/B switch.

The sum rounds like the add kernel's: the block's gradient rounded to bf16, added, the sum
rounded once. Guarded like :mod:`ringattn.kernels.fa4_merge`: the first call of each signature
runs the adding kernels and the plain ones on its blocks' first entries (``fa4.CHECKED_BATCH``)
and keeps the adding ones only if they agree, then goes on with what it kept; a kernel that
fails to compile or to agree is refused with a warning and never used again in this process
(dQ's adding postprocess is guarded apart: refused, dK and dV may still be added). SM90 only
(the swaps are in FA4's SM90 modules).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ringattn.kernels import fa4, fa4_dpsum

# the A/B switch, read on every call: False adds dK and dV with the add kernel as well
ENABLED = True
# dQ added by FA4's postprocess where the caller gives its rows (False: returned for the add
# kernel, as before h200_perf.md step 64); read on every call
ADD_DQ = True

# signature (fa4.backward_signature; dQ's postprocess: with "dq" after it) -> True (kept) /
# False (refused); missing: not tried yet
_CHECKED: dict[tuple[object, ...], bool] = {}


# why the latest kernel was refused (for probes)
last_refusal: str | None = None


@contextmanager
def adding_kernels() -> Iterator[None]:
    """While inside: FA4's backward launcher compiles and finds its main kernel with the dK and
    dV stores as TMA reduce-adds (its SM90 module's only TMA stores to global memory)."""
    sm90 = "flash_attn.cute.flash_bwd_sm90"  # (its cpasync is set)
    with fa4.swapped_kernels(
        "_flash_attn_bwd", "ringattn_adding_backward", sm90, "cpasync", _reduce_adding
    ):
        yield


@contextmanager
def adding_all_kernels() -> Iterator[None]:
    """As :func:`adding_kernels`, and FA4's launcher compiles and finds its dQ postprocess as
    :class:`~ringattn.kernels.fa4_group_bwd_sm90.AddingPostprocessSm90` (adding the tile into
    the ``dq`` it is given; FA4 runs no other postprocess for blocks with one key head per query
    head, which is what ringattn hands it)."""
    sm90: Any = importlib.import_module("ringattn.kernels.fa4_group_bwd_sm90")
    with (
        fa4.swapped_kernels(
            "_bwd_postprocess_convert",
            "ringattn_adding_postprocess",
            "flash_attn.cute.interface",
            "FlashAttentionBackwardPostprocess",
            lambda own: sm90.AddingPostprocessSm90,
        ),
        adding_kernels(),
    ):
        yield


@cache
def _reduce_adding(cpasync: ModuleType) -> SimpleNamespace:
    """``cpasync`` whose ``CopyBulkTensorTileS2GOp`` is its TMA reduce-add op."""
    adding = SimpleNamespace(**vars(cpasync))
    adding.CopyBulkTensorTileS2GOp = cpasync.CopyReduceBulkTensorTileS2GOp
    return adding


def supported(q: Tensor) -> bool:
    """Whether the adding backward may take blocks like ``q`` here: an SM90 GPU with FA4."""
    return fa4.sm90(q)


def backward_add_(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    dq: Tensor | None,
    dk: Tensor,
    dv: Tensor,
    dlse: Tensor | None = None,
) -> tuple[Tensor, ...] | None:
    """``dk += dK``, ``dv += dV`` and, where ``dq`` is given (and ``ADD_DQ``), ``dq += dQ`` of
    the blocks ``[B, L, H, d]`` (views of the gradients), in FA4's kernels. Returns what is left
    for the caller to add: ``()``, or ``(dQ,)`` where dQ's rows were not added here. None where
    the adding kernels are not usable (nothing was written then; the caller adds all three).
    ``dlse``: the rows' ``−rowsum(out∘dout)``, for FA4's preprocess to take where it may
    (``ringattn.kernels.fa4_dpsum``)."""
    if not ENABLED or q.numel() == 0:  # (FA4 zeroes given gradients of empty blocks)
        return None
    key = fa4.backward_signature(q, causal)
    dq_key = (*key, "dq")
    if _CHECKED.get(key) is False:
        return None
    adds_dq = dq is not None and ADD_DQ and _CHECKED.get(dq_key) is not False
    if key not in _CHECKED or (adds_dq and dq_key not in _CHECKED):
        if fa4.capturing(q):
            return None  # the first call syncs to check the kernels
        # checked on the blocks' first entries (fa4.CHECKED_BATCH), then this call goes on
        # with what was kept: checked whole, the block's copies took up to nine of its size
        # beside the call's own memory
        first = fa4.first_entries(dout, q, k, v, out, lse)
        grads = fa4.first_entries(dq, dk, dv)
        _first_call(key, dq_key if adds_dq else None, first, causal, scale, grads)
        if key not in _CHECKED:  # (dQ's postprocess failed in it: dK / dV's kernel alone)
            _first_call(key, None, first, causal, scale, grads)
        if not _CHECKED.get(key):
            return None
        adds_dq = adds_dq and _CHECKED.get(dq_key) is True
    inputs = (dout, q, k, v, out, lse, causal, scale)
    dlse = fa4_dpsum.usable(dlse, *inputs)  # (once the adding kernels are known to be kept)
    if adds_dq:
        fa4.backward(*inputs, (dq, dk, dv), adding_all_kernels, dlse=dlse)
        return ()
    return (fa4.backward(*inputs, (None, dk, dv), adding_kernels, dlse=dlse)[0],)


def _first_call(
    key: fa4.BackwardSignature,
    dq_key: tuple[object, ...] | None,
    inputs: tuple[Tensor, ...],
    causal: bool,
    scale: float,
    grads: tuple[Tensor | None, Tensor, Tensor],
) -> None:
    """Run the adding kernels (dQ's too where ``dq_key``) on ``inputs`` (dout, q, k, v, out,
    lse) into ``grads`` (dq, dk, dv), then restore the gradients and hold their sums to the
    plain kernel's; keep each only if they agree. The gradients are left untouched either
    way."""
    dout, q, k, v, out, lse = inputs
    dq, dk, dv = grads
    adding = [dk, dv] if dq_key is None or dq is None else [dk, dv, dq]
    olds = [grad.clone() for grad in adding]

    def restore() -> None:
        for grad, old in zip(adding, olds, strict=True):
            grad.copy_(old)

    try:
        kernels = adding_kernels if dq_key is None else adding_all_kernels
        into = (dq if dq_key else None, dk, dv)
        fa4.backward(dout, q, k, v, out, lse, causal, scale, into, kernels)
    except Exception as exc:  # the CuTe DSL or this FA4 version rejects the swap
        restore()
        # (with dQ's postprocess in it, only that is known to fail: dK / dV get a check alone)
        _refuse(
            key if dq_key is None else dq_key,
            f"it failed to compile or launch ({type(exc).__name__}: {exc})",
        )
        return
    added = [grad.clone() for grad in adding]
    restore()
    dq_block, dk_block, dv_block = fa4.backward(dout, q, k, v, out, lse, causal, scale)
    blocks = [dk_block, dv_block, dq_block][: len(adding)]
    errors = [
        (got.float() - (old.float() + block.float())).abs().max().item()
        / max((old.float() + block.float()).abs().max().item(), 1e-30)
        for got, old, block in zip(added, olds, blocks, strict=True)
    ]
    # the sums round once in either path; 4 units in the last place of the largest value (each
    # error on its own: max() of the two dropped a NaN in dV behind a finite dK error)
    agree = [error <= 4 * torch.finfo(dk.dtype).eps for error in errors]
    names = ("dK", "dV", "dQ")[: len(adding)]
    worst = ", ".join(f"{name} {error:.3g}" for name, error in zip(names, errors, strict=True))
    why = f"its sums disagreed with the add kernel's (relative errors {worst})"
    if all(agree[:2]):
        _CHECKED[key] = True
    else:  # (dQ's postprocess then stays untried: it runs only beside the dK / dV kernel)
        _refuse(key, why)
    if dq_key is not None and all(agree[:2]):
        if agree[2]:
            _CHECKED[dq_key] = True
        else:
            _refuse(dq_key, why)


def _refuse(key: tuple[object, ...], why: str) -> None:
    global last_refusal
    adds = "dQ in its postprocess" if key[-1] == "dq" else "dK and dV in its kernel"
    last_refusal = fa4.refuse(
        _CHECKED,
        key,
        why,
        f"FA4's backward adding {adds}",
        "merged blocks add those gradients with the add kernel",
    )
