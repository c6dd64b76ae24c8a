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

The old rows were read in the epilogue, after the tile's last MMA, when nothing else runs on the
SM: 7-15% of the kernel (``h200_perf.md``, step 23). With ``prefetch_old`` they are loaded into
registers before the tile's last PV GEMM is waited for (``fa4_merge.PREFETCH``, step 45; asking
L2 for them at the tile's start instead gained nothing).

The LSE accumulator is ``[b, n, h]``, so a block's LSE view ``[B, H, L]`` is strided along
``L`` (and along ``H`` when the block's heads are); FA4's launcher requires ``L`` contiguous, so
:mod:`ringattn.kernels.fa4_merge` compiles this class itself, with every LSE stride dynamic.
"""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from flash_attn.cute import utils
from flash_attn.cute.flash_fwd import FlashAttentionForwardBase
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from quack import layout_utils

_LOG2_E = math.log2(math.e)
_LN2 = math.log(2.0)

# the base class's epilogue, consumer loop and last PV GEMM (module level: the DSL re-parses jit
# methods with their globals)
_write_epilogue = FlashAttentionForwardBase.epilogue
_consumer_loop = FlashAttentionForwardSm90.mma
_last_pv_gemm = FlashAttentionForwardSm90.last_half_block_overlap


class _TileMask:
    """FA4's attention mask (``mask``) that, at a tile's first masking (its first key block,
    masked for the sequence's end: once per tile, at its main loop's start), hands the tile's
    coordinates to ``record``. All of it runs while FA4's kernel is traced."""

    def __init__(self, mask, record) -> None:
        self.mask, self.record = mask, record

    def apply_mask(self, acc_S, **kwargs) -> None:
        if kwargs["mask_seqlen"]:  # a Python bool (FA4's Constexpr)
            self.record(kwargs["m_block"], kwargs["head_idx"], kwargs["batch_idx"])
        self.mask.apply_mask(acc_S, **kwargs)


class MergingForwardSm90(FlashAttentionForwardSm90):
    """FA4's SM90 forward that merges each tile into the output and LSE it is given.

    ``prefetch_old``: the tile's old rows are loaded into registers before its last PV GEMM is
    waited for, instead of in the epilogue. FA4's consumer loop has no hook that knows the tile
    there, so its mask (which does, at the tile's first key block) records the tile while the
    kernel is traced, and the last PV GEMM's step issues the loads the epilogue then uses."""

    def __init__(self, *args, prefetch_old: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefetch_old = prefetch_old
        self._tile = None  # while tracing: what the consumer loop's hooks share

    def _setup_attributes(self):
        self.use_tma_O = False  # the merge reads the old rows through mO's pointer
        super()._setup_attributes()

    def mma(self, *args):
        """FA4's consumer loop (called while tracing FA4's kernel; ``args``: FA4's, in FA4's
        order), its mask recording each tile where ``prefetch_old``."""
        if self.prefetch_old:
            self._tile = SimpleNamespace(
                mO=args[2], mLSE=args[3], tiled_mma_pv=args[1], tidx=args[15], at=None, old=None
            )
            mask_cls = args[20]

            def recording_mask(seqlen):
                return _TileMask(mask_cls(seqlen), partial(self._record, seqlen))

            args = (*args[:20], recording_mask, *args[21:])
        _consumer_loop(self, *args)

    def _record(self, seqlen, m_block, head_idx, batch_idx) -> None:
        self._tile.at = (seqlen, m_block, head_idx, batch_idx)
        self._tile.old = None

    def last_half_block_overlap(self, *args, **kwargs):
        """FA4's last PV GEMM of a tile, the tile's old rows loaded first where
        ``prefetch_old`` (their latency then overlaps the GEMM, the softmax's finalisation)."""
        tile = self._tile
        if self.prefetch_old and tile is not None and tile.at is not None:
            seqlen, m_block, head_idx, batch_idx = tile.at
            tile.old = self.load_old(
                tile.mO, tile.mLSE, seqlen, tile.tiled_mma_pv, tile.tidx, m_block, head_idx,
                batch_idx,
            )  # fmt: skip
        return _last_pv_gemm(self, *args, **kwargs)

    @cute.jit
    def load_old(
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
        """This thread's rows of the tile's old output (as the PV accumulator holds them) and
        their old LSE, in registers (rows past the sequence's end not read)."""
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
        cO = cute.make_identity_tensor((self.tile_m, self.tile_hdimv))
        taccOcO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cO))
        old_rows = cute.make_fragment_like(taccOgO, self.dtype)
        old_lse = cute.make_rmem_tensor((cute.size(taccOgO, mode=[0]),), Float32)
        rows_left = seqlen.seqlen_q - m_block * self.tile_m
        for m in cutlass.range(cute.size(taccOgO, mode=[0]), unroll_full=True):
            if taccOcO[m, 0][0] < rows_left:
                cute.autovec_copy(taccOgO[m, None], old_rows[m, None])
                old_lse[m] = Float32(taccOgLSE[m, 0])
        return old_rows, old_lse

    @cute.jit
    def merge_old(
        self,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        old_rows: cute.Tensor,
        old_lse: cute.Tensor,
        seqlen,
        tiled_mma: cute.TiledMma,
        tidx: cutlass.Int32,
        m_block: cutlass.Int32,
    ):
        """acc_O, lse (this thread's rows, normalised) <- merged with the old rows and LSE
        (:meth:`load_old`'s)."""
        thr_mma = tiled_mma.get_slice(tidx)
        cO = cute.make_identity_tensor((self.tile_m, self.tile_hdimv))
        taccOcO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cO))
        acc_O_mn = layout_utils.reshape_acc_to_mn(acc_O)
        rows_left = seqlen.seqlen_q - m_block * self.tile_m
        for m in cutlass.range(cute.size(lse), unroll_full=True):
            if taccOcO[m, 0][0] < rows_left:
                lse_old = old_lse[m]
                lse_new = lse[m]
                top = utils.fmax(lse_old, lse_new)
                top = Float32(0.0) if top == -Float32.inf else top  # neither side has the row
                w_old = cute.math.exp2((lse_old - top) * _LOG2_E, fastmath=True)
                w_new = cute.math.exp2((lse_new - top) * _LOG2_E, fastmath=True)
                total = w_old + w_new
                inv = cute.arch.rcp_approx(total if total > Float32(0.0) else Float32(1.0))
                lse[m] = (
                    top + cute.math.log2(total, fastmath=True) * _LN2
                    if total > Float32(0.0)
                    else -Float32.inf
                )
                acc_O_mn[m, None].store(
                    acc_O_mn[m, None].load() * (w_new * inv)
                    + old_rows[m, None].load().to(Float32) * (w_old * inv)
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
        tile = self._tile
        if cutlass.const_expr(tile is not None and tile.old is not None):
            old_rows, old_lse = tile.old  # loaded before the tile's last PV GEMM
        else:
            old_rows, old_lse = self.load_old(
                mO, mLSE, seqlen, tiled_mma, tidx, m_block, head_idx, batch_idx
            )
        self.merge_old(acc_O, lse, old_rows, old_lse, seqlen, tiled_mma, tidx, m_block)
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
