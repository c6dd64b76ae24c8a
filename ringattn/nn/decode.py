"""Incremental (KV-cache) decoding of causal dilated attention, one new query at a time.

A new token at position ``p`` is a query of config ``(w, r)`` only for the heads whose offset
``o`` satisfies ``((p mod w) - o) mod r == 0``; it sees the rows ``s + o, s + o + r, ... <= p`` of
its segment (``s = p - p mod w``). So each step reads at most ``sum_i w_i / r_i`` cached rows per
head, however long the sequence already is — the cost of the pattern, nothing more. The configs are
merged by LSE exactly as in the full computation (``ringattn.merge.merge``), so the logits equal a
full recompute up to float rounding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import Tensor

from ringattn.computers.base import accumulation_dtype
from ringattn.config import DilatedConfig, checked_int
from ringattn.core import input_precision
from ringattn.merge import merge
from ringattn.pattern import make_plan

if TYPE_CHECKING:
    _F = TypeVar("_F", bound=Callable[..., Any])

    class _Decorator(Protocol):
        """A decorator that returns the function it takes as it was typed."""

        def __call__(self, fn: _F, /) -> _F: ...


# Calls with a cache run eagerly, inside a compiled model too (the layers' and the model's
# ``_decoding_forward``): they branch in Python on the cache's length, so a graph would be
# specialised to each position (a recompile per token), and once Dynamo made the positions
# symbolic Inductor failed on them (an AssertionError in torch's sympy functions at the second
# decoded token)
eager_decoding: _Decorator = torch.compiler.disable(
    reason="incremental decoding branches in Python on the cache's length"
)


@dataclass
class KVCache:
    """Keys (post-rotary) and values of one layer, ``[b, capacity, h_kv, d]``; ``length`` filled."""

    k: Tensor
    v: Tensor
    length: int = 0

    @classmethod
    def empty(
        cls,
        b: int,
        capacity: int,
        h_kv: int,
        d: int,
        dtype: torch.dtype | None,
        device: torch.device | str | int | None,
    ) -> KVCache:
        checked_int("batch", b)
        checked_int("capacity", capacity)
        # (h_kv = 0 made a cache decode_one divided by; d = -1 raised torch's unnamed error)
        checked_int("h_kv", h_kv)
        checked_int("d", d)
        # (an integer dtype made a cache that only the first call refused, by its check)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (b, capacity, h_kv, d)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    def check(self) -> None:
        """Raise unless ``k`` and ``v`` are floating ``[b, capacity, h_kv, d]`` tensors of one
        shape, dtype and device and ``length`` an int in ``[0, capacity]``: the checks of the
        layer's call and of :func:`decode_one` (an integer cache stored K/V truncated, and a
        length past the capacity or a ``v`` unlike ``k`` raised torch's index errors)."""
        k, v, length = self.k, self.v, self.length
        if not (isinstance(k, Tensor) and isinstance(v, Tensor)) or k.dim() != 4:
            raise TypeError("cache.k and cache.v must be [b, capacity, h_kv, d] tensors")
        if not k.is_floating_point() or v.dtype != k.dtype or v.shape != k.shape:
            raise TypeError(
                "cache.k and cache.v must be floating tensors of one shape and dtype, got "
                f"{k.dtype} {tuple(k.shape)} and {v.dtype} {tuple(v.shape)}"
            )
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= k.shape[1]:
            raise ValueError(f"cache.length must be an int in [0, {k.shape[1]}], got {length!r}")
        if v.device != k.device:
            raise ValueError(f"cache.v must be on cache.k's device {k.device}, got {v.device}")

    def detach_(self) -> KVCache:
        """Cut the cache from the autograd graph of the calls that filled it; returns it.

        Filled with gradients on, the cache carries those calls' graph (its rows are written
        in place), so a backward through a later call runs back through them: a second
        backward raised torch's "backward through the graph a second time", and every call's
        graph stayed alive. Detach between chunks for truncated backpropagation, or decode
        under ``torch.no_grad()``."""
        self.k, self.v = self.k.detach(), self.v.detach()
        return self

    def check_room(self, n: int) -> None:
        """Raise unless ``n`` more positions fit."""
        if self.length + n > self.k.shape[1]:
            steps = int(n)  # a plain int: traced, the message cannot format a SymInt
            raise ValueError(
                f"KV cache capacity {self.k.shape[1]} exceeded ({self.length} + {steps})"
            )

    def append(self, k: Tensor, v: Tensor) -> None:
        """Store the keys and values ``[b, n, h_kv, d]`` of ``n`` new positions (the cache's
        b, h_kv, d and device: the copy broadcast a batch of 1; cast to the cache's dtype, as
        under autocast)."""
        like = self.k
        dims = (like.shape[0], like.shape[2], like.shape[3])
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, Tensor) or x.dim() != 4 or (x.shape[0], *x.shape[2:]) != dims:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"{name} must be [b, n, h_kv, d] with the cache's (b, h_kv, d) = {dims}, "
                    f"got {got}"
                )
            if x.shape[1] != k.shape[1]:
                raise ValueError(f"v must hold k's {k.shape[1]} positions, got {x.shape[1]}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
            if x.device != like.device:
                raise ValueError(
                    f"{name} must be on the cache's device {like.device}, got {x.device}"
                )
        n = k.shape[1]
        self.check_room(n)
        self.k[:, self.length : self.length + n] = k
        self.v[:, self.length : self.length + n] = v
        self.length += n


def decode_one(
    q: Tensor,
    cache: KVCache,
    position: int,
    configs: tuple[tuple[int, int], ...],
    mixing: str,
    scale: float,
) -> Tensor:
    """Output ``[b, h, d]`` of the query ``q: [b, h, d]`` at ``position`` (its K/V are cached:
    ``position < cache.length``), for the configs ``((w_0, r_0), ...)`` under ``mixing``.

    Each argument is checked first (before: a position past the cached rows read the cache's
    zeros, a negative one gave zeros, and an ``r`` that does not divide ``w`` or a scale
    ``<= 0`` were computed, silently). ``MultiheadDilatedAttention`` calls the unchecked
    :func:`decode_unchecked` with what its own checks passed."""
    if not isinstance(q, Tensor) or q.dim() != 3 or not q.is_floating_point():
        got = f"{q.dtype} of shape {tuple(q.shape)}" if isinstance(q, Tensor) else type(q)
        raise TypeError(f"q must be a floating [b, h, d] tensor, got {got}")
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    cache.check()
    if q.device != cache.k.device:  # (a cache on the meta device gave zeros, silently)
        raise ValueError(f"q.device must equal the cache's ({cache.k.device}), got {q.device}")
    (b, h, d), (cb, _, h_kv, cd) = q.shape, cache.k.shape
    if (b, d) != (cb, cd) or h_kv < 1 or h % h_kv:  # (h_kv = 0: h % 0 raised ZeroDivisionError)
        raise ValueError(
            f"q [b, h, d]={tuple(q.shape)} must match cache.k [b, capacity, h_kv, d]="
            f"{tuple(cache.k.shape)}: the same b and d, and h a multiple of h_kv"
        )
    checked_int("position", position, minimum=0)
    if position >= cache.length:
        raise ValueError(
            f"position must be < cache.length={cache.length} (its key and value cached), got "
            f"{position}"
        )
    if isinstance(configs, (str, bytes)) or not isinstance(configs, (list, tuple)):
        raise TypeError(f"configs must be a tuple of (w, r) pairs, got {type(configs).__name__}")
    if not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in configs):
        raise TypeError(f"configs must be a tuple of (w, r) pairs, got {configs!r}")
    if scale is None:
        raise TypeError("scale must be a float, got None")
    # the library's own rules for configs, mixing and scale (causal: decoding is), their
    # messages in this function's terms (they named segment_lengths / dilation_rates)
    try:
        config = DilatedConfig(
            tuple(w for w, _ in configs), tuple(r for _, r in configs), True, mixing, scale
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(_in_terms_of_configs(str(exc))) from None
    # as the layer's prefill checks it: float32 logits (all but float64 inputs) took a scale
    # of 1e-50 as 0, every key weighted alike, silently
    config.check_scale_for(q.dtype)
    return decode_unchecked(q, cache, position, config, float(scale))


def _in_terms_of_configs(message: str) -> str:
    """A :class:`DilatedConfig` message about its two sequences, said of ``configs``' pairs."""
    message = re.sub(r"segment_lengths\[(\d+)\]", r"configs[\1][0]", message)
    message = re.sub(r"dilation_rates\[(\d+)\]", r"configs[\1][1]", message)
    return message.replace("segment_lengths", "configs").replace("dilation_rates", "configs")


def decode_unchecked(
    q: Tensor, cache: KVCache, position: int, config: DilatedConfig, scale: float
) -> Tensor:
    """:func:`decode_one` without its checks, for a validated ``config`` (the layer's call: its
    own checks passed its arguments)."""
    configs, mixing = config.configs, config.mixing
    # autocast off: a user's autocast made the einsums bf16 (index_put into float32 raised)
    with input_precision(q.device):
        b, h, d = q.shape
        group = (
            h // cache.k.shape[2]
        )  # grouped-query attention: query head hd reads kv head hd // group
        dtype = accumulation_dtype(q.dtype)
        offsets = make_plan(1, h, configs, mixing).head_offsets()
        outs, lses = [], []
        for i, (w, r) in enumerate(configs):
            out_i = torch.zeros(b, h, d, dtype=dtype, device=q.device)
            lse_i = torch.full((b, h), float("-inf"), dtype=dtype, device=q.device)
            seg_start = position - position % w
            for o in sorted(set(offsets[i]) - {-1}):
                if ((position % w) - o) % r:
                    continue  # this position is not a query of offset o
                heads = torch.tensor(
                    [hd for hd in range(h) if offsets[i][hd] == o], device=q.device
                )
                rows = torch.arange(seg_start + o, position + 1, r, device=q.device)
                keys = cache.k[:, rows][:, :, heads // group].to(dtype)  # [b, L, hs, d]
                values = cache.v[:, rows][:, :, heads // group].to(dtype)
                scores = torch.einsum("bhd,blhd->bhl", q[:, heads].to(dtype), keys) * scale
                lse = torch.logsumexp(scores, dim=-1)
                out_i[:, heads] = torch.einsum("bhl,blhd->bhd", torch.softmax(scores, -1), values)
                lse_i[:, heads] = lse
            outs.append(out_i)
            lses.append(lse_i)
        return merge(outs, lses, dtype).to(q.dtype)
