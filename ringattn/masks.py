"""Dilated attention as FlexAttention ``mask_mod`` / ``score_mod`` functions, and block masks.

Small pure functions in the attention-gym style: each returns a closure over a few integer
constants and small lookup tensors, and is drawn in ``docs/flex.md``.

* :func:`multiplicity_mod` — the unpermuted sequence: ``m(q, k)`` = how many configs let ``q``
  see ``k``. ``mask_mod = m > 0`` and ``score_mod = score + log m`` make *one* softmax equal to the
  whole "lse" mixture (and to "head_groups", where m ∈ {0, 1}).
* :func:`run_mask_mod` — one config after the global permutation: ``q`` sees ``k`` iff both lie in
  the same run (one segment's rows of one residue) and the run's residue is the head's offset.

Block masks are built from per-q-block key *ranges* computed analytically (O(h · n) work for the
ranges, O(h · (n/B)²) for the block indices; no n × n mask is ever materialised), then handed to
``BlockMask.from_kv_blocks``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ringattn.pattern import Plan

# FlexAttention's two function forms, on the index tensors flex_attention vmaps them over:
# (b, h, q_idx, kv_idx) -> whether q sees k (bool), (score, b, h, q_idx, kv_idx) -> the score
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def multiplicity_mod(plan: Plan, causal: bool, offsets: Tensor) -> tuple[MaskMod, ScoreMod]:
    """``m(b, h, q, k)`` for the whole mixture; ``offsets[i, h]`` is -1 where h skips config i."""
    configs = plan.configs

    def multiplicity(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        m = torch.zeros_like(q_idx)
        for i, (w, r) in enumerate(configs):
            off = offsets[i, h]
            sees = (off >= 0) & (q_idx // w == kv_idx // w)
            sees = sees & (((q_idx % w) - off) % r == 0) & (((kv_idx % w) - off) % r == 0)
            m = m + sees.to(m.dtype)
        if causal:
            m = torch.where(kv_idx <= q_idx, m, torch.zeros_like(m))
        return m

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return multiplicity(b, h, q_idx, kv_idx) > 0

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # log m is finite wherever mask_mod lets the score through
        return score + torch.log(multiplicity(b, h, q_idx, kv_idx).to(score.dtype))

    return mask_mod, score_mod


def run_layout(n: int, w: int, r: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """For the permuted order of ``global_permutation(n, w, r)``: ``(run_id, run_residue)``, [n].

    Runs are numbered in permuted order; each is one segment's rows of one residue.
    """
    full = n // w
    tail = n - full * w
    ids, residues = [], []
    if full:  # residue o's run of segment s holds w / r rows (nothing of size r where w > n)
        residue = torch.arange(r, device=device)
        segment = torch.arange(full, device=device).repeat_interleave(w // r)
        ids.append((residue[:, None] * full + segment[None, :]).flatten())
        residues.append(residue.repeat_interleave(full * (w // r)))
    # the tail: residue o < tail holds ceil((tail - o) / r) rows, in one run each
    tail_residue = torch.arange(min(r, tail), device=device)
    rows = (tail - tail_residue + r - 1) // r
    # (output_size: the tail's rows, known without reading ``rows``, as a fake call needs)
    ids.append((r * full + tail_residue).repeat_interleave(rows, output_size=tail))
    residues.append(tail_residue.repeat_interleave(rows, output_size=tail))
    return torch.cat(ids), torch.cat(residues)


def run_mask_mod(run_id: Tensor, run_residue: Tensor, head_offset: Tensor, causal: bool) -> MaskMod:
    """Block-diagonal mask of one config in permuted order; ``head_offset[h]`` = -1: unused."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same_run = run_id[q_idx] == run_id[kv_idx]
        mine = run_residue[q_idx] == head_offset[h]
        allowed = same_run & mine
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        return allowed

    return mask_mod


