"""The float64 oracle: dilated attention exactly as ``docs/semantics.md`` defines it.

Readable first, fast second. Two independent formulations:

* :func:`dilated_attention`: loop over configs, heads and segments; pick the selected rows by the
  definition's predicate, attend, record ``O_i`` and ``LSE_i``; merge by LSE ("lse") or take each
  head's own config ("head_groups"). :func:`dilated_attention_and_lse` also returns the merged
  LSE.
* :func:`dilated_attention_by_multiplicity`: one dense softmax per head with score bias
  ``log m(p, p')``, ``m`` = how many configs let ``p`` see ``p'``. Equal to the first by algebra,
  it shares no code with it beyond :func:`head_offset` and the argument checks
  (:class:`~ringattn.config.DilatedConfig`, :func:`expand_kv_heads`).

Both compute in float64 and are differentiable (autograd), so they are the oracle for gradients too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ringattn.config import DilatedConfig, checked_int

# The contract every strategy meets against this oracle: ‖out − ref‖ / ‖ref‖ at most this, per
# the inputs' dtype (gradients: relative to max(‖ref‖, 0.1·‖grad_out‖)). The tests, ablate, bench,
# distributed_bench and gpu_fuzz all read this one table.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,  # 10 more mantissa bits than bf16's 7: worst seen 5.7e-4 (300 draws)
}


def head_config_offset(
    h: int, configs: Sequence[tuple[int, int]], mixing: str, head: int, i: int
) -> int | None:
    """Row offset head ``head`` uses in config ``i``, or None if it does not use config ``i``."""
    k = len(configs)
    r = configs[i][1]
    if mixing == "lse":
        return head % r
    # head_groups: k contiguous groups, the first h mod k one head larger
    base, extra = divmod(h, k)
    sizes = [base + (1 if g < extra else 0) for g in range(k)]
    group = next(g for g in range(k) if head < sum(sizes[: g + 1]))
    return group % r if group == i else None


head_offset = head_config_offset


def expand_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: repeat each of the ``h_kv`` K/V heads ``h / h_kv`` times, so query
    head ``hd`` uses K/V head ``hd // (h / h_kv)``. The dilation offsets stay per *query* head."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        # (dense first: a nested tensor has no .shape, which the next message formats)
        if isinstance(x, Tensor) and (x.layout != torch.strided or x.is_nested):
            layout = "a nested tensor" if x.is_nested else str(x.layout)
            raise TypeError(f"{name} must be a dense (strided) tensor, got {layout}")
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x)
            raise TypeError(f"{name} must be a floating [b, n, h, d] tensor, got {got}")
        if min(x.shape) < 1:
            raise ValueError(f"{name} must have no empty dim, got shape {tuple(x.shape)}")
        # one dtype and device (docs/semantics.md): a k on the meta device gave zeros, silently
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}.device must equal q.device ({q.device}), got {x.device}")
    b, n, _, d = q.shape
    for name, x in (("k", k), ("v", v)):
        if (x.shape[0], x.shape[1], x.shape[3]) != (b, n, d):
            raise ValueError(
                f"{name} must be [b, n, h_kv, d] = [{b}, {n}, h_kv, {d}] like q, got "
                f"{tuple(x.shape)}"
            )
    h, h_kv = q.shape[2], k.shape[2]
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if h_kv == h:
        return k, v
    if h % h_kv:
        raise ValueError(f"the number of K/V heads ({h_kv}) must divide the query heads ({h})")
    return k.repeat_interleave(h // h_kv, dim=2), v.repeat_interleave(h // h_kv, dim=2)


def is_selected(p: int, w: int, r: int, off: int) -> bool:
    return ((p % w) - off) % r == 0


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
    mixing: str = "lse",
    scale: float | None = None,
) -> Tensor:
    """The oracle, ``[b, n, h, d]`` in float64 (loop-and-merge formulation).

    Grouped-query attention: ``k`` and ``v`` may have ``h_kv`` heads with ``h_kv | h``; query head
    ``hd`` reads key/value head ``hd // (h / h_kv)``. Offsets and head groups are those of the
    *query* head (see :func:`expand_kv_heads`).
    """
    return dilated_attention_and_lse(
        q,
        k,
        v,
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        causal=causal,
        mixing=mixing,
        scale=scale,
    )[0]


def dilated_attention_and_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
    mixing: str = "lse",
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`dilated_attention` and the merged LSE ``[b, n, h]`` (float64): the log of each
    row's softmax denominator over every key its configs let it see, ``-inf`` for rows no config
    selects. It is the statistic the merged-stats backward reads (``dS = P * (dP - D)`` with
    ``P = exp(S - LSE)``), so tests can model what that backward makes of an output's rounding.
    """
    cfg = DilatedConfig.of(segment_lengths, dilation_rates, causal, mixing, scale)
    k, v = expand_kv_heads(q, k, v)
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    _b, n, h, d = q.shape
    scale_ = cfg.scale_for(d)
    outs, lses = [], []
    for i, (w, r) in enumerate(cfg.configs):
        # (made like q, so under torch.func.vmap they are batched as q is: written into in
        # place, a plain torch.zeros refused vmap's batched rows)
        out_i = torch.zeros_like(q)
        lse_i = torch.full_like(q[..., 0], -math.inf)
        for head in range(h):
            off = head_config_offset(h, cfg.configs, cfg.mixing, head, i)
            if off is None:
                continue
            for seg_start in range(0, n, w):
                rows = [
                    p for p in range(seg_start, min(seg_start + w, n)) if is_selected(p, w, r, off)
                ]
                if not rows:
                    continue
                idx = torch.tensor(rows, device=q.device)
                qs, ks, vs = (x[:, idx, head] for x in (q, k, v))  # [b, m, d]
                scores = torch.einsum("bmd,bjd->bmj", qs, ks) * scale_
                if cfg.causal:
                    later = idx[None, :] > idx[:, None]
                    scores = scores.masked_fill(later, -math.inf)
                lse = torch.logsumexp(scores, dim=-1)
                out_i[:, idx, head] = torch.einsum("bmj,bjd->bmd", torch.softmax(scores, -1), vs)
                lse_i[:, idx, head] = lse
        outs.append(out_i)
        lses.append(lse_i)
    lse_stack = torch.stack(lses)  # [k, b, n, h]
    lse_all = torch.logsumexp(lse_stack, dim=0)
    # rows no config selects: every LSE_i is -inf; their output is 0 by definition
    selected = torch.isfinite(lse_all)
    weights = torch.where(selected, torch.exp(lse_stack - torch.where(selected, lse_all, 0.0)), 0.0)
    # they sum to 1 exactly, but not in float64 once ulp(|LSE|) nears log 2 (scale ~1e16: a row
    # came out doubled); divided by their sum, as ringattn.merge does
    total = weights.sum(0, keepdim=True)
    weights = weights / torch.where(total > 0, total, 1.0)
    # "head_groups": each head has exactly one finite LSE_i, so its weight is 1 and this merge
    # returns that config's output unchanged.
    return (weights.unsqueeze(-1) * torch.stack(outs)).sum(0), lse_all


