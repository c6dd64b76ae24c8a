"""``global``: one permutation of the whole sequence per config makes the pattern block-diagonal.

For config ``(w, r)`` the permutation lists, for each residue ``o`` in turn, the rows
``s*w + o + j*r`` of every full segment ``s`` (segment-major), then the tail's rows by residue.
After it, every (segment, residue) pair is one contiguous run of ``w // r`` rows, so attention in
permuted order is block-diagonal (see ``docs/semantics.md``). Each block's gather index is a
contiguous slice of that one cached permutation; ``read`` gathers just the rows and heads it needs
into a contiguous tensor.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ringattn.config import checked_int
from ringattn.dilation.base import DilationProcessor
from ringattn.memory.base import MemoryManager
from ringattn.pattern import Block, Plan
from ringattn.registry import register


def global_permutation(n: int, w: int, r: int, device: torch.device | str = "cpu") -> Tensor:
    """The residue-major permutation of ``range(n)`` for config ``(w, r)`` (int64, ``[n]``).

    Built without a loop over residues (``r`` may far exceed ``n``: r = 2**20 took seconds)."""
    # (before: (8, 3, 2) gave 6 rows, not a permutation; r = 8 > w = 4 none; r = 0 a
    # ZeroDivisionError; a float n float rows. n may be symbolic under torch.compile)
    if not isinstance(n, torch.SymInt):
        checked_int("n", n, minimum=0)
    checked_int("w", w)
    checked_int("r", r)
    if w % r:
        raise ValueError(f"r={r} must divide w={w} (a segment's rows split into r residues)")
    full = n // w
    # full segments: row s*w + o + j*r at (residue o, segment s, step j); none if w > n (then
    # nothing of size w or r is made: w = 2**34 asked for 128 GB for an 8-row sequence)
    full_rows = torch.empty(0, dtype=torch.int64, device=device)
    if full:
        full_rows = (
            torch.arange(r, device=device)[:, None, None]
            + (torch.arange(full, device=device) * w)[None, :, None]
            + (torch.arange(w // r, device=device) * r)[None, None, :]
        ).flatten()
    # the tail, by residue and then position
    tail = torch.arange(n - full * w, device=device)
    tail_rows = full * w + tail[torch.argsort(tail % r, stable=True)]
    return torch.cat((full_rows, tail_rows))


def _slice_of_permutation(n: int, block: Block) -> tuple[int, int]:
    """Where ``block``'s rows sit inside ``global_permutation(n, w, r)``."""
    job = block.job
    full = n // job.w
    per_residue = full * (job.w // job.r)
    if not block.tail:
        start = job.offset * per_residue
        return start, start + per_residue
    # residues below the tail's length mod r hold one row more than the others
    tail = n - full * job.w
    per_tail_residue, longer = tail // job.r, tail % job.r  # (not divmod: Dynamo, symbolic n)
    start = job.r * per_residue + job.offset * per_tail_residue + min(job.offset, longer)
    return start, start + block.length


@register("dilation", "global")
class GlobalPermutationDilation(DilationProcessor):
    """``global``: each block's rows gathered through one cached permutation of the sequence
    per config (:func:`global_permutation`; this module's docstring says how)."""

    def indices(
        self, plan: Plan, device: torch.device, memory: MemoryManager
    ) -> tuple[Tensor, ...]:
        out = []
        for block in plan.blocks:
            w, r = block.job.w, block.job.r
            perm = memory.cached(
                ("global_permutation", plan.n, w, r, str(device)),
                partial(global_permutation, plan.n, w, r, device),
            )
            start, stop = _slice_of_permutation(plan.n, block)
            out.append(perm[start:stop])
        return tuple(out)

    def read(self, x: Tensor, block: Block, index: Tensor | None) -> Tensor:
        assert index is not None, "global dilation needs its gather indices"
        gathered = x[:, :, block.job.heads].index_select(1, index)  # only the block's heads
        rows: Tensor = gathered.unflatten(1, (block.segments, block.length))
        return rows.flatten(0, 1)
