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
``dk`` / ``dv``. dQ still comes out of FA4's float32 workspace through its postprocess kernel (a
plain store) and is added by :mod:`ringattn.kernels.add`, one tensor instead of three.

The sum rounds like the add kernel's: the block's gradient rounded to bf16, added, the sum
rounded once. Guarded like :mod:`ringattn.kernels.fa4_merge`: the first call of each signature
runs the adding kernel and the plain one on the same operands and keeps the adding one only if
they agree; a kernel that fails to compile or to agree is refused with a warning and never used
again in this process. SM90 only (the swap is in FA4's SM90 backward module).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from functools import cache
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ringattn.kernels import fa4

# the A/B switch, read on every call: False adds dK and dV with the add kernel as well
ENABLED = True

# signature -> True (kept) / False (refused); missing: not tried yet
_CHECKED: dict[tuple, bool] = {}
# the adding backward's compiled kernels, apart from FA4's own: FA4's JIT cache under a name of
# their own (on disk where FA4's cache is, FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1), or a dict
# where FA4 has no such cache (its stand-in in the tests)
_CACHE: dict = {}


@cache
def _adding_cache():
    try:
        cache_utils = importlib.import_module("flash_attn.cute.cache_utils")
    except ImportError:
        return _CACHE
    return cache_utils.get_jit_cache("ringattn_adding_backward")


# why the latest kernel was refused (for probes)
last_refusal: str | None = None


@contextmanager
def adding_kernels():
    """While inside: FA4's backward launcher compiles and finds its main kernel with the dK and
    dV stores as TMA reduce-adds (its SM90 module's only TMA stores to global memory)."""
    interface = importlib.import_module("flash_attn.cute.interface")
    sm90: Any = importlib.import_module("flash_attn.cute.flash_bwd_sm90")  # (its cpasync is set)
    owner, cpasync = interface._flash_attn_bwd, sm90.cpasync
    saved_cache = owner.compile_cache
    owner.compile_cache, sm90.cpasync = _adding_cache(), _reduce_adding(cpasync)
    try:
        yield
    finally:
        owner.compile_cache, sm90.cpasync = saved_cache, cpasync


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
    dk: Tensor,
    dv: Tensor,
) -> Tensor | None:
    """``dk += dK``, ``dv += dV`` of the blocks ``[B, L, H, d]`` (views of the gradients), in
    FA4's kernel; returns the blocks' ``dq`` for the caller to add. None where the adding kernel
    is not usable (nothing was written then; the caller adds all three)."""
    if not ENABLED or q.numel() == 0:  # (FA4 zeroes given gradients of empty blocks)
        return None
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = (q.dtype, q.shape[-1], causal, deterministic, fa4.backward_config(q.shape[-1], causal))
    kept = _CHECKED.get(key)
    if kept is False:
        return None
    if kept is None:
        if fa4.capturing(q):
            return None  # the first call syncs to check the kernel
        return _first_call(key, dout, q, k, v, out, lse, causal, scale, dk, dv)
    grads = (None, dk, dv)
    return fa4.backward(dout, q, k, v, out, lse, causal, scale, grads, adding_kernels)[0]


def _first_call(key, dout, q, k, v, out, lse, causal, scale, dk: Tensor, dv: Tensor):
    """Run the adding kernel, then restore the gradients and hold its sums to the plain
    kernel's; keep it only if they agree. The gradients are left untouched either way (None:
    the caller adds this call's three)."""
    dk_old, dv_old = dk.clone(), dv.clone()
    try:
        grads = (None, dk, dv)
        fa4.backward(dout, q, k, v, out, lse, causal, scale, grads, adding_kernels)
    except Exception as exc:  # the CuTe DSL or this FA4 version rejects the swap
        dk.copy_(dk_old), dv.copy_(dv_old)
        return _refuse(key, f"it failed to compile or launch ({type(exc).__name__}: {exc})")
    dk_added, dv_added = dk.clone(), dv.clone()
    dk.copy_(dk_old), dv.copy_(dv_old)
    _, dk_block, dv_block = fa4.backward(dout, q, k, v, out, lse, causal, scale)
    errors = [
        (added.float() - (old.float() + block.float())).abs().max().item()
        / max((old.float() + block.float()).abs().max().item(), 1e-30)
        for added, old, block in ((dk_added, dk_old, dk_block), (dv_added, dv_old, dv_block))
    ]
    # the sums round once in either path; 4 units in the last place of the largest value (each
    # error on its own: max() of the two dropped a NaN in dV behind a finite dK error)
    if all(error <= 4 * torch.finfo(dk.dtype).eps for error in errors):
        _CHECKED[key] = True
    else:
        worst = ", ".join(f"{error:.3g}" for error in errors)
        _refuse(key, f"its sums disagreed with the add kernel's (relative errors dK, dV {worst})")
    return None


def _refuse(key: tuple, why: str) -> None:
    global last_refusal
    last_refusal = fa4.refuse(
        _CHECKED,
        key,
        why,
        "FA4's backward adding dK and dV in its kernel",
        "merged blocks add their gradients with the add kernel",
    )
