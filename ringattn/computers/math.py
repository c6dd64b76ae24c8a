"""``math``: attention as einsums in float32 (float64 for float64 inputs).

The readable, any-dtype, any-device computer: the one to read first, and the one a new kernel is
checked against after the oracle.
"""

from __future__ import annotations

import torch

from ringattn.computers.base import BlockComputer, Rows, RowsLSE, accumulation_dtype
from ringattn.registry import register


def _scores(q: Rows, k: Rows, causal: bool, scale: float) -> torch.Tensor:
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    if causal:
        length = q.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


@register("computer", "math")
class MathComputer(BlockComputer):
    """``math``: each block's attention as einsums in float32 (float64 for float64 inputs), on
    any device and dtype: the readable reference computer."""

    def forward(
        self, q: Rows, k: Rows, v: Rows, causal: bool, scale: float
    ) -> tuple[Rows, RowsLSE]:
        dtype = accumulation_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        scores = _scores(q, k, causal, scale)
        # normalised by the weights' own sum, not as exp(scores - lse): lse rounded to float32
        # is off by ulp(|lse|), which at logits of ~1e3 left each row's weights summing to
        # 1 ± 1e-5 (and its gradients 10x further from float64 than torch's SDPA)
        top = scores.amax(dim=-1, keepdim=True)  # [B, H, L, 1]
        weights = torch.exp(scores - top)
        total = weights.sum(dim=-1, keepdim=True)
        out = torch.einsum("bhlm,bmhd->blhd", weights / total, v)
        lse = (top + torch.log(total)).squeeze(-1)  # [B, H, L]
        return out, lse.transpose(1, 2)

    def whole_covering_forward(self, q: Rows) -> bool:
        # its scores are [B, H, L, L] (three such temporaries): a covering block run whole
        # held w times the output's size, 8x (BLOCK_SPLIT) what its parts hold
        return False

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
    ) -> tuple[Rows, Rows, Rows]:
        dtype = accumulation_dtype(q.dtype)
        q, k, v, out, dout = (x.to(dtype) for x in (q, k, v, out, dout))
        probs = torch.exp(
            _scores(q, k, causal, scale) - lse.to(dtype).transpose(1, 2).unsqueeze(-1)
        )
        dv = torch.einsum("bhlm,blhd->bmhd", probs, dout)
        dprobs = torch.einsum("blhd,bmhd->bhlm", dout, v)
        # softmax backward: dS = P * (dP - rowsum(dO * O)); O is the merged output
        delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)
        dscores = probs * (dprobs - delta) * scale
        dq = torch.einsum("bhlm,bmhd->blhd", dscores, k)
        dk = torch.einsum("bhlm,blhd->bmhd", dscores, q)
        return dq, dk, dv
