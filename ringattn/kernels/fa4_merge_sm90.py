"""FlashAttention-4's SM90 forward with the LSE merge in its epilogue (imported only where FA4 is).

A merged block's forward was two kernels: FA4 wrote the block's output and LSE to temporaries,
then :mod:`ringattn.kernels.merge` read them back with the accumulator rows and wrote the merged
rows. The merge is memory-bound: at 131K tokens, causal, it was 9.5% of the forward's GPU time
(``docs/benchmarks/h200_perf.md``, step 22). Here the kernel's epilogue does it: after the tile's
output is normalised (float32, in registers), each row reads the accumulator's LSE and output
rows, and the tile writes

    lse = logaddexp(lse_acc, lse_block)
    out = out_acc * exp(lse_acc - lse) + out_block * exp(lse_block - lse)

into the accumulators themselves, so the block's output is never written or read back, and the
block output is rounded once (after merging) instead of twice.

The kernel is FA4's own (:class:`FlashAttentionForwardSm90`) with two changes: the epilogue
above, and the output written with ordinary stores instead of TMA (the merge reads the old rows
through a pointer; FA4 takes this path itself for some GQA layouts). Every tile owns its rows:
it reads them before the epilogue's barrier and writes after it, and no other CTA touches them.

The LSE accumulator is ``[b, n, h]``, so a block's LSE view ``[B, H, L]`` is strided along
``L`` (and along ``H`` when the block's heads are); FA4's launcher requires ``L`` contiguous, so
:mod:`ringattn.kernels.fa4_merge` compiles this class itself, with every LSE stride dynamic.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from flash_attn.cute import utils
from flash_attn.cute.flash_fwd import FlashAttentionForwardBase
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from quack import layout_utils

_LOG2_E = math.log2(math.e)
_LN2 = math.log(2.0)

# the base class's epilogue (module level: the DSL re-parses jit methods with their globals)
_write_epilogue = FlashAttentionForwardBase.epilogue


class MergingForwardSm90(FlashAttentionForwardSm90):
    """FA4's SM90 forward that merges each tile into the output and LSE it is given."""

    def _setup_attributes(self):
        self.use_tma_O = False  # the merge reads the old rows through mO's pointer
        super()._setup_attributes()

    @cute.jit
    def old_views(
        self,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        seqlen,
        tiled_mma: cute.TiledMma,
        tidx: cutlass.Int32,
        m_block: cutlass.Int32,
        head_idx: cutlass.Int32,
        batch_idx: cutlass.Int32,
    ):
        """This thread's rows of the tile in ``mO`` and ``mLSE`` as the PV accumulator holds
        them (row by row: ``[m, None]``, the LSE's at ``[m, 0]``), their coordinates, and how
        many of the tile's rows the sequence has."""
        thr_mma = tiled_mma.get_slice(tidx)
        mO_cur = seqlen.offset_batch_Q(mO, batch_idx, dim=3)[None, None, head_idx]
        gO = cute.local_tile(mO_cur, (self.tile_m, self.tile_hdimv), (m_block, 0))
        taccOgO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(gO))
        mLSE_cur = seqlen.offset_batch_Q(mLSE, batch_idx, dim=2)[None, head_idx]
        gLSE = cute.local_tile(mLSE_cur, (self.tile_m,), (m_block,))
        gLSE_expanded = cute.make_tensor(
            gLSE.iterator,
            cute.append(gLSE.layout, cute.make_layout((self.tile_hdimv,), stride=(0,))),
        )
        taccOgLSE = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(gLSE_expanded))
        return taccOgO, taccOgLSE, *self.row_coords(seqlen, tiled_mma, tidx, m_block)

    @cute.jit
    def row_coords(
        self, seqlen, tiled_mma: cute.TiledMma, tidx: cutlass.Int32, m_block: cutlass.Int32
    ):
        """This thread's accumulator coordinates in the tile (row by row: ``[m, 0][0]`` is row
        ``m``'s) and how many of the tile's rows the sequence has."""
        cO = cute.make_identity_tensor((self.tile_m, self.tile_hdimv))
        taccOcO = layout_utils.reshape_acc_to_mn(tiled_mma.get_slice(tidx).partition_C(cO))
        return taccOcO, seqlen.seqlen_q - m_block * self.tile_m

    @cute.jit
    def merge_weights(self, lse_old: Float32, lse_new: Float32):
        """``(lse, w_old, w_new, inv)``: the merged LSE of one row, and its old and new outputs'
        weights ``w_old * inv`` and ``w_new * inv`` (both 0 where neither side has the row)."""
        top = utils.fmax(lse_old, lse_new)
        top = Float32(0.0) if top == -Float32.inf else top  # neither side has the row
        w_old = cute.math.exp2((lse_old - top) * _LOG2_E, fastmath=True)
        w_new = cute.math.exp2((lse_new - top) * _LOG2_E, fastmath=True)
        total = w_old + w_new
        inv = cute.arch.rcp_approx(total if total > Float32(0.0) else Float32(1.0))
        lse = (
            top + cute.math.log2(total, fastmath=True) * _LN2
            if total > Float32(0.0)
            else -Float32.inf
        )
        return lse, w_old, w_new, inv

    @cute.jit
    def merge_old(
        self,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        seqlen,
        tiled_mma: cute.TiledMma,
        tidx: cutlass.Int32,
        m_block: cutlass.Int32,
        head_idx: cutlass.Int32,
        batch_idx: cutlass.Int32,
    ):
        """acc_O, lse (this thread's rows, normalised) <- merged with mO's and mLSE's rows."""
        taccOgO, taccOgLSE, taccOcO, rows_left = self.old_views(
            mO, mLSE, seqlen, tiled_mma, tidx, m_block, head_idx, batch_idx
        )
        acc_O_mn = layout_utils.reshape_acc_to_mn(acc_O)
        for m in cutlass.range(cute.size(lse), unroll_full=True):
            if taccOcO[m, 0][0] < rows_left:
                lse_old = Float32(taccOgLSE[m, 0])
                lse[m], w_old, w_new, inv = self.merge_weights(lse_old, lse[m])
                tOld = cute.make_fragment_like(taccOgO[m, None], self.dtype)
                cute.autovec_copy(taccOgO[m, None], tOld)
                acc_O_mn[m, None].store(
                    acc_O_mn[m, None].load() * (w_new * inv)
                    + tOld.load().to(Float32) * (w_old * inv)
                )

    @cute.jit
    def epilogue(
        self,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        sO: cute.Tensor,
        seqlen,
        gmem_tiled_copy_O: cute.TiledCopy,
        tma_atom_O,
        tiled_mma: cute.TiledMma,
        tidx: cutlass.Int32,
        m_block: cutlass.Int32,
        head_idx: cutlass.Int32,
        batch_idx: cutlass.Int32,
    ):
        # the reads happen before the write path's first barrier, the writes after it
        self.merge_old(acc_O, lse, mO, mLSE, seqlen, tiled_mma, tidx, m_block, head_idx, batch_idx)
        _write_epilogue(
            self,
            acc_O,
            lse,
            mO,
            mLSE,
            sO,
            seqlen,
            gmem_tiled_copy_O,
            tma_atom_O,
            tiled_mma,
            tidx,
            m_block,
            head_idx,
            batch_idx,
        )
