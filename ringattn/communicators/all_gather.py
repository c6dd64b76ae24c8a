"""``all_gather``: one all-gather of the selected K/V per block within the segment's ranks.

Forward: the ``g`` ranks of a segment all-gather their dilated K/V chunks (``[2, b, m/r, heads,
d]`` each): a collective over the group where the segment spans all its ranks, else one batch
of point-to-point sends and receives among the segment's ranks on the group (a sub-group would
need every rank of the *world* to make it, which ranks of another sequence-parallel group, in
data parallel x sequence parallel, never do: a hang). Then each computes its queries against the
chunks it needs (``SequenceParallel.piece``: causal and contiguous, earlier chunks fully, its own
causally, later ones skipped; zigzag, half of every other shard) and merges by LSE. Backward:
the chunks are gathered again, each rank computes every needed chunk's dK/dV share, and a
reduce-scatter (float32; point to point as above where the segment spans part of the group)
sums the shares on their owners. Memory per rank grows with
the segment (``g`` chunks), unlike ``ring``, in exchange for one collective instead of ``g - 1``
steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ringattn.communicators.sequence_parallel import SequenceParallel, stack_kv
from ringattn.computers.base import BlockComputer, Rows, RowsLSE
from ringattn.computers.base import accumulation_dtype as acc_dtype
from ringattn.distributed import all_gather_single, reduce_scatter_single
from ringattn.merge import merge_into_
from ringattn.registry import register

SEGMENT_TAG = 3  # apart from the ring's tags


@register("communicator", "all_gather")
class AllGatherCommunicator(SequenceParallel):
    """``all_gather``: one all-gather of the selected K/V per block among the segment's ranks
    (this module's docstring). Built with the module's ``group`` (default: the world) and
    ``layout``; needs ``torch.distributed`` initialised."""

    def _gather(self, kv_own: Tensor, span: int) -> Tensor:
        gathered = self.memory.scratch(
            "all_gather_kv", (span, *kv_own.shape), kv_own.dtype, kv_own.device
        )
        if span == self.world_size:
            all_gather_single(gathered.view(-1, *kv_own.shape[1:]), kv_own, group=self.group)
        else:
            # (the own slot stays unwritten: the callers read this rank's chunk from k and v)
            self._exchange([kv_own] * span, list(gathered), span)
        self.count(kv_own, times=span - 1)  # each rank sends g - 1 chunks
        return gathered

    def _exchange(self, sends: list[Tensor], receives: list[Tensor], span: int) -> None:
        """Among the segment's ranks: send ``sends[j]`` to its j-th rank and receive
        ``receives[j]`` from it, for every other rank j of the segment (one batch)."""
        t, peers = self.place(span)
        ops = []
        for j, peer in enumerate(peers):
            if j != t:
                ops.append(dist.P2POp(dist.isend, sends[j], peer, self.group, SEGMENT_TAG))
                ops.append(dist.P2POp(dist.irecv, receives[j], peer, self.group, SEGMENT_TAG))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def _attend(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        span: int,
        into: tuple[Rows, RowsLSE] | None,
    ) -> tuple[Rows, RowsLSE]:
        t, _ = self.place(span)
        gathered = self._gather(stack_kv(k, v), span)
        out, lse = self.own_chunk(computer, q, k, v, causal, scale, into)
        for chunk in range(span):
            piece = None if chunk == t else self.piece(t, chunk, causal, q.shape[1])
            if piece is not None:
                rows, cols = piece
                out_c, lse_c = computer.forward(
                    q[:, rows],
                    gathered[chunk, 0][:, cols],
                    gathered[chunk, 1][:, cols],
                    False,
                    scale,
                )
                merge_into_(out[:, rows], lse[:, rows], out_c, lse_c)
        return out, lse

    def attend_backward(
        self,
        computer: BlockComputer,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        causal: bool,
        scale: float,
        span: int = 1,
    ) -> tuple[Rows, Rows, Rows]:
        if span == 1:
            return computer.backward(dout, q, k, v, out, lse, causal, scale)
        t, _ = self.place(span)
        dtype = acc_dtype(q.dtype)
        kv_own = stack_kv(k, v)
        gathered = self._gather(kv_own, span)
        shares = torch.zeros((span, *kv_own.shape), dtype=dtype, device=q.device)
        dq, dk, dv = computer.backward(dout, q, k, v, out, lse, causal, scale)
        dq = dq.to(dtype)
        shares[t, 0] = dk
        shares[t, 1] = dv
        for chunk in range(span):
            piece = None if chunk == t else self.piece(t, chunk, causal, q.shape[1])
            if piece is not None:
                rows, cols = piece
                dq_c, dk_c, dv_c = computer.backward(
                    dout[:, rows],
                    q[:, rows],
                    gathered[chunk, 0][:, cols],
                    gathered[chunk, 1][:, cols],
                    out[:, rows],
                    lse[:, rows],
                    False,
                    scale,
                )
                dq[:, rows] += dq_c
                shares[chunk, 0][:, cols] = dk_c
                shares[chunk, 1][:, cols] = dv_c
        mine = torch.empty(kv_own.shape, dtype=dtype, device=q.device)
        if span == self.world_size:
            reduce_scatter_single(mine, shares.view(-1, *kv_own.shape[1:]), group=self.group)
        else:
            received = torch.empty_like(shares)
            self._exchange(list(shares), list(received), span)
            received[t] = shares[t]
            torch.sum(received, dim=0, out=mine)  # in rank order, as the collective sums
        self.count(mine, times=span - 1)  # g - 1 chunks per rank
        return dq, mine[0], mine[1]
