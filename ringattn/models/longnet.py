"""A decoder-only LongNet language model whose attention is ``MultiheadDilatedAttention``.

Pre-norm blocks (``x + attn(ln(x))``, ``x + mlp(ln(x))``) with rotary positions, Sub-LN in the
attention, a tied output head. ``generate`` decodes with per-layer KV caches: the prompt is
prefilled with the full (compiled, if asked) dilated attention, then each new token costs what its
dilation pattern reads (``ringattn.nn.decode``), independent of how long the context already is.
``attention=`` swaps the attention layer (the long-range demo uses it for its baselines).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ringattn.api import DilatedAttention, FixedAtConstruction
from ringattn.capture import compiling
from ringattn.config import checked_int
from ringattn.nn.attention import MultiheadDilatedAttention
from ringattn.nn.decode import KVCache, eager_decoding
from ringattn.strategy import Strategy


@dataclass(frozen=True)
class LongNetConfig:
    """A :class:`LongNet`'s sizes and options (frozen: a model keeps it as ``model.config``).

    ``vocab_size`` token ids; ``dim`` the model width; ``depth`` blocks; ``num_heads`` and
    ``num_kv_heads`` (None: ``num_heads``) as :class:`~ringattn.nn.MultiheadDilatedAttention`
    takes them; ``segment_lengths``, ``dilation_rates``, ``mixing``, ``strategy``,
    ``compile``, ``layout`` and ``group`` each attention layer's (causal, with rotary
    positions and Sub-LN, :func:`dilated_attention_layer`); ``mlp_ratio`` the MLP's hidden
    width over ``dim``; ``dropout`` on each attention layer's and each MLP's output.
    """

    vocab_size: int = 256
    dim: int = 128
    depth: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    segment_lengths: tuple[int, ...] = (64, 128, 256)
    dilation_rates: tuple[int, ...] = (1, 2, 4)
    mixing: str = "lse"
    mlp_ratio: int = 4
    dropout: float = 0.0
    strategy: Strategy = field(default_factory=Strategy)
    compile: bool = False
    # sequence-parallel shard layout (ringattn.distributed.LAYOUTS); tokens sharded the same way
    layout: str = "contiguous"
    # sequence-parallel process group (or 1-D DeviceMesh); None: the world. Data parallel x
    # sequence parallel: each data-parallel replica's ranks as one group
    group: Any = None

    def __deepcopy__(self, memo: dict[int, object]) -> LongNetConfig:
        """Itself (frozen, so a copy is the same config): its ``group``, a process group, cannot
        be copied, and ``copy.deepcopy`` of a LongNet over one (an EMA model,
        ``torch.optim.swa_utils.AveragedModel``) raised "cannot pickle 'ProcessGroup' object"."""
        return self

    def __post_init__(self) -> None:
        """The sizes the model's own layers take (the attention's options are checked by its
        layer): a config with ``vocab_size=0`` built a model whose every call then failed."""
        for name in ("vocab_size", "dim", "depth", "num_heads", "mlp_ratio"):
            checked_int(f"LongNetConfig.{name}", getattr(self, name))


# nn.Embedding's index dtypes
_TOKEN_DTYPES = (torch.int64, torch.int32)


def _check_ids(name: str, ids: object, dims: int | None = None) -> None:
    """A ``TypeError`` naming ``name`` unless ``ids`` is a tensor of token ids (an index dtype;
    ``dims`` dimensions where given): the tokens' check and the targets'."""
    if isinstance(ids, Tensor) and ids.dtype in _TOKEN_DTYPES and dims in (None, ids.dim()):
        return
    got = repr(ids.dtype) if isinstance(ids, Tensor) else type(ids).__name__
    shape = f" of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) and dims else ""
    layout = "[b, n] " if dims == 2 else ""
    raise TypeError(f"{name} must be an integer (int64 or int32) {layout}tensor, got {got}{shape}")


def _stored_weight(module: nn.Module) -> tuple[nn.Module, str] | None:
    """Where ``module``'s weight Parameter is held: ``module.weight``, or where a
    parametrization (``torch.nn.utils.parametrize``: a LoRA, ``orthogonal``) computes the
    weight, its one stored ``original``; None where it is stored as several (``weight_norm``'s
    magnitude and direction): no one Parameter to share."""
    if not parametrize.is_parametrized(module, "weight"):
        return module, "weight"
    stored = cast(nn.ModuleDict, module.parametrizations)["weight"]
    return (stored, "original") if getattr(stored, "is_tensor", False) else None


def _tie(model: LongNet, _incompatible_keys: object = None) -> None:
    """The head shares the embedding's weight Parameter (also a load_state_dict post-hook).
    Where a parametrization computes either weight, the Parameter shared is the one it stores
    (``register_parametrization`` keeps the tied one): assigning its computed weight raised a
    TypeError or KeyError in every ``.to()``, ``.half()`` and ``load_state_dict`` of the model."""
    head, embed = _stored_weight(model.head), _stored_weight(model.embed)
    if head is not None and embed is not None:
        setattr(*head, getattr(*embed))


# the targets' rule, as the eager check and the compiled one (check_target_ids) state it
_TARGETS_RULE = "targets must be ids in [0, vocab_size={}) or -100 (ignored)"


@torch.library.custom_op("ringattn::check_target_ids", mutates_args=())
def check_target_ids(out_of_range: Tensor, vocab_size: int) -> Tensor:
    """A compiled ``LongNet.loss``'s target check: the ``ValueError`` of an eager call where
    ``out_of_range`` (a count of targets, float64) is not 0, else a float64 zero for the loss to
    add (used, so no pass removes the check). An op of its own, which Inductor calls and does
    not compile: ``torch._assert_async`` in Inductor's code threw inside an OpenMP loop, which
    aborted the process (a notebook's kernel died)."""
    count = int(out_of_range)
    if count:
        raise ValueError(
            f"{_TARGETS_RULE.format(vocab_size)}, got {count} others (on this rank or another "
            "of its group)"
        )
    return out_of_range.new_zeros(())


@check_target_ids.register_fake
def _(out_of_range: Tensor, vocab_size: int) -> Tensor:
    return out_of_range.new_empty(())


class Block(nn.Module):
    def __init__(self, config: LongNetConfig, attention: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = attention
        self.ln2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.mlp_ratio * config.dim),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.dim, config.dim),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache) if cache is not None else x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


