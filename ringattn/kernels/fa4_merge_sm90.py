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
from functools import partial

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from flash_attn.cute import utils
from flash_attn.cute.flash_fwd import FlashAttentionForwardBase
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from quack import layout_utils

_LOG2_E = math.log2(math.e)
_LN2 = math.log(2.0)

# the base class's epilogue and consumer loop (module level: the DSL re-parses jit methods with
# their globals)
_write_epilogue = FlashAttentionForwardBase.epilogue
_consumer_loop = FlashAttentionForwardSm90.mma


@dsl_user_op
def _held(x: cutlass.Int32, *, loc=None, ip=None) -> cutlass.Int32:
    """``x`` through an opaque, side-effecting move: nothing computed from it is moved above
    this point (the compiler converted early-loaded rows to float32 right after their loads,
    waiting for them at the tile's start and doubling their registers)."""
    return cutlass.Int32(
        llvm.inline_asm(
            T.i32(),
            [cutlass.Int32(x).ir_value(loc=loc, ip=ip)],
            "mov.b32 $0, $1;",
            "=r,r",
            has_side_effects=True,
            is_align_stack=False,
            asm_dialect=llvm.AsmDialect.AD_ATT,
        )
    )


class _TileMask:
    """FA4's attention mask (``mask``) that, at a tile's first masking (its first key block,
    masked for the sequence's end: once per tile, at its main loop's start), first calls
    ``at_start(m_block, head_idx, batch_idx)``. All of it runs while FA4's kernel is traced."""

    def __init__(self, mask, at_start) -> None:
        self.mask, self.at_start = mask, at_start

    def apply_mask(self, acc_S, **kwargs) -> None:
        if kwargs["mask_seqlen"]:  # a Python bool (FA4's Constexpr)
            self.at_start(kwargs["m_block"], kwargs["head_idx"], kwargs["batch_idx"])
        self.mask.apply_mask(acc_S, **kwargs)


class MergingForwardSm90(FlashAttentionForwardSm90):
    """FA4's SM90 forward that merges each tile into the output and LSE it is given.

    ``early_old`` (prepared for step 46, not yet timed; ``fa4_merge.EARLY``): the tile's old
    rows and LSE are loaded into registers at the start of its main loop, where FA4's mask
    (the one hook inside its consumer loop that knows the tile) is first applied, and held
    there until the epilogue merges them: their latency under the whole main loop instead of
    two load latencies after it (step 45)."""

    def __init__(self, *args, early_old: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.early_old = early_old
        self._early = None  # while tracing: the tile's old rows and LSE, loaded at its start

    def _setup_attributes(self):
        self.use_tma_O = False  # the merge reads the old rows through mO's pointer
        super()._setup_attributes()

    def mma(self, *args):
        """FA4's consumer loop (called while tracing FA4's kernel; ``args``: FA4's, in FA4's
        order), its mask loading each tile's old rows first where ``early_old``."""
        self._early = None
        if self.early_old:
            tiled_mma_pv, mO, mLSE, tidx, mask_cls = args[1], args[2], args[3], args[15], args[20]

            def loading_mask(seqlen):
                load = partial(self._load_early, mO, mLSE, seqlen, tiled_mma_pv, tidx)
                return _TileMask(mask_cls(seqlen), load)

            args = (*args[:20], loading_mask, *args[21:])
        _consumer_loop(self, *args)

    def _load_early(self, mO, mLSE, seqlen, tiled_mma, tidx, m_block, head_idx, batch_idx):
        self._early = self.load_old(mO, mLSE, seqlen, tiled_mma, tidx, m_block, head_idx, batch_idx)

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
        """This thread's old rows and LSE of the tile, in registers (rows past the sequence's
        end not read)."""
        taccOgO, taccOgLSE, taccOcO, rows_left = self.old_views(
            mO, mLSE, seqlen, tiled_mma, tidx, m_block, head_idx, batch_idx
        )
        old_rows = cute.make_fragment_like(taccOgO, self.dtype)
        old_lse = cute.make_rmem_tensor((cute.size(taccOgO, mode=[0]),), Float32)
        for m in cutlass.range(cute.size(taccOgO, mode=[0]), unroll_full=True):
            if taccOcO[m, 0][0] < rows_left:
                cute.autovec_copy(taccOgO[m, None], old_rows[m, None])
                old_lse[m] = Float32(taccOgLSE[m, 0])
        return old_rows, old_lse

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
    def merge_loaded(
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
        """:meth:`merge_old` with the old rows and LSE :meth:`load_old` read (held until here:
        :func:`_held`)."""
        old_words = cute.recast_tensor(old_rows, cutlass.Int32)
        for i in cutlass.range_constexpr(cute.size(old_words)):
            old_words[i] = _held(old_words[i])
        taccOcO, rows_left = self.row_coords(seqlen, tiled_mma, tidx, m_block)
        acc_O_mn = layout_utils.reshape_acc_to_mn(acc_O)
        for m in cutlass.range(cute.size(lse), unroll_full=True):
            if taccOcO[m, 0][0] < rows_left:
                lse[m], w_old, w_new, inv = self.merge_weights(old_lse[m], lse[m])
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
        if cutlass.const_expr(self._early is not None):
            self.merge_loaded(acc_O, lse, *self._early, seqlen, tiled_mma, tidx, m_block)
        else:
            self.merge_old(
                acc_O, lse, mO, mLSE, seqlen, tiled_mma, tidx, m_block, head_idx, batch_idx
            )
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