def block_mask_from_ranges(
    kv_lo: Tensor, kv_hi: Tensor, n: int, block: int, mask_mod: MaskMod, causal: bool
) -> BlockMask:
    """BlockMask whose q-block ``i`` of head ``h`` visits the key blocks covering
    ``[kv_lo[h, i], kv_hi[h, i])`` (empty when ``kv_hi <= kv_lo``), causal-clipped."""
    num_blocks = -(-n // block)
    q_block_start = torch.arange(num_blocks, device=kv_lo.device) * block
    if causal:
        kv_hi = torch.minimum(kv_hi, (q_block_start + block).clamp(max=n))
    first = kv_lo // block
    last = (kv_hi + block - 1) // block
    count = (last - first).clamp(min=0).to(torch.int32)
    width = torch.arange(num_blocks, device=kv_lo.device)
    indices = (first.unsqueeze(-1) + width).clamp(max=num_blocks - 1).to(torch.int32)
    # (annotated: torch 2.11's from_kv_blocks returns Any to mypy, 2.13's a BlockMask)
    mask: BlockMask = BlockMask.from_kv_blocks(
        count[None], indices[None], BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n)
    )
    return mask


def mixture_kv_ranges(plan: Plan, offsets: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per head and q-block, the hull of the segments (of the configs the head uses) it touches."""
    n, h = plan.n, plan.h
    device = offsets.device
    starts = torch.arange(0, n, block, device=device)
    ends = (starts + block).clamp(max=n)
    lo = torch.full((h, starts.numel()), n, dtype=torch.long, device=device)
    hi = torch.zeros((h, starts.numel()), dtype=torch.long, device=device)
    for i, (w, _) in enumerate(plan.configs):
        seg_lo = (starts // w) * w
        seg_hi = (((ends - 1) // w + 1) * w).clamp(max=n)
        uses = (offsets[i] >= 0).unsqueeze(-1)  # [h, 1]
        lo = torch.where(uses, torch.minimum(lo, seg_lo), lo)
        hi = torch.where(uses, torch.maximum(hi, seg_hi), hi)
    return lo, hi


def run_kv_ranges(
    run_id: Tensor, run_residue: Tensor, head_offset: Tensor, block: int
) -> tuple[Tensor, Tensor]:
    """Per head and q-block (permuted order), the hull of the head's runs the q-block touches."""
    n = run_id.numel()
    device = run_id.device
    positions = torch.arange(n, device=device)
    # run boundaries: first and one-past-last position of each position's run
    change = torch.ones(n, dtype=torch.bool, device=device)
    change[1:] = run_id[1:] != run_id[:-1]
    run_start = torch.cummax(torch.where(change, positions, 0), 0).values
    flipped_change = torch.ones(n, dtype=torch.bool, device=device)
    flipped_change[:-1] = run_id[:-1] != run_id[1:]
    run_end = torch.flip(
        torch.cummin(torch.flip(torch.where(flipped_change, positions + 1, n), [0]), 0).values, [0]
    )
    num_blocks = -(-n // block)
    pad = num_blocks * block - n
    mine = run_residue.unsqueeze(0) == head_offset.unsqueeze(1)  # [h, n]
    lo = torch.where(mine, run_start, n)
    hi = torch.where(mine, run_end, 0)
    lo = torch.nn.functional.pad(lo, (0, pad), value=n).view(-1, num_blocks, block).amin(-1)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(-1, num_blocks, block).amax(-1)
    return lo, hi


def computed_fraction(block_mask: BlockMask) -> float:
    """Fraction of the (q-block, kv-block) tiles of all heads that the kernel visits."""
    kv_num, _ = block_mask.kv_num_blocks, block_mask.kv_indices
    total = kv_num.numel() * block_mask.kv_indices.shape[-1]
    visited = kv_num.sum()
    if block_mask.full_kv_num_blocks is not None:
        visited = visited + block_mask.full_kv_num_blocks.sum()
    return float(visited) / total
