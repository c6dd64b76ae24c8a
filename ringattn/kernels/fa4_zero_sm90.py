"""FlashAttention-4's SM90 forward that also zeroes its rows' unselected neighbours (imported only
where FA4 is).

Under ``head_groups`` a config ``(w, r)`` with offset ``o`` writes rows ``o, o + r, o + 2r, ...``
of each segment for its heads; the definition leaves the other ``r - 1`` rows of each stride
group at 0. The core zeroed them with a separate memory-bound pass (``ringattn.kernels.
unselected``: 9% of the causal forward's GPU time at 131K tokens on an H200, ``docs/benchmarks/
h200_perf.md`` step 22). Here each tile, after writing its output rows, writes zeros into the
rows ``shift`` elements away from each of them, for every ``shift`` of :attr:`zero_shifts`
(``(k - o) * h * d`` for ``k != o``: the rest of the row's stride group). The stores are issued
at the end of a compute-bound tile and nothing waits on them.

Every tile owns its stride groups (row ``j * r + k`` belongs to the tile that holds row
``j * r + o``), so no two CTAs write a row. Only full segments qualify (a tail segment's last
group may end past the sequence): :mod:`ringattn.kernels.fa4_zero` is handed those only.

The kernel is FA4's own (:class:`FlashAttentionForwardSm90`) with the output written by ordinary
stores instead of TMA (the zeros go through the output's pointer, which the TMA path does not
pass to the kernel), as :mod:`ringattn.kernels.fa4_merge_sm90` does.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils
from flash_attn.cute.flash_fwd import FlashAttentionForwardBase
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90

# the base class's epilogue (module level: the DSL re-parses jit methods with their globals)
_write_epilogue = FlashAttentionForwardBase.epilogue


def zero_fragment(gmem_tiled_copy, tidx, s_like, dtype, tile: tuple, cols, seqlen, block):
    """What a thread needs to write zeros into row tile ``block`` (of ``tile = (rows, cols)``)
    of a ``(seqlen, cols)`` tensor with ``gmem_tiled_copy``: ``(its slice, a zero fragment shaped
    as its partition of s_like, thread 0's coordinates, the column predicate, how many rows of
    the sequence lie from its first row on)``, for :func:`store_zeros`."""
    thr_copy = gmem_tiled_copy.get_slice(tidx)
    tZero = cute.make_fragment_like(thr_copy.partition_S(s_like), dtype)
    tZero.fill(0.0)
    cX = cute.make_identity_tensor(tile)
    tXcX = thr_copy.partition_S(cX)
    t0XcX = gmem_tiled_copy.get_slice(0).partition_S(cX)
    tXpX = utils.predicate_k(tXcX, limit=cols)
    return thr_copy, tZero, t0XcX, tXpX, seqlen - block * tile[0] - tXcX[0][0]


@cute.jit
def store_zeros(
    gmem_tiled_copy: cute.TiledCopy,
    thr_copy,
    tZero: cute.Tensor,
    t0XcX: cute.Tensor,
    tXpX,
    rows_left,
    mZ: cute.Tensor,
    tile: cutlass.Constexpr,
    block,
):
    """The thread's zeros (:func:`zero_fragment`) into row tile ``block`` of ``mZ``, rows in
    the sequence only (the columns under ``tXpX`` where it is not None)."""
    gZ = cute.local_tile(mZ, tile, (block, 0))
    tXgZ = thr_copy.partition_D(gZ)
    for rest_m in cutlass.range_constexpr(cute.size(tZero.shape[1])):
        if t0XcX[0, rest_m, 0][0] < rows_left:
            cute.copy(
                gmem_tiled_copy,
                tZero[None, rest_m, None],
                tXgZ[None, rest_m, None],
                pred=tXpX[None, rest_m, None] if cutlass.const_expr(tXpX is not None) else None,
            )


class ZeroingForwardSm90(FlashAttentionForwardSm90):
    """FA4's SM90 forward that writes zeros ``zero_shifts`` elements from each output row."""

    def __init__(self, *args, zero_shifts: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        # compile-time constants, multiples of 8 elements (16 bytes): the vector stores of the
        # output rows stay aligned when shifted
        self.zero_shifts = tuple(zero_shifts)

    def _setup_attributes(self):
        self.use_tma_O = False  # the zeros are written through mO's pointer
        super()._setup_attributes()

    @cute.jit
    def zero_neighbours(
        self,
        mO_cur: cute.Tensor,
        sO: cute.Tensor,
        seqlen,
        gmem_tiled_copy_O: cute.TiledCopy,
        tidx: cutlass.Int32,
        m_block: cutlass.Int32,
        shifts: cutlass.Constexpr,
    ):
        """Zeros into the rows ``shift`` elements (for each of ``shifts``) from this tile's
        valid output rows of ``mO_cur`` (its head's ``(L, d)`` rows), with the partition and row
        predicate of the base epilogue's own output stores."""
        tile = (self.tile_m, self.tile_hdimv)
        thr_copy, tZero, t0OcO, tOpO, rows_left = zero_fragment(
            gmem_tiled_copy_O, tidx, sO, self.dtype, tile, mO_cur.shape[1], seqlen.seqlen_q, m_block
        )
        for s in cutlass.range_constexpr(len(shifts)):
            mZ = cute.make_tensor(mO_cur.iterator + shifts[s], mO_cur.layout)
            store_zeros(
                gmem_tiled_copy_O,
                thr_copy,
                tZero,
                t0OcO,
                tOpO if cutlass.const_expr(self.check_hdim_v_oob) else None,
                rows_left,
                mZ,
                tile,
                m_block,
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
        mO_cur = seqlen.offset_batch_Q(mO, batch_idx, dim=3)[None, None, head_idx]
        self.zero_neighbours(mO_cur, sO, seqlen, gmem_tiled_copy_O, tidx, m_block, self.zero_shifts)
