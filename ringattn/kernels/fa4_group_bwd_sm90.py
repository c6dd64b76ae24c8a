"""FlashAttention-4's SM90 backward over several groups of blocks in one launch (imported only
where FA4 is; launched by :mod:`ringattn.kernels.fa4_group_bwd`; compiles on a CPU machine too,
``experiments/cute_compile.py``).

The backward of :mod:`ringattn.kernels.fa4_group_sm90`: ``G`` groups (each a ``[B_g, L, H_g,
d]`` strided view of q, k, v, dO, dK, dV, with TMA descriptors of its own), one tile scheduler
over every group's key tiles (batch index = unit ``u``, one head). The statistics and the dQ
accumulator are *not* per group: the caller lays them out by unit, ``[U, 1, L_rounded]`` (LSE in
log2 units, dPsum) and ``[U, 1, L_rounded * d]`` (dQaccum, float32), units in group order and
``(segment, head)`` within a group as the forward's (``u = start_g + b * H_g + h``). So FA4's
dQ-accumulating warp and its loads of LSE / dPsum need no group at all; only the producer (Q, K,
V, dO) and the dK / dV epilogue go through the group's descriptors, under a branch on ``g``. The
epilogue also writes the zeros of the rows the group's config leaves out, in dQ, dK and dV (a key
tile's rows are its query tile's rows, so each stride group has one owner), by ordinary stores
that nothing waits for, as :mod:`ringattn.kernels.fa4_zero_sm90` does in the forward.

Left to the caller (:mod:`ringattn.kernels.fa4_group_bwd`): dPsum and LSE * log2(e) by unit
(:mod:`ringattn.kernels.unit_stats`, one Triton launch where FA4's preprocess runs once per
config) and the dQaccum zeroed, and dQ from dQaccum (:class:`GroupedPostprocessSm90` below, FA4's
postprocess over every group in one launch).

Also here, since it shares that postprocess's tile: :class:`AddingPostprocessSm90`, FA4's own dQ
postprocess adding into dQ instead of storing (for ``lse``'s merged blocks,
:mod:`ringattn.kernels.fa4_add`).
"""

from __future__ import annotations

import math
from functools import partial

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync
from flash_attn.cute import copy_utils as fa4_copy_utils
from flash_attn.cute import pipeline, utils
from flash_attn.cute.block_info import BlockInfo
from flash_attn.cute.cute_dsl_utils import assume_tensor_aligned
from flash_attn.cute.flash_bwd_postprocess import FlashAttentionBackwardPostprocess
from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90
from flash_attn.cute.mask import AttentionMask
from flash_attn.cute.seqlen_info import SeqlenInfoQK
from flash_attn.cute.tile_scheduler import SingleTileScheduler, TileSchedulerArguments
from flash_attn.cute.utils import AuxData
from quack import copy_utils, layout_utils

from ringattn.kernels.fa4_group_sm90 import UnitGroups
from ringattn.kernels.fa4_zero_sm90 import store_zeros, zero_fragment

# the base class's epilogue (module level: the DSL re-parses jit methods with their globals)
_epilogue_dKV = FlashAttentionBackwardSm90.epilogue_dKV


