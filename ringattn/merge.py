"""Merging partial attention results by their log-sum-exp: the one rule every computer feeds.

Given partial outputs ``O_i`` with log-sum-exps ``LSE_i`` over disjoint (or repeated, per config)
key sets, the merged output is ``sum_i exp(LSE_i - LSE) O_i`` with ``LSE = logsumexp_i LSE_i``.
Rows whose every ``LSE_i`` is ``-inf`` (selected by nothing) merge to exactly 0, never NaN.

Two forms of the same rule:

* :func:`merge_into_` — online and in place, on strided views of the accumulators (any float
  dtype; the arithmetic is float32 or better and each merge rounds once); used by the core for
  block computers (no autograd inside: their backward is the merged-stats identity). On CUDA, in
  eager mode, it is one Triton kernel (:mod:`ringattn.kernels.merge`);
* :func:`merge` — functional and differentiable over a list of partials; used where autograd runs
  through the partials (flex returns its LSE with gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ringattn.capture import compiling
from ringattn.kernels import merge as merge_kernel


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


# the accumulator dtypes the Triton merge takes: its arithmetic is float32 (float64 keeps torch's)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_merges(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> bool:
    """Whether the Triton kernel computes this merge. It reads ``out`` and ``lse`` with their
    own strides over the accumulators' shape, so it takes only operands of exactly that shape
    on one device: others (a result of the wrong shape) go to torch, which broadcasts or raises,
    where the kernel read past them."""
    return (
        out_acc.dim() in (4, 5)
        and not compiling()
        and merge_kernel.available(out_acc)
        and lse_acc.dtype == torch.float32
        and out_acc.dtype in _KERNEL_DTYPES
        and out.shape == out_acc.shape
        and lse.shape == lse_acc.shape == out_acc.shape[:-1]
        and out.device == lse.device == lse_acc.device == out_acc.device
    )


def merge_into_(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """``(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out, lse))`` in place.

    ``out_acc: [..., d]`` may be stored in a lower precision than ``lse_acc``; the weighted sum is
    formed in ``lse_acc``'s dtype and rounded once.
    """
    if _kernel_merges(out_acc, lse_acc, out, lse):
        lead = 5 - out_acc.dim()  # the kernel takes [b, S, L, H, d]
        views = (x[(None,) * lead] for x in (out_acc, lse_acc, out, lse))
        merge_kernel.merge_rows_(*views)
        return
    # Weights relative to the larger LSE, normalised by their sum (as the Triton kernel does):
    # weights relative to the merged LSE, itself rounded, sum to 1 only to within ulp(|LSE|),
    # and every merge scaled the row by that (float32 logits near 2000: 3e-5 off, over the
    # float32 bound, where a dense softmax is 2e-8 off).
    top = _finite_or_zero(torch.maximum(lse_acc, lse))  # rows selected by nothing yet stay 0
    weight_old, weight_new = torch.exp(lse_acc - top), torch.exp(lse - top)
    total = weight_old + weight_new
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    lse_merged = torch.where(total > 0, top + torch.log(safe_total), float("-inf"))
    weight_old = (weight_old / safe_total).unsqueeze(-1)
    weight_new = (weight_new / safe_total).unsqueeze(-1)
    if out_acc.dtype == lse_acc.dtype:
        part = out * weight_new  # (first: an operand of the wrong shape raises before any write)
        out_acc.mul_(weight_old).add_(part)
    else:
        out_acc.copy_(out_acc * weight_old + out * weight_new)
    lse_acc.copy_(lse_merged)


def merge(outs: list[Tensor], lses: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The merged output of partials ``outs[i]: [..., d]``, ``lses[i]: [...]``, in ``dtype``."""
    lse = torch.stack([x.to(dtype) for x in lses])
    top = _finite_or_zero(lse.amax(0))
    weights = torch.exp(lse - top)
    total = weights.sum(0)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    out: Tensor = sum(w.unsqueeze(-1) * o.to(dtype) for w, o in zip(weights, outs))
    return out
