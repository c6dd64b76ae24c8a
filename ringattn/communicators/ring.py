"""``ring``: K/V chunks travel around the ranks of each segment by P2P, overlapped with compute.

Forward, for a segment spanning ``g`` ranks: rank ``t`` computes its own chunk (causally when
causal), then at step ``s = 1..g-1`` receives chunk ``t - s`` from its predecessor while it
forwards the chunk it holds to its successor; the next transfer is posted before the current chunk
is computed (double-buffered receive buffers from the memory manager). Partial results are merged
by LSE in float32. Causal, ``layout="contiguous"``: chunks wholly in the future are neither
computed nor sent — rank ``t`` sends at step ``s`` only if its successor needs the chunk
(``s <= t + 1``), so a causal segment moves half the bytes, but the last rank computes ``p``
chunks while the first computes one. ``layout="zigzag"``: every rank uses half of every other
shard (``SequenceParallel.piece``), so each step costs every rank the same.

Backward (merged-stats identity, see ``ringattn/core.py``): the K/V ring runs again; each rank
computes its queries' share of every chunk's gradient and sends that chunk's dK/dV straight back
to its owner, in the dtype the kernel returned it (bf16 from cuDNN: widening it first would double
the bytes of a transfer nothing can overlap at the last step, for the same values); the owner
adds it into its float32 accumulators. No rank ever holds more than two chunks of K/V at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ringattn.communicators.sequence_parallel import SequenceParallel, stack_kv
from ringattn.computers.base import BlockComputer, Rows, RowsLSE
from ringattn.computers.base import accumulation_dtype as acc_dtype
from ringattn.merge import merge_into_
from ringattn.registry import register

KV_TAG, GRAD_TAG = 1, 2


@register("communicator", "ring")
class RingCommunicator(SequenceParallel):
    """``ring``: K/V chunks passed around each segment's ranks by P2P, overlapped with
    compute (this module's docstring). Built with the module's ``group`` (default: the world)
    and ``layout``; needs ``torch.distributed`` initialised."""

    def receives(self, step: int, t: int, span: int, causal: bool) -> bool:
        """Whether rank ``t`` uses the shard that reaches it at ``step`` (that of ``t - step``)."""
        return self.piece(t, (t - step) % span, causal, 2) is not None

    def sends(self, step: int, t: int, span: int, causal: bool) -> bool:
        """Whether rank ``t`` forwards its held shard at ``step``: only if its successor uses it."""
        return self.receives(step, (t + 1) % span, span, causal)

    def _post(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        return dist.batch_isend_irecv(ops) if ops else []

    def _kv_exchange(
        self, step: int, t: int, peers: list[int], causal: bool, send: Tensor, recv: Tensor
    ) -> list[dist.P2POp]:
        """Ops of step ``step``: forward the held chunk to the successor, receive chunk t-step."""
        span = len(peers)
        ops = []
        if self.sends(step, t, span, causal):
            ops.append(dist.P2POp(dist.isend, send, peers[(t + 1) % span], self.group, KV_TAG))
            self.count(send)
        if self.receives(step, t, span, causal):
            ops.append(dist.P2POp(dist.irecv, recv, peers[(t - 1) % span], self.group, KV_TAG))
        return ops

    def _buffers(self, kv_own: Tensor) -> list[Tensor]:
        shape = tuple(kv_own.shape)
        return [
            self.memory.scratch(f"ring_kv_{i}", shape, kv_own.dtype, kv_own.device)
            for i in range(2)
        ]

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
        t, peers = self.place(span)
        kv_own = stack_kv(k, v)
        buffers = self._buffers(kv_own)
        # every rank walks every step, so each wait is for ops all peers posted a step earlier
        pending = self._post(self._kv_exchange(1, t, peers, causal, kv_own, buffers[1]))
        out, lse = self.own_chunk(computer, q, k, v, causal, scale, into)
        for step in range(1, span):
            for request in pending:
                request.wait()
            current = buffers[step % 2]
            pending = (
                self._post(
                    self._kv_exchange(step + 1, t, peers, causal, current, buffers[(step + 1) % 2])
                )
                if step + 1 < span
                else []
            )  # posted before computing: the next transfer overlaps this chunk's attention
            piece = self.piece(t, (t - step) % span, causal, q.shape[1])
            if piece is not None:
                rows, cols = piece
                out_c, lse_c = computer.forward(
                    q[:, rows], current[0][:, cols], current[1][:, cols], False, scale
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
        t, peers = self.place(span)
        dtype = acc_dtype(q.dtype)
        kv_own = stack_kv(k, v)
        buffers = self._buffers(kv_own)
        pending = self._post(self._kv_exchange(1, t, peers, causal, kv_own, buffers[1]))
        own = computer.backward(dout, q, k, v, out, lse, causal, scale)
        share_dtype = own[1].dtype  # every rank's kernel returns its shares in this dtype
        dq, dk, dv = (g.to(dtype) for g in own)
        del own
        received: tuple[Tensor, slice] | None = None  # dK/dV share in flight to us, its rows

        def add_received() -> None:  # after the wait for the step that received it
            if received is not None:
                grad_in, cols = received
                dk[:, cols] += grad_in[0]
                dv[:, cols] += grad_in[1]

        rows_total = q.shape[1]
        for step in range(1, span):
            for request in pending:
                request.wait()
            add_received()
            current = buffers[step % 2]
            pending = (
                self._post(
                    self._kv_exchange(step + 1, t, peers, causal, current, buffers[(step + 1) % 2])
                )
                if step + 1 < span
                else []
            )
            ops = []
            piece = self.piece(t, (t - step) % span, causal, rows_total)
            if piece is not None:
                rows, cols = piece
                dq_c, dk_c, dv_c = computer.backward(
                    dout[:, rows],
                    q[:, rows],
                    current[0][:, cols],
                    current[1][:, cols],
                    out[:, rows],
                    lse[:, rows],
                    False,
                    scale,
                )
                dq[:, rows] += dq_c
                # chunk t - step's share goes straight back to its owner
                grad_out = torch.stack((dk_c, dv_c)).to(share_dtype)
                ops.append(
                    dist.P2POp(dist.isend, grad_out, peers[(t - step) % span], self.group, GRAD_TAG)
                )
                self.count(grad_out)
            source = (t + step) % span  # the rank that computed with our chunk at this step
            theirs = self.piece(source, t, causal, rows_total)
            received = None
            if theirs is not None:
                cols = theirs[1]
                shape = (2, kv_own.shape[1], len(range(rows_total)[cols]), *kv_own.shape[3:])
                grad_in = self.memory.scratch("ring_dkv", shape, share_dtype, kv_own.device)
                ops.append(dist.P2POp(dist.irecv, grad_in, peers[source], self.group, GRAD_TAG))
                received = (grad_in, cols)
            pending = pending + self._post(ops)
        for request in pending:
            request.wait()
        add_received()
        return dq, dk, dv
