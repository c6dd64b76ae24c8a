"""Zero only the (row, head) pairs that no block writes, for placed (``head_groups``) results.

Under ``head_groups`` every selected (row, head) of the output and of the gradients is written by
exactly one block, in place; what the definition leaves at 0 are the rows a head's config does not
select: row ``p`` of head ``j`` is selected iff ``p mod r_j == o_j`` (rate and offset of the head's
group; ``r`` divides ``w``, so this is the definition's ``((p mod w) - o) mod r == 0``, tail
segment included). Filling the whole tensor with zeros first writes every selected pair twice: at
issue 5's shape a quarter of the heads (the ``r = 1`` group) and ``1 / r`` of the others' rows,
43% of a fill that took ~0.16 ms per tensor at 131K on an H200, four tensors per forward+backward.
This kernel writes the zeros of the unselected pairs only, in one launch per tensor.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it); elsewhere
:func:`fill_unselected_` zero-fills the whole tensor.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ringattn.capture import compiling
from ringattn.kernels.merge import available, triton
from ringattn.memory.base import MemoryManager

if triton is not None:
    import triton.language as tl

    from ringattn.kernels.merge import head_lanes

    # (the kernels here are unannotated: @triton.jit reads a parameter's annotation as its
    # Triton type, `int` as i32)
    @triton.jit
    def _zero_unselected_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        rate_ptr,
        offset_ptr,
        ROWS,
        N,
        H,
        D,
        s0,
        s1,
        s2,
        s3,
        BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # one program per BLOCK_R (batch, row) pairs: their heads and channels (one row per
        # program was 393216 programs of 4 KB each at 131K, 19% slower on an H200)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: ~1M tokens
        p = rows % N
        bi = rows // N
        heads = head_lanes(BLOCK_H)
        chans = tl.arange(0, BLOCK_D)
        hmask = heads < H
        rate = tl.load(rate_ptr + heads, mask=hmask, other=1)
        offset = tl.load(offset_ptr + heads, mask=hmask, other=0)
        unselected = (rows < ROWS)[:, None] & hmask[None, :] & ((p[:, None] % rate) != offset)
        mask = unselected[:, :, None] & (chans < D)[None, None, :]
        ptrs = (
            x_ptr
            + (bi * s0 + p * s1)[:, None, None]
            + (heads * s2)[None, :, None]
            + (chans * s3)[None, None, :]
        )
        zero = tl.zeros((BLOCK_R, BLOCK_H, BLOCK_D), dtype=x_ptr.dtype.element_ty)
        tl.store(ptrs, zero, mask=mask)


# (batch, row) pairs per program of the zeroing kernel, whose tile is ROWS_PER_PROGRAM *
# next_power_of_2(h) * next_power_of_2(d) elements (16 * 16 * 128 bf16: 64 KB at issue 5's
# shape), and its warps. H200, the backward's [3, n, 16, 128] gradients (experiments/fa4_probe.py
# --part fill, h200_perf.md step 31): 0.266 / 0.085 ms at 131K / 32K, where one row per program
# and 4 warps took 0.328 / 0.095 (the best of 12 pairs: 0.264 / 0.082, none best at both)
ROWS_PER_PROGRAM = 16
WARPS = 4


def zero_unselected_(x: Tensor, selection: Tensor) -> None:
    """Zero ``x[:, p, j]`` (``x: [b, n, h, d]``, any strides) wherever ``p % rates[j] !=
    offsets[j]``, with ``selection = [rates, offsets]`` (``[2, h]`` int32 on x's device); the
    selected pairs are left as they are."""
    b, n, h, d = x.shape
    if x.numel() == 0:
        return
    rate, offset = selection
    block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(d)
    # a program's tile stays within 64K elements (registers) for wide heads
    block_r = max(1, min(ROWS_PER_PROGRAM, 65536 // (block_h * block_d)))
    _zero_unselected_kernel[(triton.cdiv(b * n, block_r),)](
        x,
        rate,
        offset,
        b * n,
        n,
        h,
        d,
        *x.stride(),
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=WARPS,
    )


def fill_unselected_(
    x: Tensor,
    selection: tuple[tuple[int, ...], tuple[int, ...]] | None,
    memory: MemoryManager,
) -> None:
    """Zero ``x`` wherever no block will write: with a ``selection`` (``Plan.selection``: per-head
    rates and offsets) only the unselected pairs are zeroed where the kernel runs, and the
    selected ones are left for the blocks; otherwise, and off CUDA or while tracing, all of it.
    The selection's device copy is a pattern of ``memory`` (cached by the pooled manager)."""
    if selection is None or compiling() or not available(x):
        x.zero_()
        return
    if all(r == 1 and o == 0 for r, o in zip(*selection)):
        return  # every pair is selected (every group has r = 1, or writes its own zeros)
    device = x.device
    table = memory.cached(
        ("unselected_selection", selection, str(device)),
        lambda: selection_table(selection, device),
    )
    zero_unselected_(x, table)


def shifted(x: Tensor, shift: int) -> Tensor:
    """The view of ``x``'s layout ``shift`` elements further into its storage (a row of a
    selected row's stride group: :func:`ringattn.core.neighbour_shifts`)."""
    return x.as_strided(x.shape, x.stride(), x.storage_offset() + shift)


def selection_table(
    selection: tuple[tuple[int, ...], tuple[int, ...]], device: torch.device
) -> Tensor:
    """``selection`` as the kernel's ``[2, h]`` int32 table, made on ``device`` by fills: no
    host-to-device copy, which CUDA-graph capture forbids (a manager that does not cache
    patterns builds it inside every call, captured ones included). One fill per run of equal
    values: a few per row, heads of a group being contiguous."""
    table = torch.empty(2, len(selection[0]), dtype=torch.int32, device=device)
    for row, values in zip(table, selection):
        start = 0
        for value, run in itertools.groupby(values):
            stop = start + len(list(run))
            row[start:stop].fill_(value)
            start = stop
    return table


__all__ = ["fill_unselected_", "selection_table", "shifted", "zero_unselected_"]