class GroupedBackwardSm90(UnitGroups, FlashAttentionBackwardSm90):
    """FA4's SM90 backward over ``len(heads)`` groups of blocks of one sequence length
    (``heads[g]``: group ``g``'s head count). ``zero_shifts[g]``: the element shifts from each
    of group ``g``'s rows to the rows its config leaves out; each key tile's epilogue writes
    zeros there in dQ, dK and dV (the rows of a key tile are its query tile's: self-attention),
    as the grouped forward does in its output, so the core's fill of the gradients skips them."""

    def __init__(
        self,
        *args,
        heads: tuple[int, ...] = (),
        zero_shifts: tuple[tuple[int, ...], ...] = (),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.heads = tuple(heads)
        self.zero_shifts = tuple(tuple(s) for s in zero_shifts) or ((),) * len(self.heads)
        assert len(self.zero_shifts) == len(self.heads) > 0
        assert self.qhead_per_kvhead == 1 and not self.deterministic
        self.zero_runs = tuple(_run_of(shifts) for shifts in self.zero_shifts)

    @cute.jit
    def __call__(
        self,
        mQs: tuple,  # per group: (B_g, L, H_g, d) views
        mKs: tuple,
        mVs: tuple,
        mdOs: tuple,
        mLSE: cute.Tensor,  # (U, 1, L_rounded), log2 units
        mdPsum: cute.Tensor,  # (U, 1, L_rounded)
        mdQaccum: cute.Tensor,  # (U, 1, L_rounded * d), float32
        mdKs: tuple,  # per group: (B_g, L, H_g, d) views
        mdVs: tuple,
        mdQs: tuple,  # per group: (B_g, L, H_g, d) views (only their unselected rows written)
        softmax_scale: Float32,
        stream=None,
    ):
        G = len(self.heads)
        self.varlen_k = False
        self.is_varlen_q = False
        self._check_type(
            mQs[0].element_type,
            mKs[0].element_type,
            mVs[0].element_type,
            mdOs[0].element_type,
            mLSE.element_type,
            mdPsum.element_type,
            mdQaccum.element_type,
            mdKs[0].element_type,
            mdVs[0].element_type,
        )
        order = [1, 3, 2, 0]  # (B, L, H, d) -> (L, d, H, B)
        mQs, mKs, mVs, mdOs, mdKs, mdVs, mdQs = [
            [layout_utils.select(assume_tensor_aligned(t), order) for t in ts]
            for ts in (mQs, mKs, mVs, mdOs, mdKs, mdVs, mdQs)
        ]
        # the gradients' own views, for the zeros (the TMA tensors below are coordinates)
        mZs = tuple((mdQs[g], mdKs[g], mdVs[g]) for g in range(G))
        mLSE, mdPsum, mdQaccum = [
            layout_utils.select(assume_tensor_aligned(t), [2, 1, 0])
            for t in (mLSE, mdPsum, mdQaccum)
        ]
        tiled_mma_SdP, tiled_mma_dK, tiled_mma_dV, tiled_mma_dQ = self._get_tiled_mma()
        self.num_mma_threads = tiled_mma_SdP.size
        assert self.num_mma_threads + 128 == self.num_threads
        self.num_threads_per_warp_group = 128
        self.num_producer_threads = 32
        if const_expr(self.num_wg_mma == 2):
            if const_expr(self.num_wg_dQ == 1):
                self.num_mma_regs_wg0, self.num_mma_regs_wg1 = 256, 224
            else:
                self.num_mma_regs_wg0, self.num_mma_regs_wg1 = 240, 240
            self.num_mma_regs = self.num_mma_regs_wg0
            self.num_producer_regs = 24
        else:
            self.num_mma_regs_wg0 = self.num_mma_regs_wg1 = self.num_mma_regs = 160
            self.num_producer_regs = 32
        self._setup_attributes()
        SharedStorage = self._get_shared_storage_cls()
        mQ, mK, mV, mdO = mQs[0], mKs[0], mVs[0], mdOs[0]
        self.tma_copy_bytes = {
            name: cute.size_in_bytes(mX.element_type, cute.select(layout, mode=[0, 1]))
            for name, mX, layout in [
                ("Q", mQ, self.sQ_layout),
                ("K", mK, self.sK_layout),
                ("V", mV, self.sV_layout),
                ("dO", mdO, self.sdO_layout),
            ]
        }
        self.tma_copy_bytes["LSE"] = self.tile_m * Float32.width // 8
        self.tma_copy_bytes["dPsum"] = self.tile_m * Float32.width // 8
        self.tma_copy_bytes["dQ"] = (
            self.tile_m * self.tile_hdim * Float32.width // 8 // self.num_wg_dQ
        )
        self.tma_copy_bytes["dKacc"] = self.tile_n * self.tile_hdim * Float32.width // 8
        self.tma_copy_bytes["dVacc"] = self.tile_n * self.tile_hdimv * Float32.width // 8

        load_op, store_op = cpasync.CopyBulkTensorTileG2SOp(), cpasync.CopyBulkTensorTileS2GOp()
        tma_Q, tma_K, tma_V, tma_dO, tma_dK, tma_dV = [], [], [], [], [], []
        for g in cutlass.range_constexpr(G):
            for atoms, op, tensor, layout, tile in (
                (tma_Q, load_op, mQs[g], self.sQ_layout, (self.tile_m, self.tile_hdim)),
                (tma_K, load_op, mKs[g], self.sK_layout, (self.tile_n, self.tile_hdim)),
                (tma_V, load_op, mVs[g], self.sV_layout, (self.tile_n, self.tile_hdimv)),
                (tma_dO, load_op, mdOs[g], self.sdO_layout, (self.tile_m, self.tile_hdimv)),
                (tma_dK, store_op, mdKs[g], self.sK_layout, (self.tile_n, self.tile_hdim)),
                (tma_dV, store_op, mdVs[g], self.sV_layout, (self.tile_n, self.tile_hdimv)),
            ):
                atoms.append(
                    cpasync.make_tiled_tma_atom(op, tensor, cute.select(layout, mode=[0, 1]), tile)
                )
        units = self.total_units(self.unit_counts(mQs))
        TileScheduler = SingleTileScheduler
        self.spt = False
        tile_sched_args = TileSchedulerArguments(
            cute.ceil_div(cute.size(mK.shape[0]), self.tile_n),
            1,
            units,
            1,  # num_splits
            cute.size(mQ.shape[0]),
            mQ.shape[1],
            mV.shape[1],
            total_q=cute.size(mK.shape[0]) * units,
            tile_shape_mn=(self.tile_n, self.tile_m),  # the roles of Q and K swapped
            mCuSeqlensQ=None,
            mSeqUsedQ=None,
            qhead_per_kvhead_packgqa=1,
            element_size=self.dtype.width // 8,
            is_persistent=False,
            lpt=False,
            head_swizzle=False,
        )
        tile_sched_params = TileScheduler.to_underlying_arguments(tile_sched_args)
        grid_dim = TileScheduler.get_grid_shape(tile_sched_params)
        softmax_scale_log2 = softmax_scale * math.log2(math.e)
        self.use_block_sparsity = False

        def tensors(atoms):
            return tuple(t for _, t in atoms)

        def descriptors(atoms):
            return tuple(a for a, _ in atoms)

        self.kernel(
            tensors(tma_Q),
            tensors(tma_K),
            tensors(tma_V),
            tensors(tma_dO),
            tensors(tma_dK),
            tensors(tma_dV),
            mZs,
            descriptors(tma_Q),
            descriptors(tma_K),
            descriptors(tma_V),
            descriptors(tma_dO),
            descriptors(tma_dK),
            descriptors(tma_dV),
            mLSE,
            mdPsum,
            mdQaccum,
            self.sQ_layout,
            self.sK_layout,
            self.sV_layout,
            self.sPdS_layout,
            self.sdO_layout,
            self.sdQaccum_layout,
            self.r2s_tiled_copy_dQaccum,
            tiled_mma_SdP,
            tiled_mma_dK,
            tiled_mma_dV,
            tiled_mma_dQ,
            softmax_scale_log2,
            softmax_scale,
            tile_sched_params,
            TileScheduler,
            SharedStorage,
        ).launch(
            grid=grid_dim,
            block=[self.num_threads, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
            use_pdl=True,
        )

    @cute.kernel
    def kernel(
        self,
        mQs: tuple,
        mKs: tuple,
        mVs: tuple,
        mdOs: tuple,
        mdKs: tuple,
        mdVs: tuple,
        mZs: tuple,
        tma_atoms_Q: tuple,
        tma_atoms_K: tuple,
        tma_atoms_V: tuple,
        tma_atoms_dO: tuple,
        tma_atoms_dK: tuple,
        tma_atoms_dV: tuple,
        mLSE: cute.Tensor,
        mdPsum: cute.Tensor,
        mdQaccum: cute.Tensor,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        sPdS_layout: cute.ComposedLayout,
        sdO_layout: cute.ComposedLayout,
        sdQaccum_layout: cute.Layout,
        r2s_tiled_copy_dQaccum: cute.TiledCopy,
        tiled_mma_SdP: cute.TiledMma,
        tiled_mma_dK: cute.TiledMma,
        tiled_mma_dV: cute.TiledMma,
        tiled_mma_dQ: cute.TiledMma,
        softmax_scale_log2,
        softmax_scale,
        tile_sched_params,
        TileScheduler: cutlass.Constexpr,
        SharedStorage: cutlass.Constexpr,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            for g in cutlass.range_constexpr(len(self.heads)):
                for atoms in (
                    tma_atoms_Q,
                    tma_atoms_K,
                    tma_atoms_V,
                    tma_atoms_dO,
                    tma_atoms_dK,
                    tma_atoms_dV,
                ):
                    cpasync.prefetch_descriptor(atoms[g])

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        pipeline_producer_group = cutlass.pipeline.CooperativeGroup(cutlass.pipeline.Agent.Thread)
        pipeline_consumer_group = cutlass.pipeline.CooperativeGroup(
            cutlass.pipeline.Agent.Thread, self.num_mma_threads // cute.arch.WARP_SIZE
        )
        pipeline_Q = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_ptr_Q.data_ptr(),
            num_stages=self.Q_stage,
            producer_group=pipeline_producer_group,
            consumer_group=pipeline_consumer_group,
            tx_count=self.tma_copy_bytes["Q"] + self.tma_copy_bytes["LSE"],
            defer_sync=True,
        )
        pipeline_dO = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_ptr_dO.data_ptr(),
            num_stages=self.dO_stage,
            producer_group=pipeline_producer_group,
            consumer_group=pipeline_consumer_group,
            tx_count=self.tma_copy_bytes["dO"] + self.tma_copy_bytes["dPsum"],
            defer_sync=False,
        )
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sdO = storage.sdO.get_tensor(sdO_layout.outer, swizzle=sdO_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sP = None
        if const_expr(not self.mma_dkv_is_rs):
            sP = storage.sP.get_tensor(sPdS_layout.outer, swizzle=sPdS_layout.inner)
        sdS = storage.sdS.get_tensor(sPdS_layout.outer, swizzle=sPdS_layout.inner)
        sLSE = storage.sLSE.get_tensor(
            cute.make_layout(
                (self.tile_m, self.Q_stage), stride=(1, cute.round_up(self.tile_m, 64))
            )
        )
        sdPsum = storage.sdPsum.get_tensor(
            cute.make_layout(
                (self.tile_m, self.dO_stage), stride=(1, cute.round_up(self.tile_m, 64))
            )
        )
        sdQaccum = storage.sdQaccum.get_tensor(sdQaccum_layout)

        block_info = BlockInfo(
            self.tile_m,
            self.tile_n,
            self.is_causal,
            self.is_local,
            False,
            None,
            None,
            qhead_per_kvhead_packgqa=1,
        )
        # every group has the same L (the kernel's only sequence length)
        SeqlenInfoCls = partial(
            SeqlenInfoQK.create,
            seqlen_q_static=mQs[0].shape[0],
            seqlen_k_static=mKs[0].shape[0],
            mCuSeqlensQ=None,
            mCuSeqlensK=None,
            mSeqUsedQ=None,
            mSeqUsedK=None,
            tile_m=self.tile_m,
            tile_n=self.tile_n,
        )
        AttentionMaskCls = partial(AttentionMask, self.tile_m, self.tile_n, swap_AB=self.SdP_swapAB)
        TileSchedulerCls = partial(TileScheduler.create, tile_sched_params)

        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.num_producer_regs)
            if warp_idx == 0:
                self.load_groups(
                    mQs,
                    mKs,
                    mVs,
                    mdOs,
                    mLSE,
                    mdPsum,
                    sQ,
                    sK,
                    sV,
                    sdO,
                    sLSE,
                    sdPsum,
                    tma_atoms_Q,
                    tma_atoms_K,
                    tma_atoms_V,
                    tma_atoms_dO,
                    pipeline_Q,
                    pipeline_dO,
                    block_info,
                    SeqlenInfoCls,
                    TileSchedulerCls,
                )
            if warp_idx == 1:  # FA4's own: dQaccum is laid out by unit (batch), one head
                self.dQaccum_store(mdQaccum, sdQaccum, block_info, TileSchedulerCls, SeqlenInfoCls)
        else:
            tidx, _, _ = cute.arch.thread_idx()
            tidx = tidx - 128
            mma_args = (
                tiled_mma_SdP,
                tiled_mma_dK,
                tiled_mma_dV,
                tiled_mma_dQ,
                (mdKs, mQs, mZs),  # -> self.epilogue_dKV, which picks the group's
                mdVs,
                None,
                None,
                mdQaccum,
                sQ,
                sK,
                sV,
                sdO,
                sP,
                sdS,
                sLSE,
                sdPsum,
                sdQaccum,
                pipeline_Q,
                pipeline_dO,
                tidx,
                tma_atoms_dK,
                tma_atoms_dV,
                r2s_tiled_copy_dQaccum,
                softmax_scale_log2,
                softmax_scale,
                block_info,
                SeqlenInfoCls,
                AttentionMaskCls,
                TileSchedulerCls,
                AuxData(),
                (None, None),
                None,
                None,
            )
            if const_expr(self.num_wg_dQ == self.num_wg_mma):
                cute.arch.setmaxregister_increase(self.num_mma_regs_wg0)
                self.mma(*mma_args, is_dQ_wg=True)
            else:
                warp_idx_in_mma = cute.arch.make_warp_uniform(cute.arch.warp_idx()) - 4
                if warp_idx_in_mma < 4:
                    cute.arch.setmaxregister_increase(self.num_mma_regs_wg0)
                    self.mma(*mma_args, is_dQ_wg=True)
                else:
                    cute.arch.setmaxregister_increase(self.num_mma_regs_wg1)
                    self.mma(*mma_args, is_dQ_wg=False)

    @cute.jit
    def load_groups(
        self,
        mQs: tuple,
        mKs: tuple,
        mVs: tuple,
        mdOs: tuple,
        mLSE: cute.Tensor,
        mdPsum: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        sdO: cute.Tensor,
        sLSE: cute.Tensor,
        sdPsum: cute.Tensor,
        tma_atoms_Q: tuple,
        tma_atoms_K: tuple,
        tma_atoms_V: tuple,
        tma_atoms_dO: tuple,
        pipeline_Q,
        pipeline_dO,
        block_info: BlockInfo,
        SeqlenInfoCls,
        TileSchedulerCls,
    ):
        warp_idx_in_wg = cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4
        if warp_idx_in_wg == 0:
            producer_state_Q = cutlass.pipeline.make_pipeline_state(
                cutlass.pipeline.PipelineUserType.Producer, self.Q_stage
            )
            producer_state_dO = cutlass.pipeline.make_pipeline_state(
                cutlass.pipeline.PipelineUserType.Producer, self.dO_stage
            )
            tile_scheduler = TileSchedulerCls()
            work_tile = tile_scheduler.initial_work_tile_info()
            while work_tile.is_valid_tile:
                n_block, _, unit, _ = work_tile.tile_idx
                seqlen = SeqlenInfoCls(unit)
                # the statistics are laid out by unit (one head): no group needed
                mLSE_cur = seqlen.offset_batch_Q(mLSE, unit, dim=2, padded=True)[None, 0]
                mdPsum_cur = seqlen.offset_batch_Q(mdPsum, unit, dim=2, padded=True)[None, 0]
                gLSE = cute.local_tile(mLSE_cur, (self.tile_m,), (None,))
                gdPsum = cute.local_tile(mdPsum_cur, (self.tile_m,), (None,))
                g, start = self.group_of(self.unit_counts(mQs), unit)
                local = unit - start
                for i in cutlass.range_constexpr(len(self.heads)):
                    if g == i:
                        head_idx = local % self.heads[i]
                        batch_idx = local // self.heads[i]
                        producer_state_Q, producer_state_dO = self.load_tile(
                            mQs[i][None, None, head_idx, batch_idx],
                            mKs[i][None, None, head_idx, batch_idx],
                            mVs[i][None, None, head_idx, batch_idx],
                            mdOs[i][None, None, head_idx, batch_idx],
                            gLSE,
                            gdPsum,
                            sQ,
                            sK,
                            sV,
                            sdO,
                            sLSE,
                            sdPsum,
                            tma_atoms_Q[i],
                            tma_atoms_K[i],
                            tma_atoms_V[i],
                            tma_atoms_dO[i],
                            pipeline_Q,
                            pipeline_dO,
                            block_info,
                            seqlen,
                            n_block,
                            producer_state_Q,
                            producer_state_dO,
                        )
                tile_scheduler.prefetch_next_work()
                tile_scheduler.advance_to_next_work()
                work_tile = tile_scheduler.get_current_work()

    @cute.jit
    def load_tile(
        self,
        mQ_cur: cute.Tensor,
        mK_cur: cute.Tensor,
        mV_cur: cute.Tensor,
        mdO_cur: cute.Tensor,
        gLSE: cute.Tensor,
        gdPsum: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        sdO: cute.Tensor,
        sLSE: cute.Tensor,
        sdPsum: cute.Tensor,
        tma_atom_Q,
        tma_atom_K,
        tma_atom_V,
        tma_atom_dO,
        pipeline_Q,
        pipeline_dO,
        block_info: BlockInfo,
        seqlen,
        n_block: Int32,
        producer_state_Q,
        producer_state_dO,
    ):
        """FA4's producer for one key tile (its dense path), through one group's descriptors."""
        gK = cute.local_tile(mK_cur, (self.tile_n, self.tile_hdim), (n_block, 0))
        gV = cute.local_tile(mV_cur, (self.tile_n, self.tile_hdimv), (n_block, 0))
        gQ = cute.local_tile(mQ_cur, (self.tile_m, self.tile_hdim), (None, 0))
        gdO = cute.local_tile(mdO_cur, (self.tile_m, self.tile_hdimv), (None, 0))
        load_K, _, _ = copy_utils.tma_get_copy_fn(
            tma_atom_K, 0, cute.make_layout(1), gK, sK, single_stage=True
        )
        load_V, _, _ = copy_utils.tma_get_copy_fn(
            tma_atom_V, 0, cute.make_layout(1), gV, sV, single_stage=True
        )
        load_Q, _, _ = copy_utils.tma_get_copy_fn(tma_atom_Q, 0, cute.make_layout(1), gQ, sQ)
        load_Q = copy_utils.tma_producer_copy_fn(load_Q, pipeline_Q)
        load_dO, _, _ = copy_utils.tma_get_copy_fn(tma_atom_dO, 0, cute.make_layout(1), gdO, sdO)
        load_dO = copy_utils.tma_producer_copy_fn(load_dO, pipeline_dO)
        load_LSE = copy_utils.cpasync_bulk_get_copy_fn(gLSE, sLSE)
        load_LSE = copy_utils.tma_producer_copy_fn(load_LSE, pipeline_Q)
        load_dPsum = copy_utils.cpasync_bulk_get_copy_fn(gdPsum, sdPsum)
        load_dPsum = copy_utils.tma_producer_copy_fn(load_dPsum, pipeline_dO)

        m_block_min, m_block_max = block_info.get_m_block_min_max(seqlen, n_block)
        pipeline_Q.producer_acquire(producer_state_Q, extra_tx_count=self.tma_copy_bytes["K"])
        load_K(tma_bar_ptr=pipeline_Q.producer_get_barrier(producer_state_Q))
        load_Q(m_block_min, producer_state=producer_state_Q)
        cute.arch.griddepcontrol_wait()  # the statistics come from the kernels before
        load_LSE(m_block_min, producer_state=producer_state_Q)
        producer_state_dO_cur = (
            producer_state_dO if const_expr(self.Q_stage != self.dO_stage) else producer_state_Q
        )
        pipeline_dO.producer_acquire(producer_state_dO_cur, extra_tx_count=self.tma_copy_bytes["V"])
        load_V(tma_bar_ptr=pipeline_dO.producer_get_barrier(producer_state_dO_cur))
        load_dO(m_block_min, producer_state=producer_state_dO_cur)
        load_dPsum(m_block_min, producer_state=producer_state_dO_cur)
        producer_state_Q.advance()
        producer_state_dO.advance()
        for m_block in cutlass.range(m_block_min + 1, m_block_max, unroll=1):
            pipeline_Q.producer_acquire(producer_state_Q)
            load_Q(m_block, producer_state=producer_state_Q)
            load_LSE(m_block, producer_state=producer_state_Q)
            producer_state_dO_cur = (
                producer_state_dO if const_expr(self.Q_stage != self.dO_stage) else producer_state_Q
            )
            pipeline_dO.producer_acquire(producer_state_dO_cur)
            load_dO(m_block, producer_state=producer_state_dO_cur)
            load_dPsum(m_block, producer_state=producer_state_dO_cur)
            producer_state_Q.advance()
            producer_state_dO.advance()
        return producer_state_Q, producer_state_dO

    @cute.jit
    def epilogue_dKV(
        self,
        acc_dV: cute.Tensor,
        mdVs: tuple,
        sV: cute.Tensor,
        acc_dK: cute.Tensor,
        mdKs_and_mQs: tuple,
        sK: cute.Tensor,
        seqlen,
        tma_atoms_dK: tuple,
        tma_atoms_dV: tuple,
        tiled_mma_dK: cute.TiledMma,
        tiled_mma_dV: cute.TiledMma,
        tidx: Int32,
        n_block: Int32,
        head_idx: Int32,
        unit: Int32,
        qhead_per_kvhead_divmod=None,
        mdK_semaphore=None,
        mdV_semaphore=None,
    ):
        mdKs, mQs, mZs = mdKs_and_mQs
        g, start = self.group_of(self.unit_counts(mQs), unit)
        local = unit - start
        for i in cutlass.range_constexpr(len(self.heads)):
            if g == i:
                _epilogue_dKV(
                    self,
                    acc_dV,
                    mdVs[i],
                    sV,
                    acc_dK,
                    mdKs[i],
                    sK,
                    seqlen,
                    tma_atoms_dK[i],
                    tma_atoms_dV[i],
                    tiled_mma_dK,
                    tiled_mma_dV,
                    tidx,
                    n_block,
                    local % self.heads[i],
                    local // self.heads[i],
                )
                if const_expr(len(self.zero_shifts[i]) > 0):
                    for mX in mZs[i]:  # dQ, dK, dV
                        self.zero_neighbours(
                            mX[None, None, local % self.heads[i], local // self.heads[i]],
                            sK,
                            seqlen,
                            tidx,
                            n_block,
                            self.zero_runs[i],
                        )

    @cute.jit
    def zero_neighbours(
        self,
        mX_cur: cute.Tensor,
        sK: cute.Tensor,
        seqlen,
        tidx: Int32,
        n_block: Int32,
        run: cutlass.Constexpr,
    ):
        """Zeros into the rows ``(k - o) * stride`` elements from this key tile's valid rows of
        ``mX_cur`` (one head's ``(L, d)`` rows of a gradient) for ``k != o`` in ``range(r)``
        (``run = (o, r, stride)``: the group's shifts, :func:`_run_of`), by ordinary vector
        stores of the MMA threads (``sK``: only its shape, for the register fragment; the
        zeroing forward's :func:`~ringattn.kernels.fa4_zero_sm90.store_zeros`). Nothing
        reads them in this kernel, so nothing waits for them. The shifts go by in a loop, not
        unrolled: unrolled over three gradients and up to 15 shifts per group, the kernel took
        ~80 s to compile instead of ~10."""
        offset, rate, stride = run
        # (FA4's tiled_copy_2d: 16-byte vectors along rows of tile_hdim; quack's function of
        # that name takes threads per row and one element per copy unless told)
        gmem_tiled_copy = fa4_copy_utils.tiled_copy_2d(
            self.dtype, self.tile_hdim, self.num_mma_threads
        )
        tile = (self.tile_n, self.tile_hdim)
        thr_copy, tZero, t0XcX, tXpX, rows_left = zero_fragment(
            gmem_tiled_copy, tidx, sK, self.dtype, tile, mX_cur.shape[1], seqlen.seqlen_k, n_block
        )
        for j in cutlass.range(rate - 1, unroll=1):
            k = j + Int32(j >= offset)  # (the row's own k = o skipped)
            # (a multiple of 8 elements: the 16-byte vector stores stay aligned when shifted)
            moved = mX_cur.iterator + (k - offset) * stride
            ptr = cute.make_ptr(self.dtype, moved.toint(), cute.AddressSpace.gmem, assumed_align=16)
            mZ = cute.make_tensor(ptr, mX_cur.layout)
            # (the column predicate only where the head dim is not the tile's, as FA4's own
            # stores: given, it split every 16-byte store into eight 2-byte ones)
            store_zeros(
                gmem_tiled_copy,
                thr_copy,
                tZero,
                t0XcX,
                tXpX if const_expr(self.check_hdim_oob) else None,
                rows_left,
                mZ,
                tile,
                n_block,
            )


def _run_of(shifts: tuple[int, ...]) -> tuple[int, int, int]:
    """``(o, r, stride)`` with ``shifts == ((k - o) * stride for k in range(r) if k != o)``
    (``ringattn.core.neighbour_shifts``'); ``(0, 1, 0)`` for none."""
    if not shifts:
        return 0, 1, 0
    stride = min(abs(s) for s in shifts)
    offset, rate = sum(s < 0 for s in shifts), len(shifts) + 1
    assert stride % 8 == 0 and shifts == tuple(
        (k - offset) * stride for k in range(rate) if k != offset
    ), shifts
    return offset, rate, stride


class DQConvert:
    """FA4's SM90 dQ postprocess of one tile, shared by :class:`GroupedPostprocessSm90` and
    :class:`AddingPostprocessSm90` (mixed into FA4's postprocess class: its tiles, copies and
    shared-memory layouts)."""

    adding = False  # step 5 adds into dQ's rows (read at compile time)

    @cute.jit
    def shared_tiles(self, sdQaccum_layout: cute.Layout, sdQ_layout: cute.ComposedLayout):
        """The tile's shared memory: the float32 accumulator, and dQ over the same bytes."""
        smem = cutlass.utils.SmemAllocator()
        sdQaccum = smem.allocate_tensor(Float32, sdQaccum_layout, byte_alignment=1024)
        sdQ = cute.make_tensor(cute.recast_ptr(sdQaccum.iterator, dtype=self.dtype), sdQ_layout)
        return sdQaccum, sdQ

    @cute.jit
    def convert_tile(
        self,
        mdQaccum_cur: cute.Tensor,
        mdQ_cur: cute.Tensor,
        seqlen_q: Int32,
        head_dim: Int32,
        m_block: Int32,
        scale: Float32,
        tiled_mma: cute.TiledMma,
        sdQaccum: cute.Tensor,
        sdQ: cute.Tensor,
        g2s_tiled_copy_dQaccum: cute.TiledCopy,
        s2r_tiled_copy_dQaccum: cute.TiledCopy,
        gmem_tiled_copy_dQ: cute.TiledCopy,
    ):
        """FA4's SM90 postprocess of one tile (its steps 1-5) on one unit's rows; under
        ``adding`` its step 5 adds the tile into the rows (read, summed in float32, rounded
        once) instead of storing it."""
        tidx, _, _ = cute.arch.thread_idx()
        sdQaccum_flat = cute.make_tensor(sdQaccum.iterator, cute.make_layout(cute.size(sdQaccum)))
        sdQt = layout_utils.transpose_view(sdQ)
        gdQaccum = cute.local_tile(mdQaccum_cur, (self.tile_m * self.tile_hdim,), (m_block,))
        gdQ = cute.local_tile(mdQ_cur, (self.tile_m, self.tile_hdim), (m_block, 0))
        # 1: dQaccum gmem -> smem
        g2s_thr_copy_dQaccum = g2s_tiled_copy_dQaccum.get_slice(tidx)
        tdQgdQaccum = g2s_thr_copy_dQaccum.partition_S(gdQaccum)
        tdQsdQaccumg2s = g2s_thr_copy_dQaccum.partition_D(sdQaccum_flat)
        cute.copy(g2s_tiled_copy_dQaccum, tdQgdQaccum, tdQsdQaccumg2s)
        cute.arch.cp_async_commit_group()
        cute.arch.cp_async_wait_group(0)
        cute.arch.barrier()
        # 2: smem -> registers, scaled and converted
        s2r_thr_copy_dQaccum = s2r_tiled_copy_dQaccum.get_slice(tidx)
        tdQsdQaccum = s2r_thr_copy_dQaccum.partition_S(sdQaccum)
        tile_shape = (self.tile_m, self.tile_hdim)
        acc_shape = tiled_mma.partition_shape_C(
            tile_shape if const_expr(not self.dQ_swapAB) else tile_shape[::-1]
        )
        acc = cute.make_rmem_tensor(acc_shape, Float32)
        tdQrdQaccum = cute.make_tensor(acc.iterator, cute.make_layout(tdQsdQaccum.shape))
        cute.autovec_copy(tdQsdQaccum, tdQrdQaccum)
        rdQ = cute.make_fragment_like(acc, self.dtype)
        rdQ.store((acc.load() * scale).to(self.dtype))
        # 3: registers -> smem
        cute.arch.barrier()
        copy_atom_r2s_dQ = utils.get_smem_store_atom(
            self.arch, self.dtype, transpose=self.dQ_swapAB
        )
        tiled_copy_r2s_dQ = cute.make_tiled_copy_C(copy_atom_r2s_dQ, tiled_mma)
        thr_copy_r2s_dQ = tiled_copy_r2s_dQ.get_slice(tidx)
        cdQ = cute.make_identity_tensor((self.tile_m, self.tile_hdim))
        taccdQrdQ = thr_copy_r2s_dQ.retile(rdQ)
        taccdQsdQ = thr_copy_r2s_dQ.partition_D(sdQ if const_expr(not self.dQ_swapAB) else sdQt)
        cute.copy(thr_copy_r2s_dQ, taccdQrdQ, taccdQsdQ)
        # 4: smem -> registers for coalesced stores; 5: -> gmem, rows past L left alone
        cute.arch.barrier()
        gmem_thr_copy_dQ = gmem_tiled_copy_dQ.get_slice(tidx)
        tdQgdQ = gmem_thr_copy_dQ.partition_S(gdQ)
        tdQsdQ = gmem_thr_copy_dQ.partition_D(sdQ)
        tdQrdQ = cute.make_fragment_like(tdQsdQ, self.dtype)
        cute.autovec_copy(tdQsdQ, tdQrdQ)
        tdQcdQ = gmem_thr_copy_dQ.partition_S(cdQ)
        tdQpdQ = utils.predicate_k(tdQcdQ, limit=head_dim)
        for rest_m in cutlass.range(cute.size(tdQrdQ.shape[1]), unroll_full=True):
            if tdQcdQ[0, rest_m, 0][0] < seqlen_q - m_block * self.tile_m:
                rdQ_rows = tdQrdQ[None, rest_m, None]
                if const_expr(self.adding):
                    # the tile rounded to dQ's dtype, then added and rounded once, as
                    # ringattn.kernels.add adds a block's dQ (the same bits as that path)
                    rdQ_sum = cute.make_fragment_like(rdQ_rows)
                    cute.copy(
                        gmem_tiled_copy_dQ,
                        tdQgdQ[None, rest_m, None],
                        rdQ_sum,
                        pred=tdQpdQ[None, rest_m, None],
                    )
                    rdQ_sum.store(
                        (rdQ_sum.load().to(Float32) + rdQ_rows.load().to(Float32)).to(self.dtype)
                    )
                    rdQ_rows = rdQ_sum
                cute.copy(
                    gmem_tiled_copy_dQ,
                    rdQ_rows,
                    tdQgdQ[None, rest_m, None],
                    pred=tdQpdQ[None, rest_m, None],
                )


class GroupedPostprocessSm90(UnitGroups, DQConvert, FlashAttentionBackwardPostprocess):
    """FA4's SM90 dQ postprocess (float32 accumulator -> dQ, scaled) over several groups in one
    launch: the accumulator laid out by unit (``[U, 1, L_rounded * d]``, as the grouped backward
    writes it), each group's dQ a ``[B_g, L, H_g, d]`` strided view (``heads[g]`` heads)."""

    def __init__(self, *args, heads: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.heads = tuple(heads)
        assert len(self.heads) > 0 and self.arch // 10 == 9

    @cute.jit
    def __call__(self, mdQaccum: cute.Tensor, mdQs: tuple, scale: Float32, stream=None):
        mdQaccum = assume_tensor_aligned(mdQaccum)
        mdQs = [assume_tensor_aligned(t) for t in mdQs]
        self.tiled_mma = self._get_tiled_mma()
        self._setup_attributes()
        smem_size = max(
            cute.size_in_bytes(Float32, self.sdQaccum_layout),
            cute.size_in_bytes(self.dtype, self.sdQ_layout),
        )
        units = self.total_units(self.unit_counts(mdQs, (0, 2)))  # (B, L, H, d) views
        tile_sched_args = TileSchedulerArguments(
            num_block=cute.ceil_div(mdQs[0].shape[1], self.tile_m),
            num_head=1,
            num_batch=units,
            num_splits=1,
            seqlen_k=0,
            headdim=mdQs[0].shape[3],
            headdim_v=0,
            total_q=mdQs[0].shape[1] * units,
            tile_shape_mn=(self.tile_m, 1),
            mCuSeqlensQ=None,
            mSeqUsedQ=None,
        )
        tile_sched_params = SingleTileScheduler.to_underlying_arguments(tile_sched_args)
        grid_dim = SingleTileScheduler.get_grid_shape(tile_sched_params)
        self.kernel(
            mdQaccum,
            tuple(mdQs),
            scale,
            self.tiled_mma,
            self.sdQaccum_layout,
            self.sdQ_layout,
            self.g2s_tiled_copy_dQaccum,
            self.s2r_tiled_copy_dQaccum,
            self.gmem_tiled_copy_dQ,
            tile_sched_params,
            SingleTileScheduler,
        ).launch(grid=grid_dim, block=[self.num_threads, 1, 1], smem=smem_size, stream=stream)

    @cute.kernel
    def kernel(
        self,
        mdQaccum: cute.Tensor,
        mdQs: tuple,
        scale: Float32,
        tiled_mma: cute.TiledMma,
        sdQaccum_layout: cute.Layout,
        sdQ_layout: cute.ComposedLayout,
        g2s_tiled_copy_dQaccum: cute.TiledCopy,
        s2r_tiled_copy_dQaccum: cute.TiledCopy,
        gmem_tiled_copy_dQ: cute.TiledCopy,
        tile_sched_params,
        TileScheduler: cutlass.Constexpr,
    ):
        sdQaccum, sdQ = self.shared_tiles(sdQaccum_layout, sdQ_layout)
        work_tile = TileScheduler.create(tile_sched_params).initial_work_tile_info()
        m_block, _, unit, _ = work_tile.tile_idx
        if work_tile.is_valid_tile:
            g, start = self.group_of(self.unit_counts(mdQs, (0, 2)), unit)
            local = unit - start
            for i in cutlass.range_constexpr(len(self.heads)):
                if g == i:
                    self.convert_tile(
                        mdQaccum[unit, 0, None],
                        mdQs[i][local // self.heads[i], None, local % self.heads[i], None],
                        mdQs[i].shape[1],
                        mdQs[i].shape[3],
                        m_block,
                        scale,
                        tiled_mma,
                        sdQaccum,
                        sdQ,
                        g2s_tiled_copy_dQaccum,
                        s2r_tiled_copy_dQaccum,
                        gmem_tiled_copy_dQ,
                    )


class AddingPostprocessSm90(DQConvert, FlashAttentionBackwardPostprocess):
    """FA4's SM90 dQ postprocess with its last step adding the tile into dQ (``dq +=
    scale * dQaccum``, as ``(dq.float() + dq_block.float()).to(dtype)``); FA4's own launcher,
    call and scheduler (:mod:`ringattn.kernels.fa4_add` hands it to FA4's interface in place of
    ``FlashAttentionBackwardPostprocess`` while it compiles). Dense ``[B, L, H, d]`` dQ only: no
    variable lengths, no learnable sink (FA4's dQ postprocess for ringattn's blocks)."""

    adding = True

    @cute.kernel
    def kernel(
        self,
        mdQaccum: cute.Tensor,
        mdQ: cute.Tensor,
        mCuSeqlensQ,
        mSeqUsedQ,
        sink_tensors,
        scale: Float32,
        tiled_mma: cute.TiledMma,
        dQ_swapAB: cutlass.Constexpr,
        sdQaccum_layout: cute.Layout,
        sdQ_layout: cute.ComposedLayout,
        g2s_tiled_copy_dQaccum: cute.TiledCopy,
        s2r_tiled_copy_dQaccum: cute.TiledCopy,
        gmem_tiled_copy_dQ: cute.TiledCopy,
        g2r_tiled_copy_dQaccum,
        r2s_tiled_copy_dQ,
        tile_sched_params,
        TileScheduler: cutlass.Constexpr,
    ):
        if const_expr(mCuSeqlensQ is not None or mSeqUsedQ is not None):
            raise TypeError("the adding dQ postprocess takes no variable lengths")
        if const_expr(sink_tensors is not None or self.arch // 10 != 9):
            raise TypeError("the adding dQ postprocess is SM90's, without a learnable sink")
        sdQaccum, sdQ = self.shared_tiles(sdQaccum_layout, sdQ_layout)
        work_tile = TileScheduler.create(tile_sched_params).initial_work_tile_info()
        m_block, head_idx, batch_idx, _ = work_tile.tile_idx
        if work_tile.is_valid_tile:
            self.convert_tile(
                mdQaccum[batch_idx, head_idx, None],
                mdQ[batch_idx, None, head_idx, None],
                mdQ.shape[1],
                mdQ.shape[3],
                m_block,
                scale,
                tiled_mma,
                sdQaccum,
                sdQ,
                g2s_tiled_copy_dQaccum,
                s2r_tiled_copy_dQaccum,
                gmem_tiled_copy_dQ,
            )
