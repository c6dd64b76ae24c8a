"""FlashAttention-4's SM90 forward main loop with the causal diagonal block halved for its first
warp group (imported only where FA4 is).

Why: LongNet's causal blocks are short (issue 5's configs: 2048 rows each), so the diagonal key
block, which FA4 computes whole and then masks, is one in 8.5 key blocks of an average query
tile, against one in hundreds for a dense causal call: 6% of a 2048-row block's work is its
diagonal's masked upper triangle (``docs/benchmarks/h200_perf.md``, "Against the issue's
targets"). FA4's SM90 tile is 128 x 128 with two consumer warp groups of 64 query rows each;
on the diagonal block of a self-attention tile (equal query and key lengths, ``tile_m ==
tile_n``) the first warp group's rows ``0..63`` see only keys ``0..63``. So that warp group runs
``S = Q K^T`` there with a 64-wide wgmma (half the columns; the other half of its accumulator is
set to 0 and then masked, as FA4 masks it) and ``O += P V`` over the first 4 of its 8 k-steps
(the others would multiply ``P = 0``): a quarter of the diagonal block's MMA work, about 3% of a
2048-row causal block's. The second warp group and every other block run FA4's own code.

Every skipped term is an exact zero (a masked score's ``exp``), and each kept dot product runs
the same k-steps in the same order, so the output is meant to be bit-identical to FA4's (the
probe, ``experiments/fa4_probe.py --part diagonal``, checks it on the GPU).

:meth:`HalfDiagonalForwardSm90.mma` is FA4's ``mma`` (FA4 4.0's ``flash_fwd_sm90.py``) for the
blocks' case only (causal, intra-warp-group overlap, no score or mask mod, block sparsity,
PackGQA, local window or sink), with the two changes above; every other case calls FA4's. Each
halved step is a whole block call under a branch (no wgmma in flight across it), so ptxas keeps
FA4's wgmma pipeline within each block.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils_basic
from cutlass import Float32, const_expr, pipeline
from cutlass.cute.nvgpu import warpgroup
from flash_attn.cute import utils
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.softmax import Softmax
from flash_attn.cute.utils import AuxData
from quack import sm90_utils

# FA4's main loop (module level: the DSL re-parses jit methods with their globals)
_fa4_mma = FlashAttentionForwardSm90.mma
_NO_AUX = AuxData()  # FA4's default: no auxiliary tensors


@cute.jit
def gemm_k_prefix(
    tiled_mma: cute.TiledMma,
    acc: cute.Tensor,
    tCrA: cute.Tensor,
    tCrB: cute.Tensor,
    k_blocks: cutlass.Constexpr[int],
    zero_init,
    wg_wait: cutlass.Constexpr[int] = -1,
) -> None:
    """quack's ``sm90_utils.gemm`` over the first ``k_blocks`` k-steps only."""
    warpgroup.fence()
    mma_atom = cute.make_mma_atom(tiled_mma.op)
    mma_atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(k_blocks):
        cute.gemm(mma_atom, acc, tCrA[None, None, k], tCrB[None, None, k], acc)
        mma_atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    if const_expr(wg_wait >= 0):
        warpgroup.wait_group(wg_wait)


