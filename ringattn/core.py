"""The compiled core: blocks → communicator → computer → LSE merge, and its backward.

Everything in this module is tensor code over a static :class:`CoreSpec`; it is what
``torch.compile(fullgraph=True)`` captures. No validation, no caches, no Python-side decisions that
depend on tensor values happen here (see ``docs/architecture.md``).

Forward: for every block (one config, one row offset, its heads; full segments or the tail) the
computer returns ``(out_i, lse_i)`` for the block's rows, which are merged into float32
accumulators ``[b, n, h, d]`` / ``[b, n, h]`` in place, through strided views:
``lse = logaddexp(lse, lse_i)``, ``acc = acc * exp(lse_old - lse) + out_i * exp(lse_i - lse)``.

Backward: every block's kernel backward is called with the *merged* output and LSE of its rows.
Because the merged result is one softmax over the union of the configs' keys (each counted as
often as configs let the query see it), ``P = exp(s - lse_merged)`` is exactly that softmax and the
per-block backwards sum to the exact gradient (the ring-attention identity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ringattn.communicators.base import Communicator
from ringattn.computers.base import AttentionComputer, LayoutComputer, accumulation_dtype
from ringattn.dilation.base import DilationProcessor
from ringattn.memory.base import MemoryManager
from ringattn.merge import merge_into_
from ringattn.pattern import Plan


@dataclass(frozen=True, eq=False)
class CoreSpec:
    plan: Plan
    causal: bool
    scale: float
    dilation: DilationProcessor
    computer: AttentionComputer
    communicator: Communicator
    # Scratch-buffer owner in eager mode; under torch.compile a NoReuse manager (Inductor plans
    # temporaries itself).
    memory: MemoryManager
    # spans[i]: how many ranks config i's segments span (all 1 on one device)
    spans: tuple[int, ...] = ()


def _index(indices: tuple[Tensor, ...], i: int) -> Tensor | None:
    return indices[i] if indices else None


def dilated_forward(
    spec: CoreSpec, q: Tensor, k: Tensor, v: Tensor, indices: tuple[Tensor, ...], keep_lse: bool
) -> tuple[Tensor, Tensor]:
    """Merged output ``[b, n, h, d]`` (q's dtype) and LSE ``[b, n, h]`` (accumulation dtype)."""
    b, n, h, d = q.shape
    acc_dtype = accumulation_dtype(q.dtype)
    # The float accumulator escapes only when it *is* the output (fp32/fp64 inputs); the LSE only
    # when the backward needs it. Anything that does not escape may come from the pool.
    if q.dtype == acc_dtype:
        out_acc = torch.zeros(b, n, h, d, dtype=acc_dtype, device=q.device)
    else:
        out_acc = spec.memory.scratch("out_acc", (b, n, h, d), acc_dtype, q.device).zero_()
    if keep_lse:
        lse_acc = torch.full((b, n, h), float("-inf"), dtype=acc_dtype, device=q.device)
    else:
        lse_acc = spec.memory.scratch("lse_acc", (b, n, h), acc_dtype, q.device).fill_(
            float("-inf")
        )

    for i, block in enumerate(spec.plan.blocks):
        index = _index(indices, i)
        q_dilated = spec.dilation.read(q, block, index)
        k_dilated = spec.dilation.read(k, block, index)
        v_dilated = spec.dilation.read(v, block, index)
        out_block, lse_block = spec.communicator.attend(
            spec.computer,
            q_dilated,
            k_dilated,
            v_dilated,
            spec.causal,
            spec.scale,
            spec.spans[block.job.config],
        )
        out_rows = block.rows(out_acc)
        lse_rows = block.rows(lse_acc)
        out_block = out_block.unflatten(0, (b, block.segments))
        lse_block = lse_block.unflatten(0, (b, block.segments))
        if spec.plan.disjoint:
            out_rows.copy_(out_block)
            lse_rows.copy_(lse_block)
        else:
            merge_into_(out_rows, lse_rows, out_block, lse_block)

    out = out_acc if q.dtype == acc_dtype else out_acc.to(q.dtype)
    return out, lse_acc


def dilated_backward(
    spec: CoreSpec,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    indices: tuple[Tensor, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    b = q.shape[0]
    acc_dtype = accumulation_dtype(q.dtype)

    def accumulator(tag: str) -> Tensor:
        if q.dtype == acc_dtype:
            return torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        return spec.memory.scratch(tag, tuple(q.shape), acc_dtype, q.device).zero_()

    dq_acc, dk_acc, dv_acc = accumulator("dq_acc"), accumulator("dk_acc"), accumulator("dv_acc")
    for i, block in enumerate(spec.plan.blocks):
        index = _index(indices, i)
        read = lambda x, block=block, index=index: spec.dilation.read(x, block, index)  # noqa: E731
        dq_block, dk_block, dv_block = spec.communicator.attend_backward(
            spec.computer,
            read(dout),
            read(q),
            read(k),
            read(v),
            read(out),
            read(lse),
            spec.causal,
            spec.scale,
            spec.spans[block.job.config],
        )
        block.rows(dq_acc).add_(dq_block.unflatten(0, (b, block.segments)))
        block.rows(dk_acc).add_(dk_block.unflatten(0, (b, block.segments)))
        block.rows(dv_acc).add_(dv_block.unflatten(0, (b, block.segments)))
    return tuple(g if q.dtype == acc_dtype else g.to(q.dtype) for g in (dq_acc, dk_acc, dv_acc))


class DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: CoreSpec, q: Tensor, k: Tensor, v: Tensor, *indices: Tensor) -> Tensor:  # type: ignore[override]
        out, lse = dilated_forward(spec, q, k, v, indices, keep_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, *indices)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse, *indices = ctx.saved_tensors
        dq, dk, dv = dilated_backward(ctx.spec, dout, q, k, v, out, lse, tuple(indices))
        return (None, dq, dk, dv, *([None] * len(indices)))


def run_core(
    spec: CoreSpec, q: Tensor, k: Tensor, v: Tensor, indices: tuple[Tensor, ...], aux: tuple
) -> Tensor:
    """The function ``torch.compile`` wraps.

    Block computers go through :class:`DilatedAttentionFunction` (merged-stats backward) only when
    some input needs a gradient; a layout computer (flex) returns the merged output itself and
    autograd runs through it.
    """
    if isinstance(spec.computer, LayoutComputer):
        return spec.computer.attend(
            spec.plan, spec.causal, spec.scale, spec.dilation.name, q, k, v, aux
        )
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return DilatedAttentionFunction.apply(spec, q, k, v, *indices)
    return dilated_forward(spec, q, k, v, indices, keep_lse=False)[0]
