"""Communicator: where a block's keys and values come from.

On one device (``local``) they are the block's own rows. The sequence-parallel communicators
(``all_gather``, ``ring``) fetch the rows of a segment that other ranks hold and merge the
partial results by LSE, behind the same two calls.
"""

from __future__ import annotations

from abc import abstractmethod

from ringattn.component import Component
from ringattn.computers.base import BlockComputer, Rows, RowsLSE, place_, place_grads_


class Communicator(Component):
    """``attend`` / ``attend_backward`` get the block's rows on this rank and ``span``, how many
    ranks the block's segments span (1: all rows are local)."""

    world_size: int = 1
    distributed: bool = False
    # how the sequence is sharded over the ranks (ringattn.distributed.LAYOUTS)
    layout: str = "contiguous"

    @abstractmethod
    def attend(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        span: int = 1,
    ) -> tuple[Rows, RowsLSE]: ...

    @abstractmethod
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
    ) -> tuple[Rows, Rows, Rows]: ...

    def attend_into(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        span: int,
        out: Rows,
        lse: RowsLSE | None,
    ) -> None:
        """:meth:`attend` written into views of the core's tensors (a placed block). With
        ``span == 1`` nothing travels and the computer writes in place."""
        if span == 1:
            computer.forward_into(q, k, v, causal, scale, out, lse)
            return
        place_(out, lse, self.attend(computer, q, k, v, causal, scale, span))

    def attend_backward_into(
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
        span: int,
        grads: tuple[Rows, Rows, Rows],
    ) -> None:
        """:meth:`attend_backward` written into views of the gradients (a placed block)."""
        if span == 1:
            computer.backward_into(dout, q, k, v, out, lse, causal, scale, grads)
            return
        place_grads_(
            grads, self.attend_backward(computer, dout, q, k, v, out, lse, causal, scale, span)
        )
