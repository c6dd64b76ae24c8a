"""A Triton kernel that adds a block's three gradients into their strided rows in one launch.

Under ``lse`` every config after the first adds its block's ``dq, dk, dv`` into the gradients'
rows: strided 5-D views ``[b, S, L, H, d]`` (``ringattn.pattern.Block.rows``, or an
``OffsetRun``'s, whose heads step over rows). torch's ``add_`` on such views runs its generic
strided kernel (per-element offset arithmetic over five dims, no vector loads): on an H200 the
adds took 2.65 ms of a 33 ms forward+backward at 131K tokens (``docs/benchmarks/h200_perf.md``,
step 16), about a third of the memory bandwidth. Here one program takes one ``(b, S, L)`` row:
all its heads and channels, for the three pairs, loaded as contiguous ``d``-long vectors.

The sum is formed in float32 and rounded once, as torch's ``add_`` does for bf16/fp16, so the
results are the same. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how
CI tests it); :func:`ringattn.core.accumulate_` decides when to use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ringattn.kernels.merge import available, triton

# float32 arithmetic is exact for these (float64 keeps torch's add)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton is not None:
    import triton.language as tl

    from ringattn.kernels.merge import head_lanes, program_row

    # (the kernels here are unannotated: @triton.jit reads a parameter's annotation as its
    # Triton type, `int` as i32)
    @triton.jit
    def _add_one(acc, part, a_off, p_off, mask):  # type: ignore[no-untyped-def]
        total = tl.load(acc + a_off, mask=mask).to(tl.float32)
        total += tl.load(part + p_off, mask=mask).to(tl.float32)
        tl.store(acc + a_off, total.to(acc.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rows_kernel(  # type: ignore[no-untyped-def]
        acc0,
        acc1,
        acc2,
        part0,
        part1,
        part2,
        S,
        L,
        H,
        D,
        a_s0,
        a_s1,
        a_s2,
        a_s3,
        a_s4,
        p_s0,
        p_s1,
        p_s2,
        p_s3,
        p_s4,
        PAIRS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bi, si, li = program_row(S, L)
        heads = head_lanes(BLOCK_H)
        chans = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < H) & (chans[None, :] < D)
        a_off = bi * a_s0 + si * a_s1 + li * a_s2 + heads[:, None] * a_s3 + chans[None, :] * a_s4
        p_off = bi * p_s0 + si * p_s1 + li * p_s2 + heads[:, None] * p_s3 + chans[None, :] * p_s4
        _add_one(acc0, part0, a_off, p_off, mask)
        if PAIRS > 1:
            _add_one(acc1, part1, a_off, p_off, mask)
        if PAIRS > 2:
            _add_one(acc2, part2, a_off, p_off, mask)


def add_rows_(accs: list[Tensor], parts: list[Tensor] | tuple[Tensor, ...]) -> bool:
    """In place: ``accs[i] += parts[i]`` for up to three pairs of ``[b, S, L, H, d]`` views, in one
    launch. The accumulators must share one layout (strides) and dtype, the parts another, and
    ``parts[i]`` must not overlap ``accs[i]``. Returns False (nothing done) where that does not
    hold, so the caller adds another way."""
    if not accs or len(accs) != len(parts) or len(accs) > 3:
        return False
    first_acc, first_part = accs[0], parts[0]
    if (
        first_acc.dim() != 5
        or first_acc.dtype not in _DTYPES
        or first_part.dtype not in _DTYPES
        or not available(first_acc)
    ):
        return False
    if any(
        a.shape != first_acc.shape
        or p.shape != first_acc.shape
        or a.stride() != first_acc.stride()
        or p.stride() != first_part.stride()
        or a.dtype != first_acc.dtype
        or p.dtype != first_part.dtype
        or a.device != first_acc.device
        or p.device != first_acc.device
        for a, p in zip(accs, parts)
    ):
        return False
    b, s, length, h, d = first_acc.shape
    rows = b * s * length
    if rows == 0 or h == 0 or d == 0:
        return True
    padded_a = [*accs, *([first_acc] * (3 - len(accs)))]
    padded_p = [*parts, *([first_part] * (3 - len(parts)))]
    _add_rows_kernel[(rows,)](
        *padded_a,
        *padded_p,
        s,
        length,
        h,
        d,
        *first_acc.stride(),
        *first_part.stride(),
        PAIRS=len(accs),
        BLOCK_H=triton.next_power_of_2(h),
        BLOCK_D=triton.next_power_of_2(d),
    )
    return True


__all__ = ["add_rows_"]
