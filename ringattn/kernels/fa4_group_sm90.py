"""FlashAttention-4's SM90 forward over several groups of blocks in one launch (imported only
where FA4 is).

Why: ``head_groups`` launches one FA4 forward per config. Under LongNet's usual configs every
config's dilated segment has the same length ``L = w / r`` (issue 5's: 2048 rows), but the
configs differ in how far apart their rows lie (``r`` rows) and in how many segments they have
(``n / w``): the ``r = 8`` / ``r = 16`` configs are 96 / 48 CTAs at 32K tokens on 132 SMs, and
each of those kernels lasts as long as its longest query tile (causal: 16 key blocks), so the
small configs run at a fraction of the large one's rate (``docs/benchmarks/h200_perf.md`` steps
25 and 31); and each launch costs host time, which bounds 32K.

Here one kernel takes the ``G`` groups' operands (each a ``[B_g, L, H_g, d]`` strided view of
the same tensors, with TMA descriptors of its own) and one tile scheduler walks all of their
tiles, longest first for causal: every CTA maps its tile's batch index ``u`` to a group ``g``
(by the groups' unit counts ``B_g * H_g``, read from the operands' shapes) and to that group's
``(segment, head)``, then loads through group ``g``'s descriptors and writes group ``g``'s
output rows, LSE and unselected rows' zeros (``zero_shifts[g]``, as
:mod:`ringattn.kernels.fa4_zero_sm90`). The main loop (the MMAs and the softmax) is FA4's own,
untouched: every group has the same ``L``, so one mask and one sequence length serve all.

The body of FA4's producer is kept (the paged, block-sparse and non-TMA paths are dropped: the
blocks use none of them), once per group under a branch on ``g`` (uniform across the CTA).

With ``persistent_sms`` the grid is at most that many CTAs, each walking the same tile order
with a stride of the grid (:class:`PersistentLPTScheduler`), and O has shared memory of its own:
FA4's loops already carry their pipeline state from tile to tile, but FA4 writes O into Q's
buffer, which the producer refills with the next tile's Q while the epilogue still writes O.
"""

from __future__ import annotations

from functools import partial

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr, pipeline
from cutlass.cute.nvgpu import cpasync
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait
from flash_attn.cute import pipeline as pipeline_custom
from flash_attn.cute import utils
from flash_attn.cute.block_info import BlockInfo
from flash_attn.cute.cute_dsl_utils import assume_tensor_aligned
from flash_attn.cute.flash_fwd import FlashAttentionForwardBase
from flash_attn.cute.mask import AttentionMask
from flash_attn.cute.seqlen_info import SeqlenInfoQK
from flash_attn.cute.tile_scheduler import (
    SingleTileLPTScheduler,
    SingleTileScheduler,
    TileSchedulerArguments,
    WorkTileInfo,
)
from quack import copy_utils, layout_utils
from quack import sm90_utils as quack_sm90_utils

from ringattn.kernels.fa4_zero_sm90 import ZeroingForwardSm90

# the base class's epilogue (module level: the DSL re-parses jit methods with their globals)
_write_epilogue = FlashAttentionForwardBase.epilogue


class UnitGroups:
    """What the grouped kernels (this forward, and the backward and dQ postprocess of
    :mod:`ringattn.kernels.fa4_group_bwd_sm90`) share: the scheduler's batch index runs over
    every group's units (its ``(segment, head)`` pairs, ``B_g * H_g``), group after group."""

    heads: tuple[int, ...]  # heads[g]: group g's head count

    @staticmethod
    def unit_counts(mXs, modes: tuple[int, int] = (2, 3)) -> list:
        """Each group's unit count from its views (``modes``: where ``H_g`` and ``B_g`` lie;
        FA4's ``(L, d, H, B)`` by default)."""
        return [cute.size(m.shape[modes[0]]) * cute.size(m.shape[modes[1]]) for m in mXs]

    @staticmethod
    def total_units(counts: list):
        total = counts[0]
        for count in counts[1:]:
            total = total + count
        return total

    @cute.jit
    def group_of(self, counts: list, unit: Int32):
        """``(g, first unit of g)`` of a scheduler batch index, given each group's unit count."""
        g = Int32(0)
        start = Int32(0)
        bound = Int32(0)
        for i in cutlass.range_constexpr(len(self.heads) - 1):
            bound = bound + counts[i]
            if unit >= bound:
                g = Int32(i + 1)
                start = bound
        return g, start


