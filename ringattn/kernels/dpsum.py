"""A Triton kernel for the ``lse`` backward's row sums ``rowsum(O∘dO)``, once for all configs.

Why: FA4's backward starts with a preprocess that reads a block's ``O`` and ``dO`` rows to form
``dPsum = rowsum(O∘dO)`` (the ``D`` of ``dS = P∘(dP − D)``), besides zeroing its dQ accumulator
and scaling the LSE. Under ``mixing="lse"`` every config's block is handed the *merged* output
and LSE (its gradients are the merged attention's), so a (row, head) that ``k`` configs select
has the same sum formed ``k`` times: issue 5's plan reads ``O`` and ``dO`` 1.94 times over per
backward, and the preprocess took 4.6% of the non-causal 131K forward+backward on an H200, 6% of
the causal (``docs/benchmarks/h200_perf.md``, step 29). Here the sums are formed once for every
(row, head), negated (FA4's preprocess takes them as its ``dLSE``:
:mod:`ringattn.kernels.fa4_dpsum`), in the LSE's layout, so :func:`ringattn.launches.gather`
lays out each launch's rows with the LSE's positions (``ringattn.core``).

One program per ``(batch, row)``: all its heads and channels, products and sums in float32 (as
FA4's preprocess forms them). Runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ringattn.kernels.merge import available, triton

# the products are formed in float32: float64 operands would lose digits (FA4 takes none)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if triton is not None:
    import triton.language as tl

    from ringattn.kernels.merge import head_lanes

    # (the kernels here are unannotated: @triton.jit reads a parameter's annotation as its
    # Triton type, `int` as i32)
    @triton.jit
    def _minus_dpsum_kernel(  # type: ignore[no-untyped-def]
        out_ptr,
        dout_ptr,
        into_ptr,
        N,
        H,
        D,
        o_s0,
        o_s1,
        o_s2,
        o_s3,
        g_s0,
        g_s1,
        g_s2,
        g_s3,
        i_s0,
        i_s1,
        i_s2,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # (int64: element offsets pass 2**31 at ~1M tokens)
        bi, ni = row // N, row % N
        heads = head_lanes(BLOCK_H)
        chans = tl.arange(0, BLOCK_D)
        hmask = heads < H
        mask = hmask[:, None] & (chans[None, :] < D)
        o_off = bi * o_s0 + ni * o_s1 + heads[:, None] * o_s2 + chans[None, :] * o_s3
        g_off = bi * g_s0 + ni * g_s1 + heads[:, None] * g_s2 + chans[None, :] * g_s3
        o = tl.load(out_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dout_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        total = tl.sum(o * g, axis=1)
        tl.store(into_ptr + bi * i_s0 + ni * i_s1 + heads * i_s2, -total, mask=hmask)


def minus_dpsum(out: Tensor, dout: Tensor, lse: Tensor) -> Tensor | None:
    """``−rowsum(out∘dout)`` over the head dim of ``[b, n, h, d]`` operands (any strides), as a
    contiguous float32 ``[b, n, h]``, laid out as ``lse`` is (so one set of storage positions
    reads both). None where the operands do not fit that (shapes, devices, an LSE that is not
    contiguous, float64: the caller then leaves each launch to form its own). Where the kernel
    cannot run (a CPU without the interpreter), torch's ops form the same sums."""
    if (
        out.dim() != 4
        or dout.shape != out.shape
        or lse.shape != out.shape[:3]
        or out.dtype not in _DTYPES
        or dout.dtype != out.dtype
        or not lse.is_contiguous()
        or lse.device != out.device
        or dout.device != out.device
    ):
        return None
    if not available(out):  # (a float32 copy of both: the CPU's tests only)
        sums: Tensor = torch.linalg.vecdot(out.float(), dout.float()).neg_().contiguous()
        return sums
    into = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    b, n, h, d = out.shape
    if b * n == 0 or h == 0:
        return into
    if d == 0:
        return into.zero_()
    _minus_dpsum_kernel[(b * n,)](
        out,
        dout,
        into,
        n,
        h,
        d,
        *out.stride(),
        *dout.stride(),
        *into.stride(),
        BLOCK_H=triton.next_power_of_2(h),
        BLOCK_D=triton.next_power_of_2(d),
    )
    return into


__all__ = ["minus_dpsum"]
