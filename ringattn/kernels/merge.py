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
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional (CPU-only installs)
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: Tensor) -> bool:
    """Whether the kernel can run on ``x``'s device in this process."""
    if triton is None:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _merge_rows_kernel(
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
        row = tl.program_id(0).to(tl.int64)  # int64: offsets pass 2**31 at ~1M tokens
        li = row % L
        si = (row // L) % S
        bi = row // (L * S)
        heads = tl.arange(0, BLOCK_H)
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


def _arguments(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> tuple[int, list]:
    """The grid size and every argument of the kernel, constexprs last, in its order."""
    b, s, length, h, d = out_acc.shape
    return b * s * length, [
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
        triton.next_power_of_2(h),
        triton.next_power_of_2(d),
    ]


def merge_rows_(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: ``(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out, lse))``.

    ``out_acc, out: [b, S, L, H, d]`` and ``lse_acc, lse: [b, S, L, H]``, any strides.
    """
    _jit_launch(*_arguments(out_acc, lse_acc, out, lse))


def _jit_launch(rows: int, arguments: list):
    """Through Triton's JIT entry point (it binds and specialises the arguments on every call);
    returns the compiled kernel it ran."""
    if rows == 0 or arguments[6] == 0 or arguments[7] == 0:
        return None
    *runtime, block_h, block_d = arguments
    return _merge_rows_kernel[(rows,)](*runtime, BLOCK_H=block_h, BLOCK_D=block_d)


# False: every launch through the JIT entry point (A/B of the prepared launcher below)
FAST_LAUNCH = True


def _layouts(*tensors: Tensor) -> tuple:
    return tuple((x.shape, x.stride()) for x in tensors)


def rows_launcher(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor):
    """A launcher of :func:`merge_rows_` for tensors of these layouts (the eager core prepares
    one per block part, ``ringattn.launches``).

    Triton's JIT entry point binds and specialises all 26 arguments on every call, tens of
    microseconds of host time for a kernel that runs ~10 us at 32K tokens. This launcher does that
    once: its first call goes through the JIT and keeps the compiled kernel, later calls launch
    that kernel directly. The compiled kernel is specialised on the arguments' sizes, strides
    and pointer alignment, so a call whose sizes, strides or alignment differ from the first
    call's (never, for the core's views and results) takes the JIT path; so does every call
    after a direct launch fails."""
    expected = _layouts(out_acc, lse_acc, out, lse)
    state: dict = {}

    def launch(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
        rows, arguments = _arguments(out_acc, lse_acc, out, lse)
        aligned = tuple(x.data_ptr() % 16 == 0 for x in (out_acc, lse_acc, out, lse))
        as_first = _layouts(out_acc, lse_acc, out, lse) == expected
        runner = state.get("runner")
        if runner is not None and as_first and aligned == state["aligned"]:
            try:
                runner(*arguments)
                return
            except Exception:  # this Triton's direct launch differs: the JIT path from now on
                state["runner"] = None
        compiled = _jit_launch(rows, arguments)
        if (
            FAST_LAUNCH
            and as_first
            and compiled is not None
            and not INTERPRET
            and "runner" not in state  # neither a runner yet nor a failed one
        ):
            state["runner"], state["aligned"] = compiled[(rows,)], aligned

    return launch


__all__ = ["available", "merge_rows_", "rows_launcher"]