class PersistentLPTScheduler(SingleTileLPTScheduler):
    """FA4's LPT tile order when causal (L2 sections, longest tiles first), walked by a grid of
    at most one CTA per SM: CTA ``c`` takes tiles ``c``, ``c + grid``, ... So a CTA's producer
    loads its next tile's Q and K/V while its consumers finish the last one (FA4 launches one
    CTA per tile: on 2048-row segments every tile paid its loads' latency before its first MMA,
    8.5 key blocks per causal tile on average). Not causal, the order of FA4's one CTA per
    tile (``SingleTileScheduler``'s grid: a unit's query tiles one after another, so the CTAs
    running together share few units' K and V in L2) instead of the L2 sections, which spread
    them over up to 32 units (step 36: in that order the persistent grid was 3-7% slower than
    one CTA per tile non-causal, with tiles shared out statically or drawn from a counter
    alike; in this one 4-5% faster at 131K). Causal, sections narrower than FA4's 32 units were
    no faster (step 37: 16, 8, 4 and 2 units at 131K and 1M)."""

    @cute.jit
    def get_current_work(self, *, loc=None, ip=None) -> WorkTileInfo:
        if const_expr(self.params.lpt):
            return SingleTileLPTScheduler.get_current_work(self)
        params = self.params
        unit_and_head = self._tile_idx // params.num_block
        block = self._tile_idx - unit_and_head * params.num_block
        batch_idx, head_idx = divmod(unit_and_head, params.num_head_divmod)
        return WorkTileInfo(
            (Int32(block), Int32(head_idx), Int32(batch_idx), Int32(self._split_idx)),
            self._tile_idx < params.total_blocks,
        )

    @staticmethod
    @cute.jit
    def create(params, ctx=None, *, loc=None, ip=None) -> PersistentLPTScheduler:
        tile_idx, _, _ = cute.arch.block_idx()
        return PersistentLPTScheduler(params, tile_idx, Int32(0), loc=loc, ip=ip)

    @staticmethod
    def grid(params, sms: int):
        """The launch grid: every tile's own CTA, or ``sms`` (the GPU's SM count) if fewer."""
        return (cutlass.min(params.total_blocks, sms), Int32(1), Int32(1))

    def advance_to_next_work(self, *, loc=None, ip=None):
        self._tile_idx += cute.arch.grid_dim()[0]
        return self.get_current_work()


