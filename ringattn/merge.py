"""Merging partial attention results by their log-sum-exp: the one rule every computer feeds.

Given partial outputs ``O_i`` with log-sum-exps ``LSE_i`` over disjoint (or repeated, per config)
key sets, the merged output is ``sum_i exp(LSE_i - LSE) O_i`` with ``LSE = logsumexp_i LSE_i``.
Rows whose every ``LSE_i`` is ``-inf`` (selected by nothing) merge to exactly 0, never NaN.

Two forms of the same rule:

* :func:`merge_into_` — online and in place, on strided views of float32 accumulators; used by the
  core for block computers (no autograd inside: their backward is the merged-stats identity);
* :func:`merge` — functional and differentiable over a list of partials; used where autograd runs
  through the partials (flex returns its LSE with gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def merge_into_(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """``(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out, lse))`` in place."""
    lse_merged = torch.logaddexp(lse_acc, lse)
    reference = _finite_or_zero(lse_merged)
    out_acc.mul_(torch.exp(lse_acc - reference).unsqueeze(-1))
    out_acc.add_(out * torch.exp(lse - reference).unsqueeze(-1))
    lse_acc.copy_(lse_merged)


def merge(outs: list[Tensor], lses: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The merged output of partials ``outs[i]: [..., d]``, ``lses[i]: [...]``, in ``dtype``."""
    lse = torch.stack([x.to(dtype) for x in lses])
    top = _finite_or_zero(lse.amax(0))
    weights = torch.exp(lse - top)
    total = weights.sum(0)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    return sum(w.unsqueeze(-1) * o.to(dtype) for w, o in zip(weights, outs))