def dilated_attention_layer(config: LongNetConfig) -> nn.Module:
    """:class:`LongNet`'s default attention layer: a causal
    :class:`~ringattn.nn.MultiheadDilatedAttention` with rotary positions and Sub-LN, of the
    config's heads, lengths, rates, mixing, dropout, strategy, compile, layout and group."""
    return MultiheadDilatedAttention(
        config.dim,
        config.num_heads,
        config.segment_lengths,
        config.dilation_rates,
        num_kv_heads=config.num_kv_heads,
        causal=True,
        mixing=config.mixing,
        dropout=config.dropout,
        rotary_embedding=True,
        strategy=config.strategy,
        compile=config.compile,
        layout=config.layout,
        group=config.group,
    )


class LongNet(FixedAtConstruction, nn.Module):
    """A decoder-only LongNet: token embedding, ``config.depth`` pre-LN blocks (dilated
    attention built by ``attention(config)``, default :func:`dilated_attention_layer`, then an
    MLP), a final LayerNorm and a head tied to the embedding. ``forward(tokens)`` gives logits
    ``[b, n, vocab_size]``; ``loss`` their cross-entropy; ``new_caches`` / ``generate`` decode
    incrementally on one device. Sequence-parallel when ``config.strategy`` has a
    sequence-parallel communicator: each rank passes its shard of the tokens
    (``ringattn.distributed.shard`` with ``config.layout``)."""

    def __init__(
        self,
        config: LongNetConfig,
        attention: Callable[[LongNetConfig], nn.Module] = dilated_attention_layer,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, attention(config)) for _ in range(config.depth))
        self.ln_f = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        _tie(self)
        self.apply(self._init)
        # load_state_dict(assign=True) (a model built on meta, then loaded) assigns the head and
        # the embedding two Parameters: separate optimizer state, weight decay twice
        self.register_load_state_dict_post_hook(_tie)  # type: ignore[no-untyped-call]
        self._built = True

    # the config its layers were built from: assigned later, a new one changed only the token-id
    # checks' vocab_size (`model.config = replace(model.config, dropout=0.0)` left every layer's
    # dropout on, silently)
    FIXED = ("config",)
    FIXED_BECAUSE = "its layers were built from it"

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LongNet:
        # to_empty (a model built on the meta device), and other conversions that replace
        # parameters, gave the head its own copy of the embedding; the tie is restored after
        out: LongNet = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        _tie(self)
        return out

    def init_weights(self) -> None:
        """(Re)initialise every parameter as ``LongNet(config)`` does (under the same RNG state,
        the same values; DTensor parameters, FSDP2's, draw from DTensor's generator): for a
        model built under ``torch.device("meta")`` and materialised with ``to_empty``, whose
        tensors hold uninitialised memory. (The model's own init only set the linear and
        embedding weights, leaving every LayerNorm uninitialised, and the modules'
        ``reset_parameters`` gave the tied embedding another scale: a different model, silently.)
        """
        with torch.no_grad():
            for module in self.modules():  # (construction's order: the same draws)
                reset = getattr(module, "reset_parameters", None)
                if module is not self and callable(reset):
                    reset()
            self.apply(self._init)
        _tie(self)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Logits ``[b, n, vocab]``; with ``caches``, ``tokens`` continue the cached sequence."""
        if caches is not None:
            return self._decoding_forward(tokens, caches)
        return self._forward(tokens, None)

    @eager_decoding
    def _decoding_forward(self, tokens: Tensor, caches: list[KVCache]) -> Tensor:
        return self._forward(tokens, caches)

    def _forward(self, tokens: Tensor, caches: list[KVCache] | None) -> Tensor:
        try:
            x = self._embedded(tokens, caches)
        except Exception as exc:  # any error: a rank left alone here hangs the others
            self._raise_on_every_rank(exc)
        if caches is None:
            for block in self.blocks:
                x = block(x)
            logits: Tensor = self.head(self.ln_f(x))
            return logits
        lengths = [cache.length for cache in caches]
        try:
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache)
            logits = self.head(self.ln_f(x))
            return logits
        except BaseException:
            # A call stopped between layers or in the head (a notebook's interrupt, out of
            # memory in the logits, a hook that raised) left the caches ahead, the first layers'
            # of the others', and the next call decoded at other positions, silently: all or
            # none move
            for cache, length in zip(caches, lengths):
                cache.length = length
            raise

    def _embedded(self, tokens: Tensor, caches: list[KVCache] | None) -> Tensor:
        """The tokens' embeddings, after the call's checks (every layer's cache checked before
        the first one moves)."""
        _check_ids("tokens", tokens, dims=2)
        if tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be [b >= 1, n >= 1], got {tuple(tokens.shape)}")
        weight = self.embed.weight
        if tokens.device != weight.device:  # (meta tokens embedded as zeros, silently)
            raise ValueError(
                f"tokens must be on the model's device ({weight.device}), got {tokens.device}"
            )
        try:
            x: Tensor = self.embed(tokens)
        except IndexError as exc:  # (on the CPU; CUDA's embedding asserts on the device)
            raise ValueError(
                f"tokens must be ids in [0, vocab_size={self.config.vocab_size}), got ids from "
                f"{int(tokens.min())} to {int(tokens.max())}"
            ) from exc
        if caches is not None:
            if not isinstance(caches, (list, tuple)) or len(caches) != len(self.blocks):
                count = len(caches) if isinstance(caches, (list, tuple)) else type(caches).__name__
                raise ValueError(
                    f"caches must be a list of {len(self.blocks)} KVCache (new_caches()), one "
                    f"per layer, got {count}"
                )
            if len({id(cache) for cache in caches}) != len(caches):
                # ([cache] * depth: layer 0's prefill moved the shared length, and layer 1 read
                # the same tokens as a continuation, silently)
                raise ValueError(
                    "caches must be distinct KVCache objects, one per layer (new_caches()), got "
                    "the same cache for several layers"
                )
            for block, cache in zip(self.blocks, caches):
                check = getattr(block.attn, "check_call", None)
                if check is not None:
                    check(x, cache)
            lengths = [cache.length for cache in caches]
            if len(set(lengths)) > 1:
                raise ValueError(
                    "caches must hold the same number of positions, each layer's cache filled "
                    f"by the same calls, got lengths {lengths} (start again from new_caches())"
                )
        return x

    def _raise_on_every_rank(self, exc: Exception) -> NoReturn:
        """Raise ``exc``, a rank-local error before the layers; where they are
        sequence-parallel, the other ranks raise too (instead of waiting in the ring)."""
        attention = self._sequence_parallel_attention()
        if attention is None:
            raise exc
        attention.refuse_across_ranks(exc, self.embed.weight.device)

    def _sequence_parallel_attention(self) -> DilatedAttention | None:
        """The first sequence-parallel attention module of the layers (None: not one)."""
        for module in self.modules():
            if isinstance(module, DilatedAttention) and module.communicator.distributed:
                return module
        return None

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of the logits for ``tokens`` against ``targets`` ``[b, n]``
        (positions with target ``-100`` are ignored).

        Sequence-parallel (each rank passes its shards of tokens and targets): every rank
        returns the mean over the whole sequence's scored targets, the same value everywhere
        (so a guard such as ``if loss.isfinite()`` takes the same branch on every rank), and
        its gradient is ``p`` times its shard's share of that mean. So the mean of the ranks'
        parameter gradients over the group (what DDP over it computes) is the whole sequence's
        gradient, whatever each shard holds; their sum is ``p`` times it. With data-parallel
        replicas too, the mean over every rank of every replica (DDP over them all, not over
        ``mesh["dp"]`` alone: docs/semantics.md, "Parameter gradients under data
        parallelism"). (A mean over each shard alone weighted a shard with few scored targets
        as much as a full one, and was NaN on a shard with none.)

        Targets out of range raise a ``ValueError`` before any work; compiled
        (``torch.compile(model.loss, fullgraph=True)`` on the CPU), from the graph after the
        logits, on every rank of a sequence-parallel group. On a GPU CUDA's own device assert
        reports them, as for tokens."""
        try:
            _check_ids("targets", targets)
            if isinstance(tokens, Tensor) and targets.shape != tokens.shape:
                raise ValueError(
                    f"targets must have the tokens' shape {tuple(tokens.shape)}, got "
                    f"{tuple(targets.shape)}"
                )
            if isinstance(tokens, Tensor) and targets.device != tokens.device:
                raise ValueError(
                    f"targets must be on the tokens' device ({tokens.device}), got {targets.device}"
                )
            # (cross_entropy raised IndexError after the whole forward, and a sequence-parallel
            # rank left alone there hung the others in the backward; on a GPU it asserts on
            # the device, as the embedding does for tokens: checked here, it would cost a sync)
            if targets.device.type == "cpu" and not compiling():
                self._check_target_ids(targets)
        except Exception as exc:  # (a rank left alone here hangs the others in the ring)
            self._raise_on_every_rank(exc)
        logits = self(tokens)
        targets = targets.flatten().long()
        out_of_range = None
        if targets.device.type == "cpu" and compiling():
            # A trace cannot branch on the ids (torch.compile(model.loss, fullgraph=True) failed
            # on the check above): ids out of range are counted and kept out of cross_entropy's
            # way, and the count raises once every rank has it (after the all-reduce below), so
            # a bad shard raises on every rank instead of leaving the others in the reduce.
            bad = (targets != -100) & ((targets < 0) | (targets >= self.config.vocab_size))
            targets = targets.masked_fill(bad, -100)
            out_of_range = bad.sum().double()
        attention = self._sequence_parallel_attention()
        if attention is None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100)
            if out_of_range is None:
                return loss
            checked: Tensor = loss + check_target_ids(out_of_range, self.config.vocab_size).to(
                loss.dtype
            )
            return checked
        summed = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100, reduction="sum")
        # float64: the count is exact beyond float32's 2**24 targets
        counts = [summed.detach().double(), (targets != -100).sum().double()]
        totals = torch.stack(counts if out_of_range is None else [*counts, out_of_range])
        group = attention.communicator.group
        dist.all_reduce(totals, group=group)
        if out_of_range is not None:
            summed = summed + check_target_ids(totals[2], self.config.vocab_size).to(summed.dtype)
        whole_sum, scored = totals[:2].to(summed.dtype).unbind()
        share = dist.get_world_size(group) * summed
        # the value is the whole mean; the gradient is share's (the detached rest adds none)
        return (share + (whole_sum - share).detach()) / scored

    def _check_target_ids(self, targets: Tensor) -> None:
        """A ``ValueError`` naming the range unless every target is an id or ``-100``."""
        scored = targets[targets != -100]
        vocab = self.config.vocab_size
        if scored.numel() and not 0 <= scored.min() <= scored.max() < vocab:
            raise ValueError(
                f"{_TARGETS_RULE.format(vocab)}, got ids from {int(scored.min())} to "
                f"{int(scored.max())}"
            )

    def new_caches(self, batch: int, capacity: int) -> list[KVCache]:
        """One empty KV cache per layer, for ``forward(tokens, caches)``."""
        # (an attention layer that keeps a cache: ringattn.nn's; nn.Module does not type it)
        return [cast(Any, block).attn.new_cache(batch, capacity) for block in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Greedy (``temperature=0``) or sampled (softmax of the logits over ``temperature``,
        drawn with ``generator``) continuation of ``prompt: [b, n0]``: returns
        ``[b, n0 + max_new_tokens]``, the prompt followed by the new tokens. Runs under
        ``torch.no_grad()``, with one KV cache per layer (:meth:`new_caches`), on one device."""
        checked_int("max_new_tokens", max_new_tokens, minimum=0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {temperature!r}")
        if not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if not isinstance(prompt, Tensor) or prompt.dim() != 2 or min(prompt.shape) < 1:
            # (b = 0 was refused by new_caches, as "batch must be >= 1", an argument not passed)
            got = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
            raise ValueError(f"prompt must be a [b >= 1, n0 >= 1] tensor of token ids, got {got}")
        # (a float prompt was reported by the model's call, as "tokens")
        _check_ids("prompt", prompt, dims=2)
        weight = self.embed.weight
        if prompt.device != weight.device:
            raise ValueError(
                f"prompt must be on the model's device ({weight.device}), got {prompt.device}"
            )
        vocab = self.config.vocab_size
        # (one sync, once per generation: reported by the model's call, the ids were "tokens")
        low, high = (int(x) for x in torch.aminmax(prompt))
        if not 0 <= low <= high < vocab:
            raise ValueError(
                f"prompt must be ids in [0, vocab_size={vocab}), got ids from {low} to {high}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            # (checked by the first sampled token, after the prompt's forward)
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        caches = self.new_caches(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        # decoding runs eagerly (eager_decoding): self.forward, not self(), so that a model
        # compiled in place (model.compile(fullgraph=True)) does not trace into it and fail
        decode = self.forward
        logits = decode(prompt, caches)[:, -1]
        out = [prompt]
        for step in range(max_new_tokens):
            if temperature > 0:
                # (the largest logit subtracted first: logits / 1e-40 overflowed to inf and the
                # softmax was NaN; this way a tiny temperature is greedy, as its limit is)
                top = logits.amax(-1, keepdim=True)
                probs = torch.softmax((logits - top) / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = decode(token, caches)[:, -1]
        return torch.cat(out, dim=1)
