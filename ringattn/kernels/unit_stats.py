"""The grouped backward's statistics, laid out by unit: dPsum and LSE * log2(e) (for
:mod:`ringattn.kernels.fa4_group_bwd`).

FA4's backward preprocess computes, per launch, ``dPsum = rowsum(O * dO)`` (float32) and the LSE
in log2 units for every row of its ``[B, H, L_rounded]`` statistics (rows past ``L``: dPsum 0, LSE
``+inf``, so those rows' probabilities are 0), and zeroes its dQ accumulator. The grouped backward
reads them laid out by *unit* (``[U, L_rounded]``, one unit per (segment, head) of every group, in
the order of :func:`ringattn.launches.packed`'s index), so one launch of this kernel writes all of
them from the ``[b, n, h, ...]`` tensors: the packed index gives each unit row's position ``p`` in
the LSE's storage, and ``O`` / ``dO``'s row is at ``p * d`` (both contiguous ``[b, n, h, d]``, as
the core makes them).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ringattn.kernels.merge import triton

if triton is not None:
    import triton.language as tl

    # (the kernels here are unannotated: @triton.jit reads a parameter's annotation as its
    # Triton type, `int` as i32)
    @triton.jit
    def _unit_stats_kernel(  # type: ignore[no-untyped-def]
        out_ptr,
        dout_ptr,
        lse_ptr,
        index_ptr,
        dpsum_ptr,
        lse_log2_ptr,
        ROWS,  # U * L_rounded
        L,
        L_ROUNDED,
        D,
        LOG2E: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        unit = rows // L_ROUNDED
        row = rows % L_ROUNDED
        live = (rows < ROWS) & (row < L)
        position = tl.load(index_ptr + unit * L + row, mask=live, other=0).to(tl.int64)
        chans = tl.arange(0, BLOCK_D)
        mask = live[:, None] & (chans < D)[None, :]
        at = position[:, None] * D + chans[None, :]
        o = tl.load(out_ptr + at, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dpsum = tl.sum(o * do, axis=1)
        lse = tl.load(lse_ptr + position, mask=live, other=float("inf")).to(tl.float32)
        written = rows < ROWS
        tl.store(dpsum_ptr + rows, tl.where(live, dpsum, 0.0), mask=written)
        tl.store(lse_log2_ptr + rows, lse * LOG2E, mask=written)


ROWS_PER_PROGRAM = 16
WARPS = 4


def unit_stats_(
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    index: Tensor,
    length: int,
    dpsum: Tensor,
    lse_log2: Tensor,
) -> None:
    """``dpsum`` / ``lse_log2`` (``[U, L_rounded]`` float32, contiguous) <- each unit row's
    ``rowsum(out * dout)`` and ``lse * log2(e)``, the rows ``length..L_rounded`` 0 and ``+inf``.
    ``index``: ``U * length`` positions into ``lse``'s storage (``launches.packed``); ``out``,
    ``dout``: contiguous ``[b, n, h, d]``, ``lse``: contiguous ``[b, n, h]`` float32."""
    # the kernel reads and writes raw offsets: a wrong layout or count reads past a tensor or
    # writes over another silently, so it is refused first (ValueErrors: python -O strips
    # asserts). Metadata only, so nothing syncs; index's range is its maker's (launches.packed)
    if not (
        out.dim() == 4 and out.shape == dout.shape and out.is_contiguous() and dout.is_contiguous()
    ):
        raise ValueError("unit_stats_: out and dout must be one contiguous [b, n, h, d] shape")
    if not (lse.shape == out.shape[:-1] and lse.dtype == torch.float32 and lse.is_contiguous()):
        raise ValueError("unit_stats_: lse must be a contiguous float32 [b, n, h] of out's")
    if not (
        dpsum.dim() == 2
        and dpsum.shape == lse_log2.shape
        and dpsum.dtype == lse_log2.dtype == torch.float32
        and dpsum.is_contiguous()
        and lse_log2.is_contiguous()
    ):
        raise ValueError("unit_stats_: dpsum and lse_log2 must be one contiguous float32 [U, R]")
    if not (0 <= length <= dpsum.shape[1] and index.numel() == dpsum.shape[0] * length):
        raise ValueError("unit_stats_: need length <= R and U * length index positions")
    if index.dtype != torch.int32:
        raise ValueError("unit_stats_: index must be int32")
    if len({x.device for x in (out, dout, lse, index, dpsum, lse_log2)}) != 1:
        raise ValueError("unit_stats_: all tensors must be on one device")
    units, rounded = dpsum.shape
    d = out.shape[-1]
    rows = units * rounded
    _unit_stats_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        out,
        dout,
        lse,
        index,
        dpsum,
        lse_log2,
        rows,
        length,
        rounded,
        d,
        LOG2E=math.log2(math.e),
        BLOCK_R=ROWS_PER_PROGRAM,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=WARPS,
    )