class GroupedForwardSm90(UnitGroups, ZeroingForwardSm90):
    """FA4's SM90 forward over ``len(heads)`` groups of blocks of one sequence length.

    ``heads[g]``: group ``g``'s head count (its operands' dim 2); ``zero_shifts[g]``: the
    element shifts from each of its output rows to the rows its config leaves out (zeros
    written there), () for none. The zeroing kernel's output path (ordinary stores through each
    group's pointer) and its ``zero_neighbours``, per group."""

    def __init__(
        self,
        *args,
        heads: tuple[int, ...] = (),
        zero_shifts: tuple[tuple[int, ...], ...] = (),
        persistent_sms: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.heads = tuple(heads)
        # > 0: a persistent grid of at most this many CTAs (PersistentLPTScheduler), the
        # output's shared memory then its own (FA4's aliases Q's, which the producer refills
        # for the next tile while the epilogue still writes O)
        self.persistent_sms = persistent_sms
        self.zero_shifts = tuple(tuple(s) for s in zero_shifts) or ((),) * len(self.heads)
        assert len(self.zero_shifts) == len(self.heads) > 0

    def _get_shared_storage_cls(self):
        if const_expr(self.persistent_sms == 0):
            return super()._get_shared_storage_cls()
        # FA4's (Q, K, V and P, with their barriers) and O's own
        sQ, sK, sV, sP, sO = [
            cute.struct.Align[
                cute.struct.MemRange[self.dtype, cute.cosize(layout) if layout is not None else 0],
                self.buffer_align_bytes,
            ]
            for layout in (
                self.sQ_layout,
                self.sK_layout,
                self.sV_layout,
                self.sP_layout,
                self.sO_layout,
            )
        ]
        mbar_Q = cute.struct.MemRange[cutlass.Int64, 2]
        mbar_KV = cute.struct.MemRange[cutlass.Int64, self.num_stages * 2]
        # (fields in FA4's order; made with type(): this module's annotations are strings)
        fields = dict(mbar_ptr_Q=mbar_Q, mbar_ptr_K=mbar_KV, mbar_ptr_V=mbar_KV)
        fields.update(sV=sV, sQ=sQ, sK=sK, sP=sP, sO=sO)
        SharedStoragePersistent = cute.struct(
            type("SharedStoragePersistent", (), {"__annotations__": fields})
        )
        return SharedStoragePersistent

    @cute.jit
    def __call__(
        self,
        mQs: tuple,  # per group: (B_g, L, H_g, d) views
        mKs: tuple,
        mVs: tuple,
        mOs: tuple,
        mLSEs: tuple | None,  # per group (B_g, H_g, L), or None: no LSE written
        softmax_scale: cutlass.Float32,
        stream=None,
    ):
        G = len(self.heads)
        self._check_type(
            mQs[0].element_type,
            mKs[0].element_type,
            mVs[0].element_type,
            mOs[0].element_type,
            mLSEs[0].element_type if const_expr(mLSEs is not None) else None,
            None,
            None,
            None,
            None,
        )
        self.varlen_q = False
        # FA4's layouts: (L, d, H, B) for Q, K, V and O, (L, H, B) for the LSE
        qo_order, lse_order = [1, 3, 2, 0], [2, 1, 0]
        mQs = [layout_utils.select(assume_tensor_aligned(t), qo_order) for t in mQs]
        mKs = [layout_utils.select(assume_tensor_aligned(t), qo_order) for t in mKs]
        mVs = [layout_utils.select(assume_tensor_aligned(t), qo_order) for t in mVs]
        mOs = [layout_utils.select(assume_tensor_aligned(t), qo_order) for t in mOs]
        if const_expr(mLSEs is not None):
            mLSEs = [layout_utils.select(t, lse_order) for t in mLSEs]

        tiled_mma_qk, tiled_mma_pv = self._get_tiled_mma()
        self.num_mma_threads = tiled_mma_qk.size
        self.num_threads_per_warp_group = 128
        self.num_wg_mma = self.num_mma_threads // self.num_threads_per_warp_group
        assert self.num_wg_mma in [1, 2, 3]
        self.num_threads = self.num_threads_per_warp_group * (self.num_wg_mma + 1)
        self.num_producer_threads = 32
        self.num_Q_load_threads = self.num_threads_per_warp_group
        self.num_epilogue_threads = self.num_mma_threads
        self.num_mma_regs, self.num_producer_regs = {1: (256, 56), 2: (240, 24), 3: (160, 32)}[
            self.num_wg_mma
        ]
        self.use_block_sparsity = False
        self.use_scheduler_barrier = (
            (self.num_wg_mma >= 2 and self.tile_hdim <= 128)
            if const_expr(self.intra_wg_overlap)
            else (self.num_wg_mma == 2)
        )
        self.use_tma_Q = True
        self.use_tma_O = False
        self.rescale_O_before_gemm = self.tile_hdimv > 128 and self.intra_wg_overlap
        self._setup_attributes()
        mQ, mK, mV, mO = mQs[0], mKs[0], mVs[0], mOs[0]
        self.sQ_layout, self.sK_layout, self.sV_layout, self.sO_layout = [
            quack_sm90_utils.make_smem_layout(
                mX.element_type, cutlass.utils.LayoutEnum.ROW_MAJOR, shape, stage
            )
            for mX, shape, stage in [
                (mQ, (self.tile_m, self.tile_hdim), None),
                (mK, (self.tile_n, self.tile_hdim), self.num_stages),
                (mV, (self.tile_n, self.tile_hdimv), self.num_stages),
                (mO, (self.tile_m, self.tile_hdimv), None),
            ]
        ]
        self.sP_layout = None
        if const_expr(not self.mma_pv_is_rs):
            self.sP_layout = quack_sm90_utils.make_smem_layout(
                mV.element_type, cutlass.utils.LayoutEnum.ROW_MAJOR, (self.tile_m, self.tile_n)
            )
        SharedStorage = self._get_shared_storage_cls()

        self.tma_copy_bytes = {
            name: cute.size_in_bytes(mX.element_type, cute.select(layout, mode=[0, 1]))
            for name, mX, layout in [
                ("Q", mQ, self.sQ_layout),
                ("K", mK, self.sK_layout),
                ("V", mV, self.sV_layout),
            ]
        }
        tma_Q, tma_K, tma_V = [], [], []
        for g in cutlass.range_constexpr(G):
            tma_Q.append(
                cpasync.make_tiled_tma_atom(
                    cpasync.CopyBulkTensorTileG2SOp(),
                    mQs[g],
                    self.sQ_layout,
                    (self.tile_m, self.tile_hdim),
                )
            )
            tma_K.append(
                cpasync.make_tiled_tma_atom(
                    cpasync.CopyBulkTensorTileG2SOp(),
                    mKs[g],
                    cute.select(self.sK_layout, mode=[0, 1]),
                    (self.tile_n, self.tile_hdim),
                    1,
                )
            )
            tma_V.append(
                cpasync.make_tiled_tma_atom(
                    cpasync.CopyBulkTensorTileG2SOp(),
                    mVs[g],
                    cute.select(self.sV_layout, mode=[0, 1]),
                    (self.tile_n, self.tile_hdimv),
                    1,
                )
            )
        # every group's (segment, head) pairs, as the scheduler's batch dim (one head)
        units = self.total_units(self.unit_counts(mQs))
        TileScheduler = (
            SingleTileLPTScheduler if const_expr(self.is_causal) else SingleTileScheduler
        )
        if const_expr(self.persistent_sms > 0):
            TileScheduler = PersistentLPTScheduler
        tile_sched_args = TileSchedulerArguments(
            cute.ceil_div(cute.size(mQ.shape[0]), self.tile_m),
            1,
            units,
            1,  # num_splits
            cute.size(mK.shape[0]),
            mQ.shape[1],
            mV.shape[1],
            total_q=cute.size(mQ.shape[0]) * units,
            tile_shape_mn=(self.tile_m, self.tile_n),
            mCuSeqlensQ=None,
            mSeqUsedQ=None,
            qhead_per_kvhead_packgqa=1,
            element_size=self.dtype.width // 8,
            is_persistent=False,
            lpt=self.is_causal,
        )
        tile_sched_params = TileScheduler.to_underlying_arguments(tile_sched_args)
        if const_expr(self.persistent_sms > 0):
            grid_dim = PersistentLPTScheduler.grid(tile_sched_params, self.persistent_sms)
        else:
            grid_dim = TileScheduler.get_grid_shape(tile_sched_params)
        softmax_scale_log2, softmax_scale = utils.compute_softmax_scale_log2(
            softmax_scale, self.score_mod
        )
        self.kernel(
            tuple(t for _, t in tma_Q),
            tuple(t for _, t in tma_K),
            tuple(t for _, t in tma_V),
            tuple(mOs),
            tuple(mLSEs) if const_expr(mLSEs is not None) else None,
            tuple(a for a, _ in tma_Q),
            tuple(a for a, _ in tma_K),
            tuple(a for a, _ in tma_V),
            softmax_scale_log2,
            softmax_scale,
            self.sQ_layout,
            self.sK_layout,
            self.sV_layout,
            self.sO_layout,
            self.sP_layout,
            self.gmem_tiled_copy_O,
            tiled_mma_qk,
            tiled_mma_pv,
            tile_sched_params,
            TileScheduler,
            SharedStorage,
        ).launch(
            grid=grid_dim,
            block=[self.num_threads, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
        )

    @cute.kernel
    def kernel(
        self,
        mQs: tuple,
        mKs: tuple,
        mVs: tuple,
        mOs: tuple,
        mLSEs: tuple | None,
        tma_atoms_Q: tuple,
        tma_atoms_K: tuple,
        tma_atoms_V: tuple,
        softmax_scale_log2: cutlass.Float32,
        softmax_scale: cutlass.Float32 | None,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        sO_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout | None,
        gmem_tiled_copy_O: cute.TiledCopy,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        tile_sched_params,
        TileScheduler: cutlass.Constexpr,
        SharedStorage: cutlass.Constexpr,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            for g in cutlass.range_constexpr(len(self.heads)):
                cpasync.prefetch_descriptor(tma_atoms_Q[g])
                cpasync.prefetch_descriptor(tma_atoms_K[g])
                cpasync.prefetch_descriptor(tma_atoms_V[g])

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        ThreadCooperativeGroup = partial(pipeline.CooperativeGroup, pipeline.Agent.Thread)
        tma_warp = ThreadCooperativeGroup(1)
        mma_warps = ThreadCooperativeGroup(self.num_mma_threads // cute.arch.WARP_SIZE)
        pipeline_q = pipeline_custom.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_ptr_Q.data_ptr(),
            num_stages=1,
            producer_group=tma_warp,
            consumer_group=mma_warps,
            tx_count=self.tma_copy_bytes["Q"],
            defer_sync=True,
        )
        pipeline_k = pipeline_custom.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_ptr_K.data_ptr(),
            num_stages=self.num_stages,
            producer_group=tma_warp,
            consumer_group=mma_warps,
            tx_count=self.tma_copy_bytes["K"],
            defer_sync=True,
        )
        pipeline_v = pipeline_custom.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_ptr_V.data_ptr(),
            num_stages=self.num_stages,
            producer_group=tma_warp,
            consumer_group=mma_warps,
            tx_count=self.tma_copy_bytes["V"],
            defer_sync=True,
        )
        pipeline_init_arrive(cluster_shape_mn=self.cluster_shape_mn, is_relaxed=True)

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sVt = layout_utils.transpose_view(sV)
        sP = None
        if const_expr(sP_layout is not None):
            sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        if const_expr(self.persistent_sms > 0):
            sO = storage.sO.get_tensor(sO_layout.outer, swizzle=sO_layout.inner)
        else:
            sO = storage.sQ.get_tensor(sO_layout.outer, swizzle=sO_layout.inner, dtype=self.dtype)

        block_info = BlockInfo(
            self.tile_m, self.tile_n, self.is_causal, self.is_local, False, None, None
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
        )
        AttentionMaskCls = partial(AttentionMask, self.tile_m, self.tile_n)
        TileSchedulerCls = partial(TileScheduler.create, tile_sched_params)
        pipeline_init_wait(cluster_shape_mn=self.cluster_shape_mn)

        if warp_idx < 4:  # producer
            cute.arch.setmaxregister_decrease(self.num_producer_regs)
            self.load_groups(
                mQs,
                mKs,
                mVs,
                sQ,
                sK,
                sV,
                tma_atoms_Q,
                tma_atoms_K,
                tma_atoms_V,
                pipeline_k,
                pipeline_v,
                pipeline_q,
                block_info,
                SeqlenInfoCls,
                TileSchedulerCls,
            )
        else:  # consumer: FA4's own main loop; the groups' outputs go to self.epilogue
            cute.arch.setmaxregister_increase(self.num_mma_regs)
            tidx, _, _ = cute.arch.thread_idx()
            tidx = tidx - 128
            self.mma(
                tiled_mma_qk,
                tiled_mma_pv,
                (mOs, mQs),
                mLSEs,
                sQ,
                sK,
                sVt,
                sP,
                sO,
                None,
                pipeline_k,
                pipeline_v,
                pipeline_q,
                gmem_tiled_copy_O,
                None,
                tidx,
                softmax_scale_log2,
                softmax_scale,
                block_info,
                SeqlenInfoCls,
                AttentionMaskCls,
                TileSchedulerCls,
                None,
            )

    @cute.jit
    def load_groups(
        self,
        mQs: tuple,
        mKs: tuple,
        mVs: tuple,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atoms_Q: tuple,
        tma_atoms_K: tuple,
        tma_atoms_V: tuple,
        pipeline_k,
        pipeline_v,
        pipeline_q,
        block_info: BlockInfo,
        SeqlenInfoCls,
        TileSchedulerCls,
    ):
        warp_idx_in_wg = cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4
        if warp_idx_in_wg == 0:
            q_producer_phase = Int32(1)
            kv_producer_state = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Producer, self.num_stages
            )
            tile_scheduler = TileSchedulerCls()
            work_tile = tile_scheduler.initial_work_tile_info()
            while work_tile.is_valid_tile:
                m_block, _, unit, _ = work_tile.tile_idx
                seqlen = SeqlenInfoCls(unit)
                g, start = self.group_of(self.unit_counts(mQs), unit)
                local = unit - start
                for i in cutlass.range_constexpr(len(self.heads)):
                    if g == i:
                        head_idx = local % self.heads[i]
                        batch_idx = local // self.heads[i]
                        kv_producer_state, q_producer_phase = self.load_tile(
                            mQs[i][None, None, head_idx, batch_idx],
                            mKs[i][None, None, head_idx, batch_idx],
                            mVs[i][None, None, head_idx, batch_idx],
                            sQ,
                            sK,
                            sV,
                            tma_atoms_Q[i],
                            tma_atoms_K[i],
                            tma_atoms_V[i],
                            pipeline_k,
                            pipeline_v,
                            pipeline_q,
                            block_info,
                            seqlen,
                            m_block,
                            kv_producer_state,
                            q_producer_phase,
                        )
                tile_scheduler.prefetch_next_work()
                tile_scheduler.advance_to_next_work()
                work_tile = tile_scheduler.get_current_work()
            pipeline_v.producer_tail(kv_producer_state)

    @cute.jit
    def load_tile(
        self,
        mQ_cur: cute.Tensor,
        mK_cur: cute.Tensor,
        mV_cur: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_Q,
        tma_atom_K,
        tma_atom_V,
        pipeline_k,
        pipeline_v,
        pipeline_q,
        block_info: BlockInfo,
        seqlen,
        m_block: Int32,
        kv_producer_state,
        q_producer_phase: Int32,
    ):
        """FA4's producer for one tile (its TMA path: Q once, then K and V block by block,
        last block first), through one group's descriptors."""
        gQ = cute.local_tile(mQ_cur, (self.tile_m, self.tile_hdim), (m_block, 0))
        load_Q, _, _ = copy_utils.tma_get_copy_fn(
            tma_atom_Q, 0, cute.make_layout(1), gQ, sQ, single_stage=True
        )
        gK = cute.local_tile(mK_cur, (self.tile_n, self.tile_hdim), (None, 0))
        gV = cute.local_tile(mV_cur, (self.tile_n, self.tile_hdimv), (None, 0))
        load_K, _, _ = copy_utils.tma_get_copy_fn(tma_atom_K, 0, cute.make_layout(1), gK, sK)
        load_K = copy_utils.tma_producer_copy_fn(load_K, pipeline_k)
        load_V, _, _ = copy_utils.tma_get_copy_fn(tma_atom_V, 0, cute.make_layout(1), gV, sV)
        load_V = copy_utils.tma_producer_copy_fn(load_V, pipeline_v)

        n_block_min, n_block_max = block_info.get_n_block_min_max(seqlen, m_block)
        n_block = n_block_max - 1
        pipeline_k.producer_acquire(kv_producer_state)
        load_K(src_idx=n_block, producer_state=kv_producer_state)
        pipeline_k.producer_commit(kv_producer_state)
        pipeline_q.producer_acquire_w_index_phase(0, q_producer_phase)
        load_Q(tma_bar_ptr=pipeline_q.sync_object_full.get_barrier(0))
        q_producer_phase ^= 1
        if const_expr(not self.intra_wg_overlap):
            pipeline_v.producer_acquire(kv_producer_state)
            load_V(src_idx=n_block, producer_state=kv_producer_state)
            pipeline_v.producer_commit(kv_producer_state)
            kv_producer_state.advance()
            for i in cutlass.range(n_block_max - 1 - n_block_min, unroll=1):
                n_block = n_block_max - 1 - i - 1
                pipeline_k.producer_acquire(kv_producer_state)
                load_K(src_idx=n_block, producer_state=kv_producer_state)
                pipeline_k.producer_commit(kv_producer_state)
                pipeline_v.producer_acquire(kv_producer_state)
                load_V(src_idx=n_block, producer_state=kv_producer_state)
                pipeline_v.producer_commit(kv_producer_state)
                kv_producer_state.advance()
        else:
            for i in cutlass.range(n_block_max - 1 - n_block_min, unroll=1):
                n_block_prev = n_block_max - i - 1
                n_block = n_block_prev - 1
                kv_producer_state_prev = kv_producer_state.clone()
                kv_producer_state.advance()
                pipeline_k.producer_acquire(kv_producer_state)
                load_K(src_idx=n_block, producer_state=kv_producer_state)
                pipeline_k.producer_commit(kv_producer_state)
                pipeline_v.producer_acquire(kv_producer_state_prev)
                load_V(src_idx=n_block_prev, producer_state=kv_producer_state_prev)
                pipeline_v.producer_commit(kv_producer_state_prev)
            pipeline_v.producer_acquire(kv_producer_state)
            load_V(src_idx=n_block_min, producer_state=kv_producer_state)
            pipeline_v.producer_commit(kv_producer_state)
            kv_producer_state.advance()
        return kv_producer_state, q_producer_phase

    @cute.jit
    def epilogue(
        self,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        mOs_and_mQs: tuple,
        mLSEs: tuple | None,
        sO: cute.Tensor,
        seqlen,
        gmem_tiled_copy_O: cute.TiledCopy,
        tma_atom_O,
        tiled_mma: cute.TiledMma,
        tidx: Int32,
        m_block: Int32,
        head_idx: Int32,
        unit: Int32,
    ):
        mOs, mQs = mOs_and_mQs
        g, start = self.group_of(self.unit_counts(mQs), unit)
        local = unit - start
        for i in cutlass.range_constexpr(len(self.heads)):
            if g == i:
                group_head = local % self.heads[i]
                group_batch = local // self.heads[i]
                _write_epilogue(
                    self,
                    acc_O,
                    lse,
                    mOs[i],
                    mLSEs[i] if const_expr(mLSEs is not None) else None,
                    sO,
                    seqlen,
                    gmem_tiled_copy_O,
                    None,
                    tiled_mma,
                    tidx,
                    m_block,
                    group_head,
                    group_batch,
                )
                if const_expr(len(self.zero_shifts[i]) > 0):
                    self.zero_neighbours(
                        mOs[i][None, None, group_head, group_batch],
                        sO,
                        seqlen,
                        gmem_tiled_copy_O,
                        tidx,
                        m_block,
                        self.zero_shifts[i],
                    )
