"""A one-pass Triton kernel for the LSE merge of one block into the accumulators.

The merge is memory-bound: done with eager torch ops it reads and writes the block's rows of the
``[b, n, h, d]`` accumulator about eight times (``logaddexp``, ``exp``, ``mul_``, ``add_``, ...).
This kernel reads the accumulator rows, the block's output and both LSEs once and writes the merged
rows once, in the accumulator's dtype (the arithmetic is float32). All tensors are strided 5-D views
``[b, S, L, H, d]`` (LSEs ``[b, S, L, H]``) exactly as :meth:`ringattn.pattern.Block.rows` makes
them, so nothing is copied to make them contiguous.

It runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
:func:`ringattn.merge.merge_into_` decides when to use it.
"""

from __future__ import annotations

import os

from torch import Tensor

try:
    import triton as triton  # (re-exported: the other Triton kernels' modules take it from here)
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional (CPU-only installs)
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# warps per program (one row each). H200, issue 5's lse plan: 2 warps take 0.41 / 3.28 ms of merges
# per forward at 131K / 1M against 0.53 / 4.59 with Triton's default 4; 8 warps 0.88 / 8.24; 2-8
# rows per program no better (experiments/merge_launch.py, docs/benchmarks/h200_perf.md step 18)
WARPS = 2


def available(x: Tensor) -> bool:
    """Whether the kernel can run on ``x``'s device in this process."""
    if triton is None:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


if triton is not None:
    # (the kernels here are unannotated: @triton.jit reads a parameter's annotation as its
    # Triton type, `int` as i32)
    @triton.jit
    def program_row(S, L):  # type: ignore[no-untyped-def]
        """This program's ``(batch, segment, row)`` of a ``[b, S, L, ...]`` grid, one program per
        row, as int64 (element offsets pass 2**31 at ~1M tokens)."""
        row = tl.program_id(0).to(tl.int64)
        return row // (L * S), (row // L) % S, row % L

    @triton.jit
    def head_lanes(BLOCK_H: tl.constexpr):  # type: ignore[no-untyped-def]
        """A program's head indices ``0 .. BLOCK_H`` as int64, for offsets ``head * stride``:
        in i32 they wrapped past 2**31 while the stride itself still fit i32. The gradients take
        q's layout, and for a transposed ``[b, h, n, d]`` q a job's rows have head stride ``r * n
        * d``: at n = 1M, h = 32, d = 128 an r = 2 job's last head lies 4e9 elements in, and the
        add read and wrote 2**32 elements before it (tests/kernel_cases.py, wide heads)."""
        return tl.arange(0, BLOCK_H).to(tl.int64)

    @triton.jit
    def _merge_rows_kernel(  # type: ignore[no-untyped-def]
        acc_ptr,
        lse_acc_ptr,
        out_ptr,
        lse_ptr,
        S,
        L,
        H,
        D,
        acc_s0,
        acc_s1,
        acc_s2,
        acc_s3,
        acc_s4,
        la_s0,
        la_s1,
        la_s2,
        la_s3,
        o_s0,
        o_s1,
        o_s2,
        o_s3,
        o_s4,
        lo_s0,
        lo_s1,
        lo_s2,
        lo_s3,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (batch, segment, row): all its heads and channels.
        bi, si, li = program_row(S, L)
        heads = head_lanes(BLOCK_H)
        chans = tl.arange(0, BLOCK_D)
        hmask = heads < H
        mask = hmask[:, None] & (chans[None, :] < D)

        la_ptrs = lse_acc_ptr + bi * la_s0 + si * la_s1 + li * la_s2 + heads * la_s3
        lo_ptrs = lse_ptr + bi * lo_s0 + si * lo_s1 + li * lo_s2 + heads * lo_s3
        lse_old = tl.load(la_ptrs, mask=hmask, other=float("-inf")).to(tl.float32)
        lse_new_part = tl.load(lo_ptrs, mask=hmask, other=float("-inf")).to(tl.float32)

        top = tl.maximum(lse_old, lse_new_part)
        top = tl.where(top == float("-inf"), 0.0, top)  # rows selected by nothing yet stay 0
        w_old = tl.exp(lse_old - top)
        w_new = tl.exp(lse_new_part - top)
        total = w_old + w_new
        safe_total = tl.where(total > 0, total, 1.0)
        # -inf where neither side selects the row (and no log(0) evaluated)
        lse_merged = tl.where(total > 0, top + tl.log(safe_total), float("-inf"))
        c_old = w_old / safe_total
        c_new = w_new / safe_total

        acc_ptrs = (
            acc_ptr
            + bi * acc_s0
            + si * acc_s1
            + li * acc_s2
            + heads[:, None] * acc_s3
            + chans[None, :] * acc_s4
        )
        o_ptrs = (
            out_ptr
            + bi * o_s0
            + si * o_s1
            + li * o_s2
            + heads[:, None] * o_s3
            + chans[None, :] * o_s4
        )
        acc = tl.load(acc_ptrs, mask=mask, other=0.0).to(tl.float32)
        part = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
        merged = acc * c_old[:, None] + part * c_new[:, None]
        tl.store(acc_ptrs, merged.to(acc_ptr.dtype.element_ty), mask=mask)
        tl.store(la_ptrs, lse_merged.to(lse_acc_ptr.dtype.element_ty), mask=hmask)


def merge_rows_(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: ``(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out, lse))``.

    ``out_acc, out: [b, S, L, H, d]`` and ``lse_acc, lse: [b, S, L, H]``, any strides.
    """
    b, s, length, h, d = out_acc.shape
    rows = b * s * length
    if rows == 0 or h == 0 or d == 0:
        return
    _merge_rows_kernel[(rows,)](
        out_acc,
        lse_acc,
        out,
        lse,
        s,
        length,
        h,
        d,
        *out_acc.stride(),
        *lse_acc.stride(),
        *out.stride(),
        *lse.stride(),
        BLOCK_H=triton.next_power_of_2(h),
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=WARPS,
    )


__all__ = ["available", "merge_rows_"]
