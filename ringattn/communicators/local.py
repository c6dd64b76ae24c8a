"""``local``: one device, no communication; the block's own keys are all there is."""

from __future__ import annotations

from ringattn.communicators.base import Communicator
from ringattn.computers.base import BlockComputer, Rows, RowsLSE
from ringattn.memory.base import MemoryManager
from ringattn.registry import register


@register("communicator", "local")
class LocalCommunicator(Communicator):
    """``local``: one device, no communication. It takes no ``group`` and only
    ``layout="contiguous"`` (a ``ValueError`` otherwise)."""

    layout = "contiguous"

    def __init__(
        self, group: object = None, memory: MemoryManager | None = None, layout: str = "contiguous"
    ) -> None:
        if group is not None:
            raise ValueError("group= needs a sequence-parallel communicator ('ring', 'all_gather')")
        if layout != "contiguous":
            raise ValueError(
                f"layout={layout!r} needs a sequence-parallel communicator ('ring', 'all_gather'); "
                "on one device the sequence is whole"
            )

    def attend(
        self,
        computer: BlockComputer,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        span: int = 1,
    ) -> tuple[Rows, RowsLSE]:
        return computer.forward(q, k, v, causal, scale)

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
        return computer.backward(dout, q, k, v, out, lse, causal, scale)
