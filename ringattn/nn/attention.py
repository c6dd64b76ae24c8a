"""``MultiheadDilatedAttention``: projections, grouped-query heads, sub-layer norm, KV cache.

Batch-first ``[b, n, embed_dim]`` in and out. ``num_kv_heads`` (dividing ``num_heads``) gives
grouped-query attention: query head ``hd`` reads K/V head ``hd // (num_heads / num_kv_heads)``,
and the dilation offsets (and head groups) are those of the *query* head — the definition the
oracle implements (``reference.expand_kv_heads``). ``sub_layer_norm`` is MAGNETO's Sub-LN (a
LayerNorm on the attention output before the out projection), as used by LongNet. Dropout applies
to the layer's output (the kernels have no attention-probability dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from beartype import beartype
from einops import rearrange
from jaxtyping import Float, jaxtyped
from torch import Tensor, nn

from ringattn import distributed
from ringattn.api import DilatedAttention, FixedAtConstruction
from ringattn.config import checked_int
from ringattn.core import autocast_dtype
from ringattn.nn.decode import KVCache, decode_unchecked, eager_decoding
from ringattn.nn.rotary import rotary
from ringattn.strategy import Strategy

BNE = Float[Tensor, "b n e"]
_DEFAULT_STRATEGY = Strategy()


class MultiheadDilatedAttention(FixedAtConstruction, nn.Module):
    """LongNet's attention layer: projections, dilated attention, output projection.

    ``x: [b, n, embed_dim]`` -> ``[b, n, embed_dim]``. Q has ``num_heads`` heads of
    ``embed_dim / num_heads``; K and V have ``num_kv_heads`` (default ``num_heads``; grouped-query
    attention where fewer, repeated per query head as ``docs/semantics.md`` defines). The
    attention itself is a :class:`ringattn.DilatedAttention` (``self.attention``) with
    ``segment_lengths``, ``dilation_rates``, ``causal``, ``mixing``, ``strategy``, ``compile``,
    ``group`` and ``layout`` as there (a sequence-parallel ``strategy`` takes ``x`` as this
    rank's shard, ``ringattn.distributed.shard``). ``sub_layer_norm``: LongNet's LayerNorm on
    the attention output before ``out_proj`` (MAGNETO's Sub-LN); ``rotary_embedding``: rotary
    positions on Q and K (float64 angles; a sequence-parallel layer rotates by the shard's global
    positions); ``dropout`` on the output; ``bias`` of the four projections. ``new_cache`` makes
    a KV cache for incremental decoding on one device (``forward(x, cache)``). ``device`` and
    ``dtype``: the parameters' (torch's factory arguments; ``torch.nn.utils.skip_init`` uses them).
    """

    @jaxtyped(typechecker=beartype)
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        causal: bool = False,
        mixing: str = "lse",
        dropout: float | int = 0.0,
        sub_layer_norm: bool = True,
        rotary_embedding: bool = False,
        bias: bool = True,
        strategy: Strategy = _DEFAULT_STRATEGY,
        compile: bool = True,
        group: Any = None,  # (as DilatedAttention's, which checks it)
        layout: str = "contiguous",
        device: torch.device | str | int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        # (beartype takes a bool for an int)
        checked_int("embed_dim", embed_dim)
        checked_int("num_heads", num_heads)
        checked_int("num_kv_heads", num_kv_heads)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if rotary_embedding and (embed_dim // num_heads) % 2:
            raise ValueError(
                f"rotary_embedding needs an even head dim (embed_dim / num_heads), got "
                f"{embed_dim} / {num_heads} = {embed_dim // num_heads}"
            )
        self.embed_dim = embed_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.rotary_embedding = rotary_embedding
        self.attention = DilatedAttention(
            segment_lengths,
            dilation_rates,
            causal=causal,
            mixing=mixing,
            strategy=strategy,
            compile=compile,
            group=group,
            layout=layout,
        )
        # (device/dtype: torch's factory arguments, as nn.MultiheadAttention's; without them
        # torch.nn.utils.skip_init refused the layer)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        inner = num_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(inner, **factory) if sub_layer_norm else nn.Identity()
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self._built = True

    # the constructor's options, read into the projections and self.attention and kept under
    # no name of their own (DilatedAttention.OPTIONS): assigned later, each was a new attribute
    # that no call reads (`layer.causal = True` left the layer non-causal, silently). Not
    # device / dtype: torch's factory arguments, names that tools may tag any module with
    OPTIONS = ("segment_lengths", "dilation_rates", "causal", "mixing", "sub_layer_norm", "bias",
               "strategy", "compile", "group", "layout")  # fmt: skip

    def _heads(self, x: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        # heads by their width, not their count: under a tensor-parallel plan (torch's
        # ColwiseParallel on the projections) a rank's projections give its own heads, and
        # split into num_heads each head's channels were cut across pseudo-heads (outputs
        # 0.3-0.6 off, silently)
        q = rearrange(self.q_proj(x), "b n (h d) -> b n h d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b n (h d) -> b n h d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b n (h d) -> b n h d", d=self.head_dim)
        if q.shape[2] != self.num_heads or k.shape[2] != self.num_kv_heads:
            self._check_split_heads(q.shape[2], k.shape[2])
        if self.rotary_embedding:
            communicator = self.attention.communicator
            if communicator.distributed:  # x is this rank's shard of the sequence
                positions = start + distributed.positions(
                    x.shape[1],
                    communicator.rank,
                    communicator.world_size,
                    communicator.layout,
                    device=x.device,
                )
            else:
                positions = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = rotary(q, positions), rotary(k, positions)
        return q, k, v

    def _check_split_heads(self, heads: int, kv_heads: int) -> None:
        """A rank holding ``heads`` of the layer's ``num_heads`` (tensor parallelism): dilated
        attention numbers heads within its call, so this rank's heads take heads
        ``0..heads-1``'s offsets and groups, the whole layer's only where docs/semantics.md's
        "Heads split across ranks" says (lse with every rate dividing ``heads``, or one config
        under head_groups). Anything else is refused: it computed another function, silently."""
        config = self.attention.config
        rates = config.dilation_rates
        even = (
            0 < heads <= self.num_heads  # (0 heads: a projection of no channels)
            and self.num_heads % heads == 0
            and self.num_kv_heads * heads == kv_heads * self.num_heads
        )
        if not even:
            raise ValueError(
                f"the projections gave {heads} query and {kv_heads} K/V heads of head_dim "
                f"{self.head_dim}, where the layer has num_heads={self.num_heads} and "
                f"num_kv_heads={self.num_kv_heads}: a split of the heads across ranks must "
                "give each rank an equal share of both"
            )
        same = (config.mixing == "lse" and all(heads % r == 0 for r in rates)) or (
            config.mixing == "head_groups" and len(rates) == 1
        )
        if not same:
            raise ValueError(
                f"the projections gave {heads} of the layer's num_heads={self.num_heads} heads "
                "(its heads split across ranks, as a tensor-parallel plan does): dilated "
                "attention numbers heads within a call, so these would take the first heads' "
                "offsets, not their own (docs/semantics.md, 'Heads split across ranks'). Only "
                "mixing='lse' with every dilation rate dividing the heads per rank, or one "
                f"config under 'head_groups', computes the whole layer's function; got "
                f"mixing={config.mixing!r}, dilation_rates={tuple(rates)}"
            )

    def _output(self, attn: Tensor) -> Tensor:
        out: Tensor = self.dropout(
            self.out_proj(self.norm(rearrange(attn, "b n h d -> b n (h d)")))
        )
        return out

    def check_call(self, x: Tensor, cache: KVCache | None) -> None:
        """The call's rules, before any work; plain Python, so a tracing ``torch.compile`` folds
        them into guards (the annotations' beartype check would break its graph)."""
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x)
            raise TypeError(f"x must be a floating [b, n, embed_dim] tensor, got {got}")
        if x.shape[-1] != self.embed_dim or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(
                f"x must be [b >= 1, n >= 1, embed_dim={self.embed_dim}], got {tuple(x.shape)}"
            )
        weight = self._reference_weight(self.q_proj)
        if weight is not None:  # (None: no floating parameter to hold x to)
            if x.device != weight.device:
                raise ValueError(
                    f"x must be on the layer's parameters' device ({weight.device}), got {x.device}"
                )
            if x.dtype != weight.dtype and autocast_dtype(x.device.type) is None:
                raise TypeError(
                    f"x.dtype must equal the layer's parameters' ({weight.dtype}) outside "
                    f"torch.autocast, got {x.dtype}"
                )
            if x.dtype != weight.dtype and torch.float64 in (x.dtype, weight.dtype):
                # (autocast leaves float64 alone: the projection raised torch's dtype mismatch)
                raise TypeError(
                    f"x.dtype must equal the layer's parameters' ({weight.dtype}) where either "
                    f"is float64 (torch.autocast does not cast float64), got {x.dtype}"
                )
        if cache is None:
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (new_cache()), got {type(cache).__name__}")
        if not self.attention.config.causal:
            raise ValueError("a KV cache (incremental decoding) needs causal=True")
        if torch._C._current_graph_task_id() != -1:
            # a call run again by a backward (activation checkpointing's recompute) appended to
            # the cache again and decoded at its later length: other gradients, silently
            raise ValueError(
                "cache: a call with a KV cache cannot run inside a backward (activation "
                "checkpointing recomputes its forward there, after the cache moved on; or a "
                "backward hook): checkpoint the calls without a cache, or call it outside"
            )
        self._check_one_device()
        cache.check()
        k = cache.k
        want = (x.shape[0], self.num_kv_heads, self.head_dim)
        dims = (k.shape[0], k.shape[2], k.shape[3])
        if dims != want:
            raise ValueError(f"cache must be (batch, kv heads, head dim) = {want}, got {dims}")
        if cache.k.device != x.device:
            raise ValueError(f"cache must be on x's device {x.device}, got {cache.k.device}")
        cache.check_room(x.shape[1])

    def forward(self, x: BNE, cache: KVCache | None = None) -> BNE:
        """The layer's output ``[b, n, embed_dim]``: dilated attention over the whole of ``x``.
        With a ``cache`` (a causal layer on one device, :meth:`new_cache`), ``x`` continues the
        cached sequence and its keys and values are appended to it."""
        if cache is not None:
            return self._decoding_forward(x, cache)
        return self._forward(x, None)

    @eager_decoding
    def _decoding_forward(self, x: Tensor, cache: KVCache) -> Tensor:
        return self._forward(x, cache)

    def _forward(self, x: Tensor, cache: KVCache | None) -> Tensor:
        try:
            self.check_call(x, cache)
            start = 0 if cache is None else cache.length
            q, k, v = self._heads(x, start)
        except Exception as exc:  # on every rank, where sequence-parallel (any error: a
            # (a rank left alone here hangs the others)
            self.attention.refuse_across_ranks(exc, distributed.device_of(x))
        if cache is None:
            return self._output(self._attended(q, k, v))
        try:
            if start == 0:  # prefill: stored once the attention has taken the call
                attended = self._attended(q, k, v)
                cache.append(k, v)
                return self._output(attended)
            cache.append(k, v)
            config = self.attention.config
            scale = config.scale_for(self.head_dim)
            steps = [
                decode_unchecked(q[:, i], cache, start + i, config, scale)
                for i in range(x.shape[1])
            ]
            return self._output(torch.stack(steps, dim=1))
        except BaseException:
            # interrupted (a notebook's stop, out of memory, a hook that raised) after the
            # append: the next call read this one's tokens as its past, silently. The cache as
            # before the call, to retry it
            cache.length = start
            raise

    def _attended(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The dilated attention of the call's rows, K and V repeated to every query head."""
        group = self.num_heads // self.num_kv_heads
        k_full, v_full = (t.repeat_interleave(group, dim=2) if group > 1 else t for t in (k, v))
        attended: Tensor = self.attention(q, k_full, v_full)
        return attended

    def _check_one_device(self) -> None:
        if self.attention.communicator.distributed:
            # each rank would cache its own shard and decode against it: wrong tokens, silently
            raise ValueError(
                "a KV cache (incremental decoding) runs on one device, not with "
                f"communicator={self.attention.strategy.communicator!r}: decode with a "
                "communicator='local' layer holding the same weights (load_state_dict)"
            )

    def new_cache(
        self,
        batch: int,
        capacity: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
    ) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens (the K/V
        projections' dtype and device unless given); not for a sequence-parallel layer."""
        self._check_one_device()
        weight = self._reference_weight(self.k_proj)
        if weight is None and (dtype is None or device is None):
            raise ValueError(
                "the layer has no floating projection weight or Sub-LN weight to take the "
                "cache's dtype and device from: pass dtype= and device="
            )
        return KVCache.empty(
            batch,
            capacity,
            self.num_kv_heads,
            self.head_dim,
            dtype if dtype is not None else cast(Tensor, weight).dtype,
            # (not `device or ...`: device=0, CUDA's first, fell back to the weights' device)
            device if device is not None else cast(Tensor, weight).device,
        )

    def _reference_weight(self, projection: nn.Module) -> Tensor | None:
        """What a call's ``x`` and a new cache are held to (dtype and device): ``projection``'s
        weight where it is a floating tensor (``nn.Linear``'s), else the Sub-LN norm's, which
        is in the activations' dtype; None where neither is (no check then). A LoRA-style
        wrapper, or a dynamically quantized Linear whose ``weight`` is a method, failed every
        call with an AttributeError; the wrapper's own first parameter (a float32 adapter
        beside bf16 activations, a float64 gain) refused good inputs."""
        for weight in (getattr(projection, "weight", None), getattr(self.norm, "weight", None)):
            if isinstance(weight, Tensor) and weight.is_floating_point():
                return weight
        return None