def selection(
    n: int,
    h: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mixing: str = "lse",
) -> Tensor:
    """``sel[i, head, p]``: position ``p`` is selected for ``head`` in config ``i`` (bool)."""
    checked_int("n", n)
    checked_int("h", h)
    cfg = DilatedConfig.of(segment_lengths, dilation_rates, False, mixing, None)
    p = torch.arange(n)
    sel = torch.zeros(len(cfg.configs), h, n, dtype=torch.bool)
    for i, (w, r) in enumerate(cfg.configs):
        for head in range(h):
            off = head_config_offset(h, cfg.configs, cfg.mixing, head, i)
            if off is not None:
                sel[i, head] = ((p % w) - off) % r == 0
    return sel


def multiplicity(
    n: int,
    h: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
    mixing: str = "lse",
) -> Tensor:
    """``m[head, p, p']``: how many configs let query ``p`` see key ``p'`` (int64)."""
    # (causal checked as the config's: a string "False" was truthy, a causal mask unasked)
    cfg = DilatedConfig.of(segment_lengths, dilation_rates, causal, mixing, None)
    sel = selection(n, h, segment_lengths, dilation_rates, mixing)
    p = torch.arange(n)
    m = torch.zeros(h, n, n, dtype=torch.int64)
    for i, (w, _) in enumerate(cfg.configs):
        same_segment = (p[:, None] // w) == (p[None, :] // w)
        sees = same_segment[None] & sel[i][:, :, None] & sel[i][:, None, :]
        if causal:
            sees = sees & (p[None, :] <= p[:, None])[None]
        m += sees.long()
    return m


def dilated_attention_by_multiplicity(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
    mixing: str = "lse",
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Second oracle: one softmax with bias ``log m`` (−inf where m = 0); unseeing rows give 0.

    ``dtype`` other than float64 turns it into the naive dense baseline in that precision, which
    the tests use to measure how well-conditioned a gradient is (see tests/test_strategies.py).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    cfg = DilatedConfig.of(segment_lengths, dilation_rates, causal, mixing, scale)
    k, v = expand_kv_heads(q, k, v)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    _b, n, h, d = q.shape
    m = multiplicity(n, h, cfg.segment_lengths, cfg.dilation_rates, cfg.causal, cfg.mixing)
    bias = torch.log(m.to(dtype).to(q.device))  # log 0 = -inf
    scores = torch.einsum("bphd,bjhd->bhpj", q, k) * cfg.scale_for(d) + bias
    sees_any = (m > 0).any(-1).to(q.device)  # [h, n]
    probs = torch.softmax(torch.where(sees_any[..., None], scores, 0.0), dim=-1)
    probs = torch.where(sees_any[..., None], probs, 0.0)
    return torch.einsum("bhpj,bjhd->bphd", probs, v)
