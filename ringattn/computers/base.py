"""AttentionComputer: the kernels. Two granularities share the registry kind ``"computer"``:

* :class:`BlockComputer` — plain (optionally causal) attention over a batch of equal-length blocks,
  called once per block by the core, which merges the results (math, sdpa);
* :class:`LayoutComputer` — takes a whole config, or the whole mixture, in one call over the
  ``[b, n, h, d]`` sequence and returns the merged output itself (flex).

Block computers:

Inputs are ``[B, L, H, d]`` (B independent problems, L rows each); the forward returns the output
and the per-row log-sum-exp ``[B, L, H]`` (float32, or float64 for float64 inputs). The backward
takes the *merged* output and LSE of the whole dilated attention for these rows: with them, the
flash-attention backward of each block gives exactly that block's share of the gradient of the
merged (multi-config) softmax, so no gradient ever has to flow through an LSE.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Hashable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ringattn.component import Component
from ringattn.memory.base import MemoryManager
from ringattn.pattern import Plan

Rows = Float[Tensor, "B L H d"]
RowsLSE = Float[Tensor, "B L H"]
# one group of placed blocks for a grouped forward: its (q, k, v, out, lse or None) views
ForwardGroup = tuple[Rows, Rows, Rows, Rows, RowsLSE | None]
# ... and for a grouped backward: (dout, q, k, v, out, lse, dq, dk, dv), out and lse None
# where the launcher did not ask for them
BackwardGroup = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor, Tensor, Tensor
]


class AttentionComputer(Component):
    def unsupported(
        self,
        dtype: torch.dtype,
        device: torch.device,
        needs_grad: bool,
        *,
        compiled: bool = False,
        dilation: str = "",
        traced: bool = False,
        mixing: str = "",
        backend: str = "inductor",
    ) -> str | None:
        """Why this computer cannot run these inputs (checked eagerly, before any work).
        ``compiled``: the computer runs compiled (the module's own frame, or ``traced``);
        ``traced``: the call is traced by a torch.compile around the module, so the computer's
        work (its prepared masks included) is part of that outer graph; ``dilation`` and
        ``mixing``: the module's (``""`` where a caller has none); ``backend``: the compiling
        backend where ``compiled`` (a trace's is not visible: Inductor is assumed)."""
        return None


class BlockComputer(AttentionComputer):
    @abstractmethod
    def forward(
        self, q: Rows, k: Rows, v: Rows, causal: bool, scale: float
    ) -> tuple[Rows, RowsLSE]: ...

    @abstractmethod
    def backward(
        self,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        causal: bool,
        scale: float,
    ) -> tuple[Rows, Rows, Rows]: ...

    # The core calls these for blocks whose result is not merged but placed (head_groups blocks,
    # the parts of a block that covers every row and head): ``out``/``lse``/``grads`` are strided
    # views of its [b, n, h, ...] tensors. The default computes and copies; a computer whose
    # kernels take output strides overrides them to write in place.

    def forward_into(
        self,
        q: Rows,
        k: Rows,
        v: Rows,
        causal: bool,
        scale: float,
        out: Rows,
        lse: RowsLSE | None,
    ) -> None:
        """:meth:`forward` written into ``out`` and, unless None, ``lse``."""
        place_(out, lse, self.forward(q, k, v, causal, scale))

    def backward_into(
        self,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        causal: bool,
        scale: float,
        grads: tuple[Rows, Rows, Rows],
    ) -> None:
        """:meth:`backward` written into ``grads`` (dq, dk, dv)."""
        place_grads_(grads, self.backward(dout, q, k, v, out, lse, causal, scale))

    # The eager core prepares a *launcher* per placed block part and input layout once
    # (``ringattn.launches``) and then calls it with fresh views of the same layouts: per-layout
    # setup (a cuDNN graph's lookup) happens once, not in every call. A launcher holds no tensor.
    # The default runs the two methods above.

    def forward_launcher(
        self, causal: bool, scale: float, q: Rows, k: Rows, v: Rows, out: Rows, lse: RowsLSE | None
    ) -> Callable[[Rows, Rows, Rows, Rows, RowsLSE | None], None]:
        """:meth:`forward_into` for views of the layouts of these (example) views."""

        def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None) -> None:
            self.forward_into(q, k, v, causal, scale, out, lse)

        return launch

    def merging_launcher(
        self, causal: bool, scale: float, q: Rows, k: Rows, v: Rows, out: Rows, lse: RowsLSE
    ) -> Callable[[Rows, Rows, Rows, Rows, RowsLSE], bool] | None:
        """A launcher that merges the blocks' attention into ``out`` / ``lse`` (views of the
        core's accumulators) in one kernel, for views of these layouts; None where this computer
        has no such kernel (the core then merges :meth:`forward`'s result). The launcher returns
        False from a call it did not take (having written nothing)."""
        return None

    def zeroing_launcher(
        self,
        causal: bool,
        scale: float,
        shifts: tuple[int, ...],
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE | None,
    ) -> Callable[[Rows, Rows, Rows, Rows, RowsLSE | None], bool] | None:
        """A launcher that writes the blocks' attention into ``out`` / ``lse`` (as
        :meth:`forward_launcher`) and zeros into the rows ``shift`` elements from each of
        ``out``'s rows, for every shift (``head_groups``: the rows its config leaves out,
        :func:`ringattn.core.neighbour_shifts`) in one kernel, for views of these layouts; None
        where this computer has no such kernel (the core then zero-fills those rows before the
        blocks). The launcher returns False from a call it did not take (having written
        nothing)."""
        return None

    def grouped_launcher(
        self,
        causal: bool,
        scale: float,
        groups: list[ForwardGroup],
        shifts: list[tuple[int, ...]],
    ) -> Callable[[list[ForwardGroup]], bool] | None:
        """A launcher that does what :meth:`zeroing_launcher` (or, for a group without shifts,
        :meth:`forward_launcher`) does for each of several groups ``(q, k, v, out, lse)`` of
        placed blocks of one segment length, in one kernel, for views of these layouts, as
        ``launch(groups)``; None where this computer has no such kernel (the core then launches
        the groups one by one). The launcher returns False from a call it did not take (the
        core then launches every group, which rewrites whatever the call wrote)."""
        return None

    def grouped_backward_launcher(
        self,
        causal: bool,
        scale: float,
        groups: list[BackwardGroup],
        scratch: Callable[[str, tuple[int, ...]], Tensor],
        shifts: tuple[tuple[int, ...], ...] = (),
    ) -> Callable[..., bool] | None:
        """A launcher that does what :meth:`backward_launcher` does for each of several groups
        ``(dout, q, k, v, out, lse, dq, dk, dv)`` of placed blocks of one segment length, in one
        kernel, for views of these layouts, as ``launch(groups_of, dout, out, lse, index)``
        (``groups_of(full)``: the call's groups, made when the launcher asks, out and lse None
        unless ``full``; the whole contiguous ``dout``, ``out``, ``lse`` and the groups' units'
        positions in ``lse``, :func:`ringattn.launches.packed`), taking any float32 workspace
        from ``scratch(tag, shape)`` (the memory manager's); None where this computer has no such
        kernel. The launcher returns False from a call it did not take (the core then launches
        every group, which rewrites whatever the call wrote). ``shifts[g]``: the element shifts
        from group ``g``'s gradient rows to its config's unselected rows; a launcher that writes
        their zeros too says so (``launch.zeroes_unselected = True``), and the core's fill then
        skips them (where it declines, the core writes them)."""
        return None

    def launch_options(self) -> tuple[Hashable, ...]:
        """The settings this computer reads when it makes a launcher (``forward_launcher`` and
        the others): part of the key of prepared launches, so changing one takes effect on the
        next call (``SDPAComputer``'s kernel choices)."""
        return ()

    def places_whole_blocks(self, q: Tensor) -> bool:
        """Whether this computer's placed forward (:meth:`forward_launcher`) writes straight
        into its rows with no block-sized temporaries, here. Then the core launches each placed
        block whole instead of in the parts that bound temporaries (``pattern.BLOCK_SPLIT``):
        one kernel call fewer per extra part, the same rows written."""
        return False

    def whole_covering_forward(self, q: Tensor) -> bool:
        """Whether the core may run a first block that covers every row and head (``r = 1``
        under ``lse``) as one forward call whose output becomes the accumulator, here: true
        where the call's only block-sized temporaries are that output and its LSE (a fused
        kernel, which tiles the rows itself). False where they grow with the block's length too
        (``math``'s ``[B, H, L, L]`` scores): the core then runs the block in the plan's parts
        (``pattern.BLOCK_SPLIT``), merged into a zeroed accumulator as every other block is."""
        return True

    def placed_backward_split(self, q: Tensor) -> int | None:
        """The ``split`` (:meth:`ringattn.pattern.Block.cut`) in whose parts the core launches
        placed blocks through this computer's :meth:`backward_launcher` here, where its
        temporaries allow parts larger than the plan's; None: the plan's parts
        (``pattern.BLOCK_SPLIT``, sized for about five block-sized temporaries per call)."""
        return None

    def packs_backward_lse(self, q: Tensor) -> bool:
        """Whether this computer's placed backward (:meth:`backward_launcher`) takes any LSE
        strides and reads it as ``[B, H, L]`` contiguous, here. Then the core gathers the LSE
        rows of every placed launch of a backward into one buffer, each launch's as a
        contiguous ``[B, H, L]`` block (:func:`ringattn.launches.packed`): one gather per call
        where each launch would copy its own."""
        return False

    def shares_backward_dpsum(self, q: Tensor) -> bool:
        """Whether this computer's backward launchers (:meth:`backward_launcher`,
        :meth:`adding_launcher`) take each row's ``−rowsum(out∘dout)`` as given, here, in a
        tenth operand ``dlse`` (``[B, L, H]`` rows, laid out as the LSE's), instead of forming it
        from ``out`` and ``dout``. Then, under ``lse`` mixing, the core forms those sums once per
        backward for all launches (``ringattn.kernels.dpsum``) and gathers each launch's rows
        with its packed LSE (implies :meth:`packs_backward_lse`)."""
        return False

    def adding_launcher(
        self,
        causal: bool,
        scale: float,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        dq: Rows,
        dk: Rows,
        dv: Rows,
    ) -> Callable[..., tuple[Tensor, ...] | None] | None:
        """A launcher that adds the blocks' gradients into ``dq`` / ``dk`` / ``dv`` (views of
        the core's gradients) in the backward's kernels themselves, for views of these layouts;
        None where this computer has no such kernels. The launcher takes ``(dout, q, k, v, out,
        lse, dq, dk, dv[, dlse])`` (``dlse``: :meth:`shares_backward_dpsum`) and returns what it
        left for the core to add (``()``, or the blocks' ``(dQ,)`` where only dK and dV were
        added), or None from a call it did not take (having written nothing)."""
        return None

    def backward_launcher(
        self,
        causal: bool,
        scale: float,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        dq: Rows,
        dk: Rows,
        dv: Rows,
    ) -> Callable[..., None]:
        """:meth:`backward_into` for views of the layouts of these (example) views; the launcher
        takes ``(dout, q, k, v, out, lse, dq, dk, dv[, dlse])`` (``dlse``:
        :meth:`shares_backward_dpsum`; this one forms its own)."""

        def launch(
            dout: Tensor,
            q: Tensor,
            k: Tensor,
            v: Tensor,
            out: Tensor,
            lse: Tensor,
            dq: Tensor,
            dk: Tensor,
            dv: Tensor,
            dlse: Tensor | None = None,
        ) -> None:
            self.backward_into(dout, q, k, v, out, lse, causal, scale, (dq, dk, dv))

        return launch


def place_(out: Tensor, lse: Tensor | None, result: tuple[Tensor, Tensor]) -> None:
    """Copy a forward's ``(out, lse)`` into views of the core's tensors (``lse`` None: skip it)."""
    out.copy_(result[0])
    if lse is not None:
        lse.copy_(result[1])


def place_grads_(grads: tuple[Tensor, ...], result: tuple[Tensor, ...]) -> None:
    """Copy a backward's ``(dq, dk, dv)`` into views of the core's gradients."""
    for grad, grad_block in zip(grads, result):
        grad.copy_(grad_block)


class LayoutComputer(AttentionComputer):
    """Computes dilated attention for the whole sequence; autograd runs through it directly."""

    @abstractmethod
    def prepare(
        self, plan: Plan, causal: bool, dilation: str, device: torch.device, memory: MemoryManager
    ) -> tuple[Any, ...]:  # (each computer's own setup: only its attend reads it)
        """Eager, cached setup (block masks, permutations) passed to :meth:`attend` as ``aux``."""

    @abstractmethod
    def attend(
        self,
        plan: Plan,
        causal: bool,
        scale: float,
        dilation: str,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        aux: tuple[Any, ...],
    ) -> Tensor:
        """``[b, n, h, d]`` output of dilated attention (the definition, merged)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and merges run in float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
