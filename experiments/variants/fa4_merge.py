"""Where the LSE merge's epilogue time goes: ``MergingForwardSm90`` with parts of its merge taken
out (imported only where FA4 and the CUTLASS DSL are; ``experiments/fa4_probe.py --part
merge_cost`` times them).

Step 23 measured the merging kernel 7-15% slower than its own class with the merge skipped, and
step 45 found no gain in hiding the old rows' reads (an L2 prefetch at the tile's start, the
loads moved before the last PV GEMM, coalesced copies through shared memory). These variants
split the merge in two: ``LoadsOnly`` reads the old rows and LSE as the merge does and folds
them in with one add (no exp / log / reciprocal), ``MathOnly`` does the merge's arithmetic on
values already in registers (no reads). Neither computes the merge: timing only.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from quack import layout_utils

from ringattn.kernels.fa4_merge_sm90 import MergingForwardSm90


class NoMerge(MergingForwardSm90):
    """The merging kernel's store path, the merge skipped."""

    @cute.jit
    def merge_old(self, acc_O, lse, mO, mLSE, seqlen, tiled_mma, tidx, m_block, head, batch):
        pass


class LoadsOnly(MergingForwardSm90):
    """The merge's reads (the old rows, as the accumulator holds them, and the old LSE), each
    folded in by one add."""

    @cute.jit
    def merge_old(self, acc_O, lse, mO, mLSE, seqlen, tiled_mma, tidx, m_block, head, batch):
        taccOgO, taccOgLSE, taccOcO, rows_left = self.old_views(
            mO, mLSE, seqlen, tiled_mma, tidx, m_block, head, batch
        )
        acc_O_mn = layout_utils.reshape_acc_to_mn(acc_O)
        for m in cutlass.range(cute.size(lse), unroll_full=True):
            if taccOcO[m, 0][0] < rows_left:
                lse[m] = lse[m] + Float32(taccOgLSE[m, 0])
                tOld = cute.make_fragment_like(taccOgO[m, None], self.dtype)
                cute.autovec_copy(taccOgO[m, None], tOld)
                acc_O_mn[m, None].store(acc_O_mn[m, None].load() + tOld.load().to(Float32))


class MathOnly(MergingForwardSm90):
    """The merge's arithmetic, its old rows and LSE taken from registers (no reads)."""

    @cute.jit
    def merge_old(self, acc_O, lse, mO, mLSE, seqlen, tiled_mma, tidx, m_block, head, batch):
        taccOcO, rows_left = self.row_coords(seqlen, tiled_mma, tidx, m_block)
        acc_O_mn = layout_utils.reshape_acc_to_mn(acc_O)
        for m in cutlass.range(cute.size(lse), unroll_full=True):
            if taccOcO[m, 0][0] < rows_left:
                lse[m], w_old, w_new, inv = self.merge_weights(lse[m] - Float32(0.5), lse[m])
                old = acc_O_mn[m, None].load().to(self.dtype)
                acc_O_mn[m, None].store(
                    acc_O_mn[m, None].load() * (w_new * inv) + old.to(Float32) * (w_old * inv)
                )


VARIANTS = {"no_merge": NoMerge, "loads_only": LoadsOnly, "math_only": MathOnly}