class HalfDiagonalForwardSm90(FlashAttentionForwardSm90):
    """FA4's SM90 forward whose first warp group computes the causal diagonal block's left half
    only (``half_diagonal``; module docstring)."""

    def __init__(self, *args, half_diagonal: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.half_diagonal = half_diagonal

    def _halves(self) -> bool:
        """Whether this kernel takes the halved main loop (a compile-time choice)."""
        return bool(
            self.half_diagonal
            and self.is_causal
            and not self.is_local
            and self.intra_wg_overlap
            and self.tile_m == self.tile_n == 128
            and self.num_wg_mma == 2
            and not self.pack_gqa
            and self.score_mod is None
            and self.mask_mod is None
            and not self.use_block_sparsity
            and not self.rescale_O_before_gemm
        )

    @cute.jit
    def mma(
        self,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        mO: cute.Tensor,
        mLSE,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sVt: cute.Tensor,
        sP,
        sO: cute.Tensor,
        learnable_sink,
        pipeline_k: pipeline.PipelineAsync,
        pipeline_v: pipeline.PipelineAsync,
        pipeline_q: pipeline.PipelineAsync,
        gmem_tiled_copy_O: cute.TiledCopy,
        tma_atom_O,
        tidx,
        softmax_scale_log2: Float32,
        softmax_scale,
        block_info,
        SeqlenInfoCls,
        AttentionMaskCls,
        TileSchedulerCls,
        blocksparse_tensors,
        aux_data: AuxData = _NO_AUX,
        fastdiv_mods=None,
    ):
        if const_expr(not self._halves() or learnable_sink is not None):
            _fa4_mma(
                self,
                tiled_mma_qk,
                tiled_mma_pv,
                mO,
                mLSE,
                sQ,
                sK,
                sVt,
                sP,
                sO,
                learnable_sink,
                pipeline_k,
                pipeline_v,
                pipeline_q,
                gmem_tiled_copy_O,
                tma_atom_O,
                tidx,
                softmax_scale_log2,
                softmax_scale,
                block_info,
                SeqlenInfoCls,
                AttentionMaskCls,
                TileSchedulerCls,
                blocksparse_tensors,
                aux_data,
                fastdiv_mods,
            )
        else:
            warp_group_idx = cute.arch.make_warp_uniform(tidx // self.num_threads_per_warp_group)
            warp_group_thread_layout = cute.make_layout(
                self.num_wg_mma, stride=self.num_threads_per_warp_group
            )
            thr_mma_qk = tiled_mma_qk.get_slice(tidx)
            wg_mma_qk = tiled_mma_qk.get_slice(warp_group_thread_layout(warp_group_idx))
            wg_mma_pv = tiled_mma_pv.get_slice(warp_group_thread_layout(warp_group_idx))
            _, tSrQ, tSrK = sm90_utils.partition_fragment_ABC(
                wg_mma_qk, (self.tile_m, self.tile_n, self.tile_hdim), sQ, sK
            )
            mma_qk_fn = partial(
                sm90_utils.gemm_zero_init, tiled_mma_qk, (self.tile_m, self.tile_n), tSrQ, tSrK
            )
            acc_O, tOrP, tOrVt = sm90_utils.partition_fragment_ABC(
                wg_mma_pv, (self.tile_m, self.tile_hdimv, self.tile_n), sP, sVt
            )
            mma_pv_fn = partial(sm90_utils.gemm_w_idx, tiled_mma_pv, acc_O, tOrP, tOrVt)

            # the diagonal block's left half: a 64-wide S = Q K^T over the first half of K's rows,
            # into the first half of the accumulator (wgmma's C fragment holds its 8-column chunks
            # in order), and O += P V over the first half of the k-steps
            half_n = self.tile_n // 2
            tiled_mma_qk_half = sm90_utils_basic.make_trivial_tiled_mma(
                self.dtype,
                self.dtype,
                warpgroup.OperandMajorMode.K,
                warpgroup.OperandMajorMode.K,
                Float32,
                atom_layout_mnk=(self.tile_m // 64, 1, 1),
                tiler_mn=(64, half_n),
            )
            wg_mma_qk_half = tiled_mma_qk_half.get_slice(warp_group_thread_layout(warp_group_idx))
            sK_half = cute.local_tile(sK, (half_n, self.tile_hdim, self.num_stages), (0, 0, 0))
            _, tSrQ_half, tSrK_half = sm90_utils.partition_fragment_ABC(
                wg_mma_qk_half, (self.tile_m, half_n, self.tile_hdim), sQ, sK_half
            )

            def mma_qk_half_fn(B_idx, wg_wait):
                acc_S = cute.make_rmem_tensor(
                    tiled_mma_qk.partition_shape_C((self.tile_m, self.tile_n)), Float32
                )
                acc_S.fill(0.0)  # (the right half: defined values for the mask to overwrite)
                acc_S_half = cute.make_tensor(
                    acc_S.iterator,
                    cute.make_layout(tiled_mma_qk_half.partition_shape_C((self.tile_m, half_n))),
                )
                sm90_utils.gemm(
                    tiled_mma_qk_half,
                    acc_S_half,
                    tSrQ_half,
                    tSrK_half[None, None, None, B_idx],
                    zero_init=True,
                    wg_wait=wg_wait,
                )
                return acc_S

            k_blocks_half = cute.size(tOrP.shape[2]) // 2

            def mma_pv_half_fn(B_idx, zero_init, wg_wait):
                gemm_k_prefix(
                    tiled_mma_pv,
                    acc_O,
                    tOrP,
                    tOrVt[None, None, None, B_idx],
                    k_blocks_half,
                    zero_init,
                    wg_wait,
                )

            smem_copy_atom_P = utils.get_smem_store_atom(
                self.arch.major * 10 + self.arch.minor, self.dtype
            )
            smem_thr_copy_P = cute.make_tiled_copy_C(smem_copy_atom_P, tiled_mma_qk).get_slice(tidx)
            tPsP = smem_thr_copy_P.partition_D(sP) if const_expr(sP is not None) else None
            smem_copy_params = SimpleNamespace(smem_thr_copy_P=smem_thr_copy_P, tPsP=tPsP)

            self.mma_init()

            q_consumer_phase = cutlass.Int32(0)
            kv_consumer_state = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Consumer, self.num_stages
            )

            tile_scheduler = TileSchedulerCls()
            work_tile = tile_scheduler.initial_work_tile_info()
            softmax = Softmax.create(
                softmax_scale_log2,
                num_rows=acc_O.shape[0][0] * acc_O.shape[1],
                softmax_scale=softmax_scale,
            )
            mma_one_n_block_all = partial(
                self.mma_one_n_block_intrawg_overlap,
                mma_qk_fn=mma_qk_fn,
                pipeline_k=pipeline_k,
                pipeline_v=pipeline_v,
                acc_O=acc_O,
                tOrP=tOrP,
                smem_copy_params=smem_copy_params,
                check_inf=True,
                scores_scale=None,
            )
            first_half_block = partial(
                self.first_half_block_overlap,
                pipeline_k=pipeline_k,
                tOrP=tOrP,
                smem_copy_params=smem_copy_params,
                scores_scale=None,
                softmax=softmax,
                acc_O=acc_O,
                is_first_block=True,
            )
            while work_tile.is_valid_tile:
                m_block, head_idx, batch_idx, _ = work_tile.tile_idx
                seqlen = SeqlenInfoCls(batch_idx)
                mask = AttentionMaskCls(seqlen)
                mask_fn = partial(
                    mask.apply_mask,
                    batch_idx=batch_idx,
                    head_idx=head_idx,
                    m_block=m_block,
                    thr_mma=thr_mma_qk,
                    mask_causal=True,
                    mask_local=False,
                    aux_data=aux_data,
                    fastdiv_mods=fastdiv_mods,
                    mask_mod=None,
                )
                mma_one_n_block = partial(
                    mma_one_n_block_all, seqlen=seqlen, softmax=softmax, score_mod_fn=None
                )
                n_block_min, n_block_max = block_info.get_n_block_min_max(seqlen, m_block)
                # the first key block is the tile's diagonal block (equal lengths, tile_m ==
                # tile_n), whose left half is all warp group 0's rows see
                halved = (
                    (warp_group_idx == 0)
                    & (n_block_max - 1 == m_block)
                    & (seqlen.seqlen_q == seqlen.seqlen_k)
                )
                pipeline_q.consumer_wait_w_index_phase(0, q_consumer_phase)
                O_should_accumulate = False
                # first block (FA4's "first half block": S, the mask, the softmax; its P V comes
                # with the next block's S)
                first = partial(
                    first_half_block,
                    n_block=n_block_max - 1,
                    seqlen=seqlen,
                    mask_fn=mask_fn,
                    score_mod_fn=None,
                )
                if halved:
                    kv_consumer_state = first(
                        kv_consumer_state=kv_consumer_state, mma_qk_fn=mma_qk_half_fn
                    )
                else:
                    kv_consumer_state = first(
                        kv_consumer_state=kv_consumer_state, mma_qk_fn=mma_qk_fn
                    )
                n_block_max -= 1
                # blocks with causal masking (none when the first block was the diagonal), then
                # the rest; each step's P V is the block before it in the walk (n_block + 1)
                n_block_min_causal_mask = block_info.get_n_block_min_causal_local_mask(
                    seqlen, m_block, n_block_min
                )
                for n_tile in cutlass.range(n_block_max - n_block_min_causal_mask, unroll=1):
                    n_block = n_block_max - 1 - n_tile
                    step = partial(
                        mma_one_n_block,
                        n_block=n_block,
                        mask_fn=partial(mask_fn, mask_seqlen=False),
                    )
                    zero_init = not O_should_accumulate
                    if halved & (n_block + 1 == m_block):
                        kv_consumer_state = step(
                            kv_consumer_state,
                            mma_pv_fn=partial(mma_pv_half_fn, zero_init=zero_init),
                        )
                    else:
                        kv_consumer_state = step(
                            kv_consumer_state, mma_pv_fn=partial(mma_pv_fn, zero_init=zero_init)
                        )
                    O_should_accumulate = True
                n_block_max = cutlass.min(n_block_max, n_block_min_causal_mask)
                for n_tile in cutlass.range(n_block_max - n_block_min, unroll=1):
                    n_block = n_block_max - 1 - n_tile
                    step = partial(mma_one_n_block, n_block=n_block, mask_fn=None)
                    zero_init = not O_should_accumulate
                    if halved & (n_block + 1 == m_block):
                        kv_consumer_state = step(
                            kv_consumer_state,
                            mma_pv_fn=partial(mma_pv_half_fn, zero_init=zero_init),
                        )
                    else:
                        kv_consumer_state = step(
                            kv_consumer_state, mma_pv_fn=partial(mma_pv_fn, zero_init=zero_init)
                        )
                    O_should_accumulate = True
                pipeline_q.consumer_release_w_index(0)
                # the last block's P V (the diagonal's when it was the tile's only block)
                last = partial(
                    self.last_half_block_overlap,
                    pipeline_v=pipeline_v,
                    zero_init=not O_should_accumulate,
                    softmax=softmax,
                    acc_O=acc_O,
                )
                if halved & (n_block_min == m_block):
                    kv_consumer_state = last(kv_consumer_state, mma_pv_fn=mma_pv_half_fn)
                else:
                    kv_consumer_state = last(kv_consumer_state, mma_pv_fn=mma_pv_fn)
                q_consumer_phase ^= 1

                row_scale = softmax.finalize(sink_val=None)
                softmax.rescale_O(acc_O, row_scale)
                self.epilogue(
                    acc_O,
                    softmax.row_sum,
                    mO,
                    mLSE,
                    sO,
                    seqlen,
                    gmem_tiled_copy_O,
                    tma_atom_O,
                    tiled_mma_pv,
                    tidx,
                    m_block,
                    head_idx,
                    batch_idx,
                )
                tile_scheduler.advance_to_next_work()
                work_tile = tile_scheduler.get_current_work()
