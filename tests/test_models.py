"""Model-level pieces: MultiheadDilatedAttention (GQA, Sub-LN), KV-cache decoding, LongNet LM."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from ringattn import reference
from ringattn.models import LongNet, LongNetConfig
from ringattn.nn import KVCache, MultiheadDilatedAttention, decode_one, rotary

MATH = ringattn.Strategy(computer="math")


def test_layer_shapes_and_gradients():
    layer = MultiheadDilatedAttention(
        32,
        4,
        (8, 16),
        (1, 2),
        num_kv_heads=2,
        causal=True,
        rotary_embedding=True,
        compile=False,
    )
    x = torch.randn(2, 24, 32, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 6])
def test_grouped_query_attention_matches_the_extended_oracle(mixing, num_kv_heads):
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(
        48,
        6,
        (4, 8, 16),
        (1, 2, 4),
        num_kv_heads=num_kv_heads,
        causal=True,
        mixing=mixing,
        sub_layer_norm=False,
        strategy=MATH,
        compile=False,
    ).double()
    x = torch.randn(2, 19, 48, dtype=torch.float64)
    q = rearrange(layer.q_proj(x), "b n (h d) -> b n h d", h=6)
    k = rearrange(layer.k_proj(x), "b n (h d) -> b n h d", h=num_kv_heads)
    v = rearrange(layer.v_proj(x), "b n (h d) -> b n h d", h=num_kv_heads)
    attn = reference.dilated_attention(
        q, k, v, segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), causal=True, mixing=mixing
    )
    expected = layer.out_proj(rearrange(attn, "b n h d -> b n (h d)"))
    assert rel_err(layer(x), expected) < 1e-12


def test_gqa_oracle_is_the_oracle_on_repeated_heads():
    q = torch.randn(1, 12, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 12, 2, 8, dtype=torch.float64)
    opts = {"segment_lengths": (4, 12), "dilation_rates": (1, 2), "causal": True}
    grouped = reference.dilated_attention(q, k, v, **opts)
    repeated = reference.dilated_attention(
        q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), **opts
    )
    assert torch.equal(grouped, repeated)
    assert (
        grouped - reference.dilated_attention_by_multiplicity(q, k, v, **opts)
    ).abs().max() < 1e-12
    with pytest.raises(ValueError, match="must divide the query heads"):
        reference.dilated_attention(
            q, k[:, :, :1].expand(1, 12, 3, 8), v[:, :, :1].expand(1, 12, 3, 8), **opts
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 5}, "must divide embed_dim"),
        ({"num_kv_heads": 3}, "must divide num_heads"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": float("nan")}, "dropout"),  # (torch's Dropout takes it)
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),  # (torch's takes 1: all zeros)
        ({"num_heads": 8, "embed_dim": 24, "rotary_embedding": True}, "even head dim"),
    ],
)
def test_layer_bad_arguments(kwargs, match):
    args = {
        "embed_dim": 32,
        "num_heads": 4,
        "segment_lengths": (8,),
        "dilation_rates": (1,),
        "compile": False,
    }
    with pytest.raises(ValueError, match=match):
        MultiheadDilatedAttention(**{**args, **kwargs})


@pytest.mark.parametrize("name", ["embed_dim", "num_heads", "num_kv_heads"])
def test_layer_refuses_a_bool_for_a_size(name):
    """beartype takes a bool for an int: num_heads=True built a one-head layer."""
    args = {"embed_dim": 32, "num_heads": 4, "segment_lengths": (8,), "dilation_rates": (1,)}
    with pytest.raises(TypeError, match=f"{name} must be an int, got bool True"):
        MultiheadDilatedAttention(**{**args, name: True})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"vocab_size": 0}, ValueError, "vocab_size must be >= 1, got 0"),
        ({"depth": 2.0}, TypeError, "depth must be an int"),
        ({"num_heads": True}, TypeError, "num_heads must be an int"),
        ({"mlp_ratio": 0}, ValueError, "mlp_ratio must be >= 1"),
        ({"dim": 0}, ValueError, "LongNetConfig.dim must be >= 1, got 0"),
    ],
)
def test_model_config_bad_sizes(kwargs, error, match):
    """Named when the config is made (vocab_size=0 built a model whose every call failed)."""
    with pytest.raises(error, match=match):
        LongNetConfig(**kwargs)


def _layer(causal: bool) -> MultiheadDilatedAttention:
    return MultiheadDilatedAttention(
        16, 4, (4,), (1,), num_kv_heads=2, causal=causal, compile=False, strategy=MATH
    )


@pytest.mark.parametrize(
    "causal, call, error, match",
    [
        (True, lambda layer, cache: layer(torch.randn(1, 8, 12)), ValueError, "embed_dim=16"),
        (True, lambda layer, cache: layer(torch.randn(8, 16)), TypeError, r"\[b, n, embed_dim\]"),
        (True, lambda layer, cache: layer(torch.randn(1, 8, 16).long()), TypeError, "floating"),
        (True, lambda layer, cache: layer(torch.randn(0, 8, 16)), ValueError, "b >= 1"),
        # (before the layer's own check: the attention's message, naming q, k, v)
        (
            True,
            lambda layer, cache: layer(torch.randn(1, 0, 16)),
            ValueError,
            r"x must be \[b >= 1, n >= 1",
        ),
        # before: F.linear's "mat1 and mat2 must have the same dtype"
        (
            True,
            lambda layer, cache: layer(torch.randn(1, 8, 16).double()),
            TypeError,
            "x.dtype must",
        ),
        (
            False,
            lambda layer, cache: layer(torch.randn(1, 4, 16), cache),
            ValueError,
            "needs causal=True",
        ),
        # (a cache's tensors without the object: named, not an AttributeError from inside)
        (
            True,
            lambda layer, cache: layer(torch.randn(1, 4, 16), (cache.k, cache.v)),
            TypeError,
            r"cache must be a KVCache \(new_cache\(\)\), got tuple",
        ),
        (
            True,
            lambda layer, cache: layer(torch.randn(2, 4, 16), cache),
            ValueError,
            r"\(batch, kv heads, head dim\) = \(2, 2, 4\)",
        ),
        # (a cache of other kv heads or head dim: torch's errors from the append or the decode)
        (
            True,
            lambda layer, cache: layer(
                torch.randn(1, 4, 16), KVCache.empty(1, 8, 4, 4, torch.float32, "cpu")
            ),
            ValueError,
            r"\(batch, kv heads, head dim\) = \(1, 2, 4\), got \(1, 4, 4\)",
        ),
        (
            True,
            lambda layer, cache: layer(
                torch.randn(1, 4, 16), KVCache.empty(1, 8, 2, 8, torch.float32, "cpu")
            ),
            ValueError,
            r"\(batch, kv heads, head dim\) = \(1, 2, 4\), got \(1, 2, 8\)",
        ),
        (
            True,
            lambda layer, cache: layer(
                torch.randn(1, 4, 16), KVCache.empty(1, 8, 2, 4, torch.float32, "meta")
            ),
            ValueError,
            "cache must be on x's device cpu, got meta",
        ),
        (
            True,
            lambda layer, cache: layer(torch.randn(1, 9, 16), cache),
            ValueError,
            "capacity 8 exceeded",
        ),
    ],
)
def test_layer_bad_calls_raise_before_any_work(causal, call, error, match):
    """Every bad call names its rule, and the cache it was given is left as it was (before, a
    non-causal prefill filled it and raised on the next step, and a short batch raised from
    inside expand)."""
    layer = _layer(causal)
    cache = layer.new_cache(1, 8)
    with pytest.raises(error, match=match):
        call(layer, cache)
    assert cache.length == 0 and not cache.k.any() and not cache.v.any()


def test_an_empty_continuation_is_named():
    """``n = 0`` after a prefill: torch's "stack expects a non-empty TensorList" from the decode
    loop before the layer's check."""
    layer = _layer(causal=True)
    cache = layer.new_cache(1, 8)
    layer(torch.randn(1, 3, 16), cache)
    with pytest.raises(ValueError, match=r"x must be \[b >= 1, n >= 1"):
        layer(torch.randn(1, 0, 16), cache)
    assert cache.length == 3


def test_a_refused_prefill_leaves_the_cache_as_it_was():
    """The attention refuses the call (flex has no CPU backward; the weights need grad): the
    cache is not filled. Before, the prefill was appended first, and the retry under no_grad
    decoded against a cache holding the prompt twice (0.33 off, no error)."""
    layer = MultiheadDilatedAttention(
        16, 4, (4,), (1,), causal=True, strategy=ringattn.Strategy(computer="flex")
    )
    cache = layer.new_cache(1, 8)
    with pytest.raises(ValueError, match="no backward on CPU"):
        layer(torch.randn(1, 6, 16), cache)
    assert cache.length == 0 and not cache.k.any()


def test_a_detached_cache_trains_chunk_by_chunk():
    """Truncated backpropagation over chunks: filled with gradients on, the cache carried the
    first chunk's graph, so the second chunk's backward raised torch's "backward through the
    graph a second time". After ``detach_()`` it runs, the cache keeps its rows, and the second
    chunk's gradient is that of a full forward whose first chunk's K and V are constants."""
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(16, 2, (4, 8), (1, 2), causal=True, rotary_embedding=True)
    x = torch.randn(1, 12, 16)
    cache = layer.new_cache(1, 16)
    layer(x[:, :8], cache).sum().backward()
    assert cache.k.requires_grad
    kept = cache.k.clone()
    assert cache.detach_() is cache and not cache.k.requires_grad
    assert torch.equal(cache.k, kept)
    layer.zero_grad()
    second = x[:, 8:].clone().requires_grad_()
    layer(second, cache).square().sum().backward()
    (grad,) = torch.autograd.grad(
        layer(torch.cat([x[:, :8], second], dim=1))[:, 8:].square().sum(), second
    )
    assert second.grad is not None and torch.allclose(second.grad, grad, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("prefill", [False, True])
def test_a_cached_call_recomputed_by_checkpointing_is_refused(reentrant, prefill):
    """Activation checkpointing runs a call again inside the backward, after the cache moved
    on: the recompute decoded at the cache's later length and appended again. Non-reentrant,
    a decode step's gradient came out 0.87 off (of 4.85) with no error; now the recompute
    raises the ValueError naming the cache, and the cache holds what the forwards stored."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(16, 2, (4,), (1,), causal=True, rotary_embedding=True)
    x = torch.randn(1, 10, 16, requires_grad=True)
    cache = layer.new_cache(1, 16)
    chunks = [x[:, :8], x[:, 8:9], x[:, 9:10]]
    target = 0 if prefill else 1
    outs = [
        checkpoint(lambda part: layer(part, cache), part, use_reentrant=reentrant)
        if i == target
        else layer(part, cache)
        for i, part in enumerate(chunks)
    ]
    assert cache.length == 10
    with pytest.raises(ValueError, match="cache: a call with a KV cache cannot run inside a back"):
        torch.cat(outs, dim=1).square().sum().backward()
    assert cache.length == 10
    with torch.no_grad():  # (and decoding goes on where the forwards left it)
        step = layer(x[:, :1].detach(), cache)
        full = layer(torch.cat([x[:, :10], x[:, :1]], dim=1).detach())[:, 10:]
    assert torch.allclose(step, full, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_cached_call_under_no_grad_recomputed_by_checkpointing_is_refused(reentrant):
    """A checkpointed function that decodes under its own ``torch.no_grad()`` (sampling while
    training) has that call recomputed with grad disabled too, inside the backward: a refusal
    only with grad enabled (tried, reverted) let the recompute append to the cache a second
    time, silently. So every cached call inside a backward is refused, a backward hook's too."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(16, 2, (4,), (1,), causal=True)
    linear = torch.nn.Linear(16, 16)
    prompt = torch.randn(1, 2, 16)
    cache = layer.new_cache(1, 16)

    def step(x):
        y = linear(x).relu()
        with torch.no_grad():
            layer(prompt[:, :1], cache)
        return linear(y)

    out = checkpoint(step, torch.randn(1, 4, 16, requires_grad=True), use_reentrant=reentrant)
    assert cache.length == 1
    with pytest.raises(ValueError, match="cache: a call with a KV cache cannot run inside"):
        out.sum().backward()
    assert cache.length == 1


def test_the_model_checks_every_cache_before_any_layer_moves():
    model = tiny_model("lse", (4,), (1,))
    tokens = torch.zeros(1, 5, dtype=torch.long)
    caches = model.new_caches(1, 8)
    caches[1] = model.blocks[1].attn.new_cache(2, 8)  # wrong batch
    with pytest.raises(ValueError, match="batch, kv heads, head dim"):
        model(tokens, caches)
    with pytest.raises(ValueError, match="caches must be a list of 2"):
        model(tokens, caches[:1])
    assert caches[0].length == 0 and not caches[0].k.any()


def test_a_cache_too_small_for_the_call_is_refused_before_any_layer_moves():
    """The layer's call checks its cache has room (``check_call``), so the model's check of
    every cache refuses a call a later layer's cache cannot take. Left to the layer's append,
    layer 0 had taken the tokens into its cache before layer 1's raised: the caches disagreed
    on the sequence, and a retry with a larger cache for layer 1 read layer 0's prompt twice."""
    model = tiny_model("lse", (4,), (1,))
    tokens = torch.zeros(1, 6, dtype=torch.long)
    caches = model.new_caches(1, 8)
    caches[1] = model.blocks[1].attn.new_cache(1, 4)  # room for 4 of the 6
    with pytest.raises(ValueError, match="capacity 4 exceeded"):
        model(tokens, caches)
    assert caches[0].length == 0 and not caches[0].k.any()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, float("nan")),
            ValueError,
            "temperature must be finite",
        ),
        (
            lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, "0.5"),
            TypeError,
            "temperature must be a float",
        ),
        (lambda m: m.generate(torch.zeros(3, dtype=torch.long), 2), ValueError, "prompt must be"),
        (
            lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), 2),
            ValueError,
            "prompt must be",
        ),
        (
            lambda m: m.generate(torch.zeros(0, 3, dtype=torch.long), 2),
            ValueError,
            r"prompt must be a \[b >= 1, n0 >= 1\] tensor of token ids, got \(0, 3\)",
        ),
        (lambda m: m(torch.zeros(1, 3)), TypeError, "tokens must be an integer"),
        (
            lambda m: m(torch.zeros(3, dtype=torch.long)),
            TypeError,
            r"\[b, n\] tensor.*shape \(3,\)",
        ),
        (lambda m: m.new_caches(0, 4), ValueError, "batch must be >= 1, got 0"),
        (lambda m: m.new_caches(2, -1), ValueError, "capacity must be >= 1, got -1"),
        (
            lambda m: m.generate(torch.zeros(1, 3), 2),
            TypeError,
            r"prompt must be an integer \(int64 or int32\) \[b, n\] tensor, got torch.float32",
        ),
        (
            lambda m: m.blocks[0].attn.new_cache(1, 4, dtype=torch.long),
            TypeError,
            "dtype must be a floating torch.dtype, got torch.int64",
        ),
        (
            lambda m: m.blocks[0].attn.new_cache(1, 4, dtype="float32"),
            TypeError,
            "dtype must be a floating torch.dtype, got 'float32'",
        ),
        # (before: meta tokens were embedded as zeros, and their loss was a finite number)
        (
            lambda m: m(torch.zeros(1, 3, dtype=torch.long, device="meta")),
            ValueError,
            r"tokens must be on the model's device \(cpu\), got meta",
        ),
        (
            lambda m: m.loss(
                torch.zeros(1, 3, dtype=torch.long, device="meta"),
                torch.zeros(1, 3, dtype=torch.long),
            ),
            ValueError,
            r"targets must be on the tokens' device \(meta\), got cpu",
        ),
        # (before: an out-of-range prompt was reported as "tokens"; a bad generator was
        # refused by the first sampled token, after the prompt's forward)
        (
            lambda m: m.generate(torch.tensor([[1, 2, 32]]), 2),
            ValueError,
            r"prompt must be ids in \[0, vocab_size=32\), got ids from 1 to 32",
        ),
        (
            lambda m: m.generate(torch.tensor([[1, 2]], device="meta"), 2),
            ValueError,
            r"prompt must be on the model's device \(cpu\), got meta",
        ),
        (
            lambda m: m.generate(torch.tensor([[1, 2]]), 2, temperature=1.0, generator="x"),
            TypeError,
            "generator must be a torch.Generator, got str",
        ),
    ],
)
def test_model_bad_calls(call, error, match):
    """Each named, before any work (before: greedy decoding for a NaN temperature, IndexError,
    embedding and torch errors, an empty cache accepted)."""
    with pytest.raises(error, match=match):
        call(tiny_model("lse", (4,), (1,)))


@pytest.mark.parametrize(
    "steps, error, match",
    [(-3, ValueError, "max_new_tokens must be >= 0"), (2.0, TypeError, "max_new_tokens")],
)
def test_generate_bad_arguments(steps, error, match):
    model = tiny_model("lse", (4,), (1,))
    with pytest.raises(error, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), steps)


def tiny_model(mixing, lengths, rates, strategy=MATH, num_kv_heads=2) -> LongNet:
    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=32,
        dim=32,
        depth=2,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        segment_lengths=lengths,
        dilation_rates=rates,
        mixing=mixing,
        strategy=strategy,
    )
    return LongNet(config).eval()


@settings(max_examples=6)
@given(
    st.sampled_from(["lse", "head_groups"]),
    st.sampled_from([((4,), (1,)), ((4, 8), (2, 4)), ((4, 8, 16), (1, 2, 4)), ((6, 12), (3, 2))]),
    st.integers(1, 8),
    st.integers(1, 4),
)
def test_cache_decoding_equals_full_recompute(mixing, configs, prefill, kv_heads):
    kv_heads = kv_heads if 4 % kv_heads == 0 else 4
    model = tiny_model(mixing, *configs, num_kv_heads=kv_heads).double()
    tokens = torch.randint(0, 32, (2, 23), generator=torch.Generator().manual_seed(prefill))
    full = model(tokens)
    caches = model.new_caches(2, 23)
    steps = [model(tokens[:, :prefill], caches)]
    steps += [model(tokens[:, i : i + 1], caches) for i in range(prefill, 23)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-10


def test_cache_decoding_with_fused_kernels_in_float32():
    model = tiny_model("lse", (4, 8, 16), (1, 2, 4), strategy=ringattn.Strategy(computer="sdpa"))
    tokens = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(0))
    caches = model.new_caches(2, 20)
    incremental = torch.cat(
        [model(tokens[:, :3], caches)]
        + [model(tokens[:, i : i + 1], caches) for i in range(3, 20)],
        1,
    )
    assert rel_err(incremental, model(tokens)) < 1e-5


def test_a_layer_without_floating_weights_takes_its_cache_dtype_as_given():
    """Dynamically quantized projections (``weight`` a method) and no Sub-LN: the layer has no
    floating weight to hold ``x`` to or to take a new cache's dtype and device from. Its calls
    run unchecked against one; ``new_cache`` asks for both, and both the full call and a decode
    through the cache so made compute the float layer's attention to int8 rounding (each call
    quantizes its own activations: 2% apart, where a wrong row or head is O(1) off)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        floating = MultiheadDilatedAttention(
            16, 4, (4, 8), (1, 2), causal=True, compile=False, strategy=MATH, sub_layer_norm=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.ao's deprecation notice)
        layer = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(floating), {torch.nn.Linear}, dtype=torch.qint8
        )
    with pytest.raises(ValueError, match=r"no floating projection weight .* pass dtype= and"):
        layer.new_cache(1, 8)
    cache = layer.new_cache(1, 8, dtype=torch.float32, device="cpu")
    assert (cache.k.dtype, cache.k.device) == (torch.float32, torch.device("cpu"))
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = floating(x)
        steps = [layer(x[:, :3], cache)] + [layer(x[:, i : i + 1], cache) for i in range(3, 8)]
        assert cache.length == 8
        assert rel_err(layer(x), want) < 0.05
        assert rel_err(torch.cat(steps, 1), want) < 0.05


def _decode_args(**changes) -> dict:
    cache = KVCache.empty(1, 16, 2, 8, torch.float32, "cpu")
    cache.length = 5
    args = {"q": torch.randn(1, 4, 8), "cache": cache, "position": 4,
            "configs": ((4, 1), (8, 2)), "mixing": "lse", "scale": 0.5}  # fmt: skip
    return {**args, **changes}


@pytest.mark.parametrize(
    "changes, error, match",
    [
        # (before: computed over the cache's unfilled zeros / all zeros / accepted, silently)
        ({"position": 7}, ValueError, r"position must be < cache.length=5 .*got 7"),
        ({"position": 5}, ValueError, r"position must be < cache.length=5 .*got 5"),
        ({"position": -3}, ValueError, "position must be >= 0, got -3"),
        # (its own argument's name: the messages said dilation_rates / segment_lengths)
        ({"configs": ((4, 3),)}, ValueError, r"^configs\[0\]\[1\]=3 must divide configs\[0\]\[0\]"),
        ({"configs": ()}, ValueError, "^configs must not be empty"),
        ({"configs": ((4, 1), (8.0, 2))}, TypeError, r"^configs\[1\]\[0\] must be an int"),
        ({"scale": -1.0}, ValueError, "scale must be > 0"),
        ({"scale": 0.0}, ValueError, "scale must be > 0"),
        ({"scale": None}, TypeError, "scale must be a float, got None"),
        # (float32 inputs: 0 in their logits, as the layer's prefill refuses it)
        ({"scale": 1e-50}, ValueError, r"scale=1e-50 is 0 in float32, which torch.float32"),
        ({"mixing": "sum"}, ValueError, "mixing must be one of"),
        ({"configs": (4, 1)}, TypeError, r"configs must be a tuple of \(w, r\) pairs"),
        ({"configs": None}, TypeError, r"configs must be a tuple of \(w, r\) pairs, got NoneType"),
        ({"configs": "lse"}, TypeError, r"configs must be a tuple of \(w, r\) pairs, got str"),
        # (before: IndexError / einsum's RuntimeError)
        ({"q": torch.randn(1, 3, 8)}, ValueError, "h a multiple of h_kv"),
        ({"q": torch.randn(1, 4, 6)}, ValueError, "the same b and d"),
        ({"q": torch.randn(4, 8)}, TypeError, r"q must be a floating \[b, h, d\] tensor"),
        ({"cache": None}, TypeError, "cache must be a KVCache, got NoneType"),
        ({"cache": KVCache(torch.zeros(4), torch.zeros(4), 2)}, TypeError,
         r"cache.k and cache.v must be \[b, capacity, h_kv, d\]"),
        # the layer's rules for its cache (before: an integer cache, whose append truncated
        # K/V, was decoded silently; the rest raised torch's IndexError, RuntimeError or
        # ZeroDivisionError from inside the decode)
        ({"cache": KVCache(*torch.zeros(2, 1, 16, 2, 8, dtype=torch.long), 5)}, TypeError,
         "floating tensors of one shape and dtype"),
        ({"cache": KVCache(torch.zeros(1, 16, 2, 8), torch.zeros(1, 3, 2, 8), 5)}, TypeError,
         "one shape and dtype"),
        ({"cache": KVCache(*torch.zeros(2, 1, 4, 2, 8), 9), "position": 7}, ValueError,
         r"cache.length must be an int in \[0, 4\], got 9"),
        ({"cache": KVCache(*torch.zeros(2, 1, 16, 2, 8), 5.5)}, ValueError,
         r"cache.length must be an int in \[0, 16\], got 5.5"),
        ({"cache": KVCache(*torch.zeros(2, 1, 16, 0, 8), 5)}, ValueError, "h a multiple of h_kv"),
        ({"cache": KVCache(*torch.zeros(2, 1, 16, 2, 8), True)}, ValueError,
         r"cache.length must be an int in \[0, 16\], got True"),
        ({"cache": KVCache(torch.zeros(1, 16, 2, 8), torch.zeros(1, 16, 2, 8, device="meta"), 5)},
         ValueError, "cache.v must be on cache.k's device cpu, got meta"),
        # (before: a cache on the meta device decoded as zeros, silently)
        ({"cache": KVCache(*torch.zeros(2, 1, 16, 2, 8, device="meta"), 5)}, ValueError,
         r"q.device must equal the cache's \(meta\), got cpu"),
    ],
)  # fmt: skip
def test_decode_one_refuses_bad_arguments(changes, error, match):
    with pytest.raises(error, match=match):
        decode_one(**_decode_args(**changes))


@pytest.mark.parametrize(
    "shape, error, match",
    [((1, 4, 0, 8), ValueError, "h_kv must be >= 1, got 0"),
     ((1, 4, 2, -1), ValueError, "d must be >= 1, got -1"),
     ((1, 4, 2.0, 8), TypeError, "h_kv must be an int")],
)  # fmt: skip
def test_an_empty_cache_names_a_bad_size(shape, error, match):
    with pytest.raises(error, match=match):
        KVCache.empty(*shape, torch.float32, "cpu")


@pytest.mark.parametrize(
    "k, v, error, match",
    [
        # (before: a batch of 1 was broadcast into both rows, silently; another h_kv or d
        # raised torch's "expanded size" error)
        (torch.ones(1, 3, 2, 8), torch.ones(1, 3, 2, 8), ValueError,
         r"k must be \[b, n, h_kv, d\] with the cache's \(b, h_kv, d\) = \(2, 2, 8\)"),
        (torch.ones(2, 3, 2, 8), torch.ones(2, 3, 1, 8), ValueError, r"v must be \[b, n, h_kv"),
        (torch.ones(2, 3, 2, 8), torch.ones(2, 2, 2, 8), ValueError,
         "v must hold k's 3 positions, got 2"),
        (torch.ones(2, 3, 2, 8, dtype=torch.long), torch.ones(2, 3, 2, 8), TypeError,
         "k must be a floating tensor"),
        (torch.ones(2, 3, 2, 8, device="meta"), torch.ones(2, 3, 2, 8), ValueError,
         "k must be on the cache's device cpu, got meta"),
    ],
)  # fmt: skip
def test_a_cache_append_refuses_rows_unlike_its_own(k, v, error, match):
    cache = KVCache.empty(2, 10, 2, 8, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        cache.append(k, v)
    assert cache.length == 0 and not cache.k.any()
    cache.append(torch.ones(2, 3, 2, 8, dtype=torch.bfloat16), torch.ones(2, 3, 2, 8))
    assert cache.length == 3 and cache.k[:, :3].eq(1).all()  # (cast, as under autocast)


def test_decode_one_checked_is_the_layers_unchecked():
    from ringattn.config import DilatedConfig
    from ringattn.nn.decode import decode_unchecked

    args = _decode_args()
    config = DilatedConfig((4, 8), (1, 2), True, "lse", 0.5)
    unchecked = decode_unchecked(args["q"], args["cache"], 4, config, 0.5)
    assert torch.equal(decode_one(**args), unchecked)


def test_decode_reads_only_what_the_pattern_needs():
    """Rows outside the new token's segments are never read: poison them, nothing changes."""
    b, h, d, position = 1, 4, 8, 1000
    configs = ((16, 1), (64, 2), (256, 4))
    cache = KVCache.empty(b, 1024, h, d, torch.float64, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    cache.length = position + 1
    q = torch.randn(b, h, d, dtype=torch.float64)
    clean = decode_one(q, cache, position, configs, "lse", 0.3)
    touched = torch.zeros(1024, dtype=torch.bool)
    for w, _ in configs:
        touched[position - position % w : position + 1] = True
    cache.k[:, ~touched] = float("nan")
    cache.v[:, ~touched] = float("nan")
    assert torch.equal(decode_one(q, cache, position, configs, "lse", 0.3), clean)


class _CacheReads(torch.overrides.TorchFunctionMode):
    """The rows of ``cache.k`` each indexing ``cache.k[:, rows]`` reads, as lists."""

    def __init__(self, k: torch.Tensor) -> None:
        super().__init__()
        self.k, self.reads = k, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and args[0] is self.k:
            self.reads.append(args[1][1].tolist())
        return func(*args, **(kwargs or {}))


def test_decode_reads_what_its_pattern_needs_wherever_the_position():
    """Each (config, offset) reads its segment's rows of that offset up to the position, at
    most w / r of them, so a step costs the same at any position: a position 512 rows later
    (a multiple of every w) reads the same rows shifted by 512. (The test before counted rows
    it had marked itself: it could not fail.)"""
    b, h, d = 1, 4, 8
    configs = ((16, 1), (64, 2), (256, 4))
    cache = KVCache.empty(b, 2048, h, d, torch.float64, "cpu")
    cache.k.normal_()
    cache.length = 2048
    q = torch.randn(b, h, d, dtype=torch.float64)
    reads = []
    for position in (1000, 1512):
        with _CacheReads(cache.k) as mode:
            decode_one(q, cache, position, configs, "lse", 0.3)
        reads.append(mode.reads)
    assert reads[1] == [[row + 512 for row in rows] for rows in reads[0]]
    bound = {w // r for w, r in configs}
    for rows in reads[0]:
        assert len(rows) <= max(bound) and rows[-1] <= 1000 and rows[0] >= 1000 - 1000 % 256
    per_head = sum(len(rows) for rows in reads[0])  # (each offset's heads read together)
    assert 0 < per_head <= sum(w // r * min(r, h) for w, r in configs)


def test_generate_is_greedy_argmax_of_the_full_model():
    model = tiny_model("lse", (4, 8), (1, 2))
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    for i in range(5, 11):
        assert torch.equal(model(out[:, :i])[:, -1].argmax(-1), out[:, i])


def test_sampling_at_a_tiny_temperature_is_greedy():
    """Its limit (before: logits / 1e-40 overflowed, and multinomial raised on NaN after the
    prefill); a temperature of 1 still samples from the model's softmax."""
    model = tiny_model("lse", (4, 8), (1, 2))
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(prompt, 6, temperature=1e-40), model.generate(prompt, 6))
    generator = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 1, temperature=1.0, generator=generator)[:, -1:]
    probs = torch.softmax(model(prompt)[:, -1], -1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, expected)


def test_a_compiled_model_generates_what_the_eager_one_does():
    """model.compile() then generate(): the calls with caches run eagerly (a graph break), also
    in the layers; compiled, Inductor failed at the second decoded token (an AssertionError in
    torch's sympy functions on the positions Dynamo had made symbolic)."""
    model = tiny_model("lse", (4, 8), (1, 2))
    prompt = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(1))
    eager = model.generate(prompt, 12)
    torch._dynamo.reset()
    model.compile()
    assert torch.equal(model.generate(prompt, 12), eager)
    layer = model.blocks[0].attn
    layer.compile(fullgraph=False)
    cache = layer.new_cache(1, 8)
    x = torch.randn(1, 8, layer.embed_dim)
    with torch.no_grad():
        stepped = torch.cat([layer(x[:, i : i + 1], cache) for i in range(8)], dim=1)
        torch.testing.assert_close(stepped, layer(x))


def copy_batch(gen, batch=16, length=12, vocab=16):
    """[x_1..x_L, SEP, x_1..x_L]: the second half is predictable only by looking back L+1 tokens."""
    data = torch.randint(2, vocab, (batch, length), generator=gen)
    sep = torch.ones(batch, 1, dtype=torch.long)
    seq = torch.cat([data, sep, data], 1)
    targets = seq[:, 1:].clone()
    targets[:, :length] = -100  # only the copy is scored
    return seq[:, :-1], targets


def test_the_model_trains_on_a_copy_task():
    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=16,
        dim=48,
        depth=2,
        num_heads=4,
        segment_lengths=(8, 32),
        dilation_rates=(1, 2),
        strategy=ringattn.Strategy(computer="sdpa"),
    )
    model = LongNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        tokens, targets = copy_batch(gen)
        loss = model.loss(tokens, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


@pytest.mark.compile
def test_the_model_compiles_as_one_graph():
    torch._dynamo.reset()
    model = tiny_model("lse", (4, 8, 16), (1, 2, 4), strategy=ringattn.Strategy())
    tokens = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_logits = model(tokens)
    logits = compiled(tokens)
    assert rel_err(logits, eager_logits) < 1e-5
    (grad,) = torch.autograd.grad(logits.square().sum(), model.embed.weight)
    (eager_grad,) = torch.autograd.grad(eager_logits.square().sum(), model.embed.weight)
    assert rel_err(grad, eager_grad) < 1e-4


@pytest.mark.compile
def test_the_model_compiled_with_dynamic_shapes_is_one_graph_for_every_length():
    """Training on many lengths: ``torch.compile(model, dynamic=True)`` is one graph for nine
    lengths with nine different tails (rotary, embedding and the attention's plan included), each
    call the eager model's logits and gradients. It used to guard on ``n mod w`` and hit the
    recompile limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model("lse", (4, 8, 16), (1, 2, 4), strategy=ringattn.Strategy())
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    counters.clear()
    for n in range(17, 26):
        tokens = torch.randint(0, 32, (2, n), generator=torch.Generator().manual_seed(n))
        logits, eager_logits = compiled(tokens), model(tokens)
        assert rel_err(logits, eager_logits) < 1e-5, n
        (grad,) = torch.autograd.grad(logits.square().sum(), model.embed.weight)
        (eager_grad,) = torch.autograd.grad(eager_logits.square().sum(), model.embed.weight)
        assert rel_err(grad, eager_grad) < 1e-4, n
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.compile
def test_checkpointed_layers_compile_with_dynamic_shapes():
    """Two rotary layers, each under non-reentrant activation checkpointing, in
    ``torch.compile(dynamic=True, fullgraph=True)``: rotary's float default argument became a
    graph input, and the second checkpoint failed inside Dynamo ("lift_tracked_freevar_to_input
    should not be called on root SubgraphTracer", PyTorch issue 193194). Now each length gives
    the eager layers' output and gradients."""
    from torch.utils.checkpoint import checkpoint

    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = [
        MultiheadDilatedAttention(16, 2, (4, 8), (1, 2), causal=True, rotary_embedding=True)
        for _ in range(2)
    ]

    def body(x, checkpointed=True):
        for layer in layers:
            x = x + (checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x))
        return x

    compiled = torch.compile(body, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (16, 21):
        x = torch.randn(2, n, 16, requires_grad=True)
        out, eager = compiled(x), body(x, checkpointed=False)
        assert rel_err(out, eager) < 1e-5, n
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
        assert rel_err(grad, eager_grad) < 1e-4, n


def complex_rotation(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE's definition in float64: ``x``'s channel pairs as complex numbers, times
    ``exp(i · position · base^(-2j/d))`` with base 10000, ``positions`` along ``x``'s dim 1."""
    d = x.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq
    as_complex = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.exp(1j * angles)[None, :, None]
    return torch.stack((as_complex.real, as_complex.imag), dim=-1).flatten(-2)


@settings(max_examples=20)
@given(
    st.integers(0, 1 << 22),
    st.integers(0, 1 << 22),
    st.integers(-64, 64),
    st.sampled_from([2, 8, 32]),
)
def test_rotary_is_the_complex_rotation_and_sees_only_relative_positions(m, n, shift, d):
    """RoPE: channel pairs ``(x0, x1)`` as ``x0 + i x1`` times ``exp(i · pos · base^(-2j/d))``;
    so norms are kept and ``<rot(q, m), rot(k, n)>`` depends on ``m - n`` only. At the
    positions LongNet targets (up to 4M), to float64 precision for float64 inputs and float32's
    for float32 ones (the angles were float32: 0.025 off at a million positions)."""
    gen = torch.Generator().manual_seed(m + 7 * n + d)
    q, k = (torch.randn(1, 1, 3, d, generator=gen, dtype=torch.float64) for _ in range(2))
    m, n = max(m, -shift), max(n, -shift)  # positions stay >= 0 after the shift

    def rot(x, position):
        return rotary(x, torch.tensor([position]))

    want = complex_rotation(q, torch.tensor([m]))
    assert torch.allclose(rot(q, m), want, atol=1e-9)
    assert torch.allclose(rot(q.float(), m).double(), want, atol=1e-5)
    assert torch.allclose(rot(q, m).norm(dim=-1), q.norm(dim=-1), rtol=1e-12)
    dots = (rot(q, m) * rot(k, n)).sum(-1)
    shifted = (rot(q, m + shift) * rot(k, n + shift)).sum(-1)
    assert torch.allclose(dots, shifted, atol=1e-9)


@pytest.mark.parametrize(
    "x, positions, match",
    [
        (torch.randn(1, 5, 2, 4), torch.tensor([3]), r"positions must be \[n\] = \[5\]"),
        (torch.randn(5, 2, 4), torch.arange(5), r"x must be \[b, n, h, d\]"),
        # (the layer refuses an odd head dim when built; rotary called directly does too)
        (torch.randn(1, 5, 2, 3), torch.arange(5), "need an even head dim, got d=3"),
    ],
)
def test_rotary_bad_inputs(x, positions, match):
    """Before, one position was broadcast over every row, and a 3-D x came back 4-D."""
    with pytest.raises(ValueError, match=match):
        rotary(x, positions)


@pytest.mark.parametrize(
    "x, positions, base, error, match",
    [
        # (before: an integer x came back rotated and truncated to ints; base <= 0 or NaN gave
        # NaN; non-tensors raised AttributeError)
        (torch.ones(1, 2, 1, 4, dtype=torch.long), torch.arange(2), None, TypeError,
         r"x must be a floating \[b, n, h, d\] tensor, got torch.int64"),
        ([[1.0]], torch.arange(2), None, TypeError, "x must be a floating .* got list"),
        (torch.ones(1, 2, 1, 4), [0, 1], None, TypeError, "positions must be a tensor, got list"),
        (torch.ones(1, 2, 1, 4), torch.arange(2), 0.0, ValueError, "base must be finite and > 0"),
        (torch.ones(1, 2, 1, 4), torch.arange(2), -1e4, ValueError, "base must be finite"),
        (torch.ones(1, 2, 1, 4), torch.arange(2), float("nan"), ValueError, "base must be"),
        (torch.ones(1, 2, 1, 4), torch.arange(2), "1e4", TypeError, "base must be a float"),
        (torch.ones(1, 2, 1, 4), torch.arange(2), float("inf"), ValueError, "base must be finite"),
        (torch.ones(1, 2, 1, 4), torch.arange(2), True, TypeError,
         "base must be a float, got bool True"),
        # (before: complex positions lost their imaginary part, silently; positions on another
        # device raised torch's error, naming no argument)
        (torch.ones(1, 2, 1, 4), torch.arange(2) * (1 + 1j), None, TypeError,
         "positions must be real"),
        (torch.ones(1, 2, 1, 4), torch.arange(2, device="meta"), None, ValueError,
         "positions must be on x's device cpu, got meta"),
    ],
)  # fmt: skip
def test_rotary_bad_arguments_are_named(x, positions, base, error, match):
    with pytest.raises(error, match=match):
        rotary(x, positions, base)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        assert torch.isfinite(rotary(x, torch.arange(2), 500)).all()  # a valid base is taken


def test_a_multi_token_chunk_after_the_prefill_equals_full_recompute():
    """Every query of a later chunk sees only the rows up to its own position, although the
    whole chunk's K/V are in the cache by then."""
    for mixing, configs in (("lse", ((4, 8), (1, 2))), ("head_groups", ((4, 8), (2, 4)))):
        model = tiny_model(mixing, *configs).double()
        tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
        caches = model.new_caches(2, 16)
        chunks = [model(tokens[:, a:b], caches) for a, b in ((0, 5), (5, 11), (11, 16))]
        assert (torch.cat(chunks, 1) - model(tokens)).abs().max() < 1e-10


def test_longnet_built_on_meta_keeps_its_head_tied_to_the_embedding():
    """``to_empty`` replaced the tied parameter in each module: the head got its own copy (more
    parameters, and after one step a model unlike the one built directly)."""
    config = LongNetConfig(vocab_size=32, dim=16, depth=1, num_heads=2, segment_lengths=(8,),
                           dilation_rates=(1,))  # fmt: skip
    with torch.device("meta"):
        model = LongNet(config)
    model = model.to_empty(device="cpu")
    assert model.head.weight is model.embed.weight
    direct = LongNet(config)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in direct.parameters())


def test_a_longnet_config_cannot_be_reassigned():
    """Its layers were built from the config: before, ``model.config = replace(config,
    dropout=0.0)`` was taken and every layer kept dropping (only the token-id checks read the
    new config), silently. A copy refuses too; other attributes are still set."""
    import copy
    from dataclasses import replace

    config = LongNetConfig(vocab_size=32, dim=16, depth=1, num_heads=2, segment_lengths=(8,),
                           dilation_rates=(1,), dropout=0.5)  # fmt: skip
    model = LongNet(config)
    for target in (model, copy.deepcopy(model)):
        with pytest.raises(AttributeError, match=r"LongNet\.config is fixed at construction"):
            target.config = replace(config, dropout=0.0)
        assert target.config == config
    model.note = "kept"  # (a new name, and what calls read, are still assigned)
    model.training = False
    assert model.note == "kept"


class _Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


@pytest.mark.parametrize("tied", ["embed", "head"])
def test_a_parametrized_tied_weight_converts_and_loads(tied):
    """A parametrization (``torch.nn.utils.parametrize``: a LoRA, ``orthogonal``) on the
    embedding or the head: the tie assigned the computed weight as the head's Parameter, so
    ``.double()`` raised TypeError (embedding) or KeyError (head) after converting the
    parameters, as did ``load_state_dict`` (its post-hook). The stored Parameter stays shared."""
    from torch.nn.utils import parametrize

    def build() -> LongNet:
        model = _tiny_model(depth=1)
        parametrize.register_parametrization(getattr(model, tied), "weight", _Doubled())
        return model

    model, tokens = build(), torch.randint(0, 32, (1, 8))
    want = model(tokens)
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    model.double()
    for loaded in (fresh, model):
        head, embed = (
            m.parametrizations.weight.original if m is getattr(loaded, tied) else m.weight
            for m in (loaded.head, loaded.embed)
        )
        assert head is embed
        torch.testing.assert_close(loaded(tokens).float(), want)


@pytest.mark.parametrize("split", ["embed", "head"])
def test_a_weight_split_by_a_parametrization_is_left_untied(split):
    """``weight_norm`` stores the weight as two tensors (``original0``, ``original1``): no one
    Parameter to share, so the tie is left as the parametrization made it, and conversion and
    loading keep the model's parameters and state-dict keys (sharing its ``original`` added one,
    which a strict load then refused)."""
    from torch.nn.utils.parametrizations import weight_norm

    def build() -> LongNet:
        model = _tiny_model(depth=1)
        weight_norm(getattr(model, split))
        return model

    model, tokens = build(), torch.randint(0, 32, (1, 8))
    keys, want = list(model.state_dict()), model(tokens)
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    model.double()
    for loaded in (fresh, model):
        assert list(loaded.state_dict()) == keys
        torch.testing.assert_close(loaded(tokens).float(), want)


def _tiny_model(depth: int = 2) -> LongNet:
    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=32, dim=16, depth=depth, num_heads=4, segment_lengths=(4, 8),
        dilation_rates=(1, 2), compile=False,
    )  # fmt: skip
    return LongNet(config).eval()


def test_a_block_is_pre_norm_attention_then_pre_norm_mlp():
    """Pinned against the formula, with each norm's own affine parameters: every other model
    test compares the model with itself (decoding with the full forward, compiled with eager),
    so the MLP branch normalised by ln1 passed them all."""
    model = _tiny_model(depth=1)
    block = model.blocks[0]
    with torch.no_grad():
        for norm in (block.ln1, block.ln2):
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(2, 8, 16)
    after_attention = x + block.attn(block.ln1(x))
    want = after_attention + block.mlp(block.ln2(after_attention))
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)


def test_generate_runs_one_forward_per_new_token():
    """The prefill, then one step per token after the first (the last token needs no logits)."""
    model = _tiny_model()
    calls = []
    forward = model.forward
    model.forward = lambda *args: calls.append(args[0].shape[1]) or forward(*args)
    model.generate(torch.zeros(1, 3, dtype=torch.long), 5)
    assert calls == [3, 1, 1, 1, 1]


def test_generate_on_a_model_compiled_in_place_with_fullgraph():
    """generate() decodes eagerly: on a model compiled in place with fullgraph=True it went
    through the compiled forward into the eager decoding and Dynamo raised."""
    model = _tiny_model()
    prompt = torch.randint(0, 32, (1, 5))
    expected = model.generate(prompt, 4)
    model.compile(fullgraph=True, backend="eager")
    assert torch.equal(model.generate(prompt, 4), expected)


def test_a_call_stopped_between_layers_leaves_every_cache_as_it_was(monkeypatch):
    """A decoding call interrupted mid-model (a notebook's stop; here a hook on layer 1, then
    one inside layer 0's decode steps) left layer 0's cache a step ahead, and retrying the token
    decoded layer 1 at another position: logits 0.55 off, silently. Now every cache is as
    before the call, the retry is the full forward's, and caches out of step are refused."""
    import ringattn.nn.attention as attention_module

    model = _tiny_model().double()
    tokens = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    caches = model.new_caches(1, 16)
    model(tokens[:, :6], caches)

    def interrupt(*args):
        raise KeyboardInterrupt

    hook = model.blocks[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(tokens[:, 6:8], caches)
    hook.remove()
    assert [cache.length for cache in caches] == [6, 6]
    with monkeypatch.context() as patch:  # stopped inside the layer's own decode steps
        patch.setattr(attention_module, "decode_unchecked", interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(tokens[:, 6:8], caches)
    assert [cache.length for cache in caches] == [6, 6]
    assert rel_err(model(tokens[:, 6:8], caches), full[:, 6:8]) < 1e-12
    caches[0].length += 1
    with pytest.raises(
        ValueError, match=r"caches must hold the same number of positions.*\[9, 8\]"
    ):
        model(tokens[:, 8:9], caches)
    assert [cache.length for cache in caches] == [9, 8]  # refused before any layer moved
    layer, cache = model.blocks[0].attn, caches[1]  # a layer decoding on its own, too
    x = torch.randn(1, 2, 16, dtype=torch.float64)
    with monkeypatch.context() as patch:
        patch.setattr(attention_module, "decode_unchecked", interrupt)
        with pytest.raises(KeyboardInterrupt):
            layer(x, cache)
    assert cache.length == 8
    # stopped in the head (the logits: where memory runs out), at prefill and at a decode step,
    # and in a layer's output projection after its prefill stored the prompt
    for start, stop in ((0, 6), (6, 8)):
        caches = model.new_caches(1, 16)
        model(tokens[:, :start], caches) if start else None
        hook = model.head.register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(tokens[:, start:stop], caches)
        hook.remove()
        assert [cache.length for cache in caches] == [start, start]
        assert rel_err(model(tokens[:, start:stop], caches), full[:, start:stop]) < 1e-12
    cache = layer.new_cache(1, 16)
    hook = layer.out_proj.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        layer(x, cache)
    hook.remove()
    assert cache.length == 0
    torch.testing.assert_close(layer(x, cache), layer(x), rtol=0, atol=1e-12)


def test_a_layer_takes_projections_that_are_not_plain_linears():
    """A LoRA-style wrapper around ``q_proj`` / ``k_proj`` (no ``weight`` of its own): every
    call and ``new_cache`` raised an AttributeError. Now the wrapper's own parameters set the
    dtype and device a call is held to."""

    class Adapter(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.down = torch.nn.Linear(base.in_features, 2, bias=False)
            self.up = torch.nn.Linear(2, base.out_features, bias=False)
            torch.nn.init.zeros_(self.up.weight)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(16, 4, (4, 8), (1, 2), causal=True, compile=False)
    x = torch.randn(2, 13, 16)
    plain = layer(x)
    layer.q_proj, layer.k_proj = Adapter(layer.q_proj), Adapter(layer.k_proj)
    assert torch.equal(layer(x), plain)  # (the adapters add zeros)
    cache = layer.new_cache(2, 16)
    assert (cache.k.dtype, cache.k.device) == (torch.float32, x.device)
    torch.testing.assert_close(layer(x[:, :7], cache), plain[:, :7])
    with pytest.raises(
        TypeError, match=r"x.dtype must equal the layer's parameters' \(torch.float32\)"
    ):
        layer(x.double())

    class Gained(torch.nn.Module):  # its first parameter a float64 gain, applied in float32
        def __init__(self, base: torch.nn.Module) -> None:
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.base = base

        def forward(self, x):
            return self.base(x) * self.gain.float()

    layer.q_proj = Gained(layer.q_proj)  # (a float32 x was refused as not float64)
    assert torch.equal(layer(x), plain)


def test_projections_of_a_share_of_the_heads_are_held_to_the_split_rule():
    """Projections that give fewer heads than num_heads (a tensor-parallel rank's share, here
    by hand: test_distributed runs torch's own plan) are heads of head_dim channels each: the
    first 4 of 8 heads attend as the whole layer's first 4 (lse, rates dividing 4). An uneven
    share (3 of 8 query heads, or query and K/V heads in other proportions) is refused by name;
    so is an even one whose offsets would not be its own (a rate of 8 over 4 heads)."""
    torch.manual_seed(0)
    args = {"num_kv_heads": 4, "compile": False, "sub_layer_norm": False}
    layer = MultiheadDilatedAttention(64, 8, (8, 16), (1, 2), **args)
    x = torch.randn(1, 16, 64)
    whole = layer._attended(*layer._heads(x, 0))
    linear = torch.nn.Linear
    share = MultiheadDilatedAttention(64, 8, (8, 16), (1, 2), **args)
    share.q_proj, share.k_proj, share.v_proj = linear(64, 32), linear(64, 16), linear(64, 16)
    with torch.no_grad():
        for mine, theirs, rows in (("q_proj", "q_proj", 32), ("k_proj", "k_proj", 16)):
            getattr(share, mine).weight.copy_(getattr(layer, theirs).weight[:rows])
            getattr(share, mine).bias.copy_(getattr(layer, theirs).bias[:rows])
        share.v_proj.weight.copy_(layer.v_proj.weight[:16])
        share.v_proj.bias.copy_(layer.v_proj.bias[:16])
    torch.testing.assert_close(share._attended(*share._heads(x, 0)), whole[:, :, :4])
    for q_heads, kv_heads in ((3, 2), (4, 1)):
        share.q_proj, share.k_proj = linear(64, q_heads * 8), linear(64, kv_heads * 8)
        share.v_proj = share.k_proj
        with pytest.raises(ValueError, match="must give each rank an equal share of both"):
            share(x)
    share.attention = ringattn.DilatedAttention((8, 16), (1, 8), compile=False)
    share.q_proj, share.k_proj = linear(64, 32), linear(64, 16)
    share.v_proj = share.k_proj
    with pytest.raises(ValueError, match=r"gave 4 of the layer's num_heads=8 heads.*\(1, 8\)"):
        share(x)


def test_one_cache_for_several_layers_is_refused():
    """[cache] * depth: layer 0's prefill moved the shared length and layer 1 read the same
    tokens as a continuation (logits off by 0.15, silently)."""
    model = _tiny_model()
    cache = model.new_caches(1, 64)[0]
    with pytest.raises(ValueError, match="caches must be distinct KVCache objects"):
        model(torch.randint(0, 32, (1, 6)), [cache] * 2)
    assert cache.length == 0  # refused before any layer moved


def test_loss_checks_its_targets():
    model = _tiny_model(depth=1)
    tokens = torch.randint(0, 32, (2, 3))
    with pytest.raises(ValueError, match=r"targets must have the tokens' shape \(2, 3\)"):
        model.loss(tokens, torch.randint(0, 32, (3, 2)))  # same count: was a silent wrong loss
    with pytest.raises(TypeError, match="targets must be an integer"):
        model.loss(tokens, tokens.float())
    targets = torch.randint(0, 32, (2, 3))
    assert torch.equal(model.loss(tokens, targets.int()), model.loss(tokens, targets))
    # (before: cross_entropy's IndexError after the whole forward)
    for bad in (32, -1):
        with pytest.raises(ValueError, match=r"targets must be ids in \[0, vocab_size=32\)"):
            model.loss(tokens, torch.where(targets == targets[0, 0], bad, targets))
    ignored = torch.full_like(targets, -100)
    ignored[0, 0], ignored[1, 2] = 5, 7  # -100 is ignored, not out of range
    # the mean over the kept positions only: the log-likelihood of their targets
    log_probs = torch.log_softmax(model(tokens), dim=-1)
    kept = -(log_probs[0, 0, 5] + log_probs[1, 2, 7]) / 2
    torch.testing.assert_close(model.loss(tokens, ignored), kept)


def test_the_target_check_op_passes_torchs_opcheck():
    """``ringattn::check_target_ids`` (the compiled loss's target check): schema, fake output and
    AOT dispatch as torch.library checks them; a count of 0 gives a float64 zero, any other a
    ValueError naming it."""
    from ringattn.models.longnet import check_target_ids

    zero = torch.zeros((), dtype=torch.float64)
    torch.library.opcheck(torch.ops.ringattn.check_target_ids.default, (zero, 32))
    assert torch.equal(check_target_ids(zero, 32), zero)
    with pytest.raises(ValueError, match=r"vocab_size=32\) or -100 \(ignored\), got 3 others"):
        check_target_ids(torch.tensor(3.0, dtype=torch.float64), 32)


COMPILED_LOSS = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_models import _tiny_model
torch.set_num_threads(2)
torch._dynamo.config.recompile_limit = 64
backend = {backend!r}
model = _tiny_model(depth=1)
for n in (8, 48):  # (at 48 Inductor's loops over the targets run in parallel)
    tokens = torch.randint(0, 32, (2, n), generator=torch.Generator().manual_seed(n))
    targets = tokens.roll(-1, 1)
    targets[0, 0] = -100
    compiled = torch.compile(model.loss, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(tokens, targets), model.loss(tokens, targets))
    for bad in (32, -1):
        try:
            compiled(tokens, torch.where(targets == targets[1, 1], bad, targets))
        except ValueError as exc:
            print(n, bad, exc)
"""


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_the_loss_compiles_as_one_graph_and_checks_its_targets(backend):
    """``torch.compile(model.loss, fullgraph=True)``: the eager loss, and an id out of range
    raises the eager call's ValueError from the graph (the eager check branched on the ids, so
    the trace failed; then ``torch._assert_async``'s throw inside Inductor's OpenMP loop, two
    threads at n = 48, aborted the process: so a process of its own here)."""
    code = COMPILED_LOSS.format(tests=str(Path(__file__).parent), backend=backend)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout
    for line in lines:
        assert re.search(
            r"targets must be ids in \[0, vocab_size=32\) or -100 \(ignored\), got [1-9]\d* others",
            line,
        ), line


def test_the_layer_is_sub_ln_over_rotary_attention_of_its_projections():
    """Pinned against the formula: ``out_proj(LayerNorm(attention(rot(q), rot(k), v)))`` with
    Q and K rotated at positions ``0..n-1`` and the norm's own affine parameters; ``bias=False``
    leaves every projection without a bias. (The model tests compare decoding with the full
    forward, both through the same layer: a layer that skipped the Sub-LN, rotated only Q, or
    ignored ``bias`` passed them all.)"""
    torch.manual_seed(0)
    lengths, rates = (4, 8), (1, 2)
    layer = MultiheadDilatedAttention(
        32, 4, lengths, rates, num_kv_heads=2, causal=True, rotary_embedding=True, bias=False,
        strategy=MATH, compile=False,
    ).double()  # fmt: skip
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    q = rearrange(layer.q_proj(x), "b n (h d) -> b n h d", h=4)
    k, v = (rearrange(p(x), "b n (h d) -> b n h d", h=2) for p in (layer.k_proj, layer.v_proj))
    positions = torch.arange(13)
    attn = reference.dilated_attention(
        rotary(q, positions), rotary(k, positions), v, segment_lengths=lengths,
        dilation_rates=rates, causal=True,
    )  # fmt: skip
    normed = torch.nn.functional.layer_norm(
        rearrange(attn, "b n h d -> b n (h d)"), (32,), layer.norm.weight, layer.norm.bias
    )
    assert rel_err(layer(x), normed @ layer.out_proj.weight.T) < 1e-12
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
        assert proj.bias is None


def test_a_layer_under_autocast_takes_inputs_in_the_autocast_dtype():
    """A float32 layer under ``torch.autocast`` takes a bf16 ``x`` (the previous layer's autocast
    output), as torch's own layers do; outside autocast the same call is refused."""
    layer = _layer(causal=True)
    x = torch.randn(1, 8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    want = layer(x.float())
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 3e-2
    with pytest.raises(TypeError, match=r"x\.dtype must equal"):
        layer(x)


def test_new_cache_takes_the_dtype_and_device_asked_for():
    """Else the K/V projections': a float64 cache for a float32 layer, one on meta (an estimate)."""
    layer = _layer(causal=True)
    assert layer.new_cache(1, 8).k.dtype == torch.float32
    cache = layer.new_cache(2, 8, dtype=torch.float64)
    assert (cache.k.dtype, cache.v.dtype, cache.k.shape) == (torch.float64,) * 2 + ((2, 8, 2, 4),)
    meta = layer.new_cache(1, 8, device="meta")
    assert meta.k.device.type == meta.v.device.type == "meta"


def test_new_cache_takes_device_zero(monkeypatch):
    """``device=0`` (CUDA's first device, an int KVCache.empty accepts) reaches the cache: it
    was falsy to ``device or weight.device`` and the cache went to the weights' device."""
    seen = []

    def empty(cls, b, capacity, h_kv, d, dtype, device):
        seen.append((dtype, device))
        return cls(torch.zeros(b, capacity, h_kv, d), torch.zeros(b, capacity, h_kv, d))

    monkeypatch.setattr(KVCache, "empty", classmethod(empty))
    layer = _layer(causal=True)
    layer.new_cache(1, 8, device=0)
    assert seen == [(torch.float32, 0)]


def test_bf16_decoding_accumulates_in_float32():
    """Scores, softmax and the configs' merge of a bf16 query run in float32 and are rounded once:
    the bf16 decode is the float32 decode of the same values, rounded to bf16."""
    args = _decode_args()
    cache = args["cache"]
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    half = KVCache(cache.k.bfloat16(), cache.v.bfloat16(), cache.length)
    q = args["q"].bfloat16()
    as_float = {**args, "q": q.float(), "cache": KVCache(half.k.float(), half.v.float(), 5)}
    out = decode_one(**{**args, "q": q, "cache": half})
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, decode_one(**as_float).bfloat16())


def test_rotary_angles_are_exact_past_float32s_integers():
    """Positions past 2^24 (float32's last exact integer; LongNet targets a billion tokens) keep
    their own angle: a position rounded through float32 lands on its neighbour's."""
    x = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    positions = torch.tensor([2**24 + 1, 2**30 + 3])
    assert torch.allclose(rotary(x, positions), complex_rotation(x, positions), atol=1e-9)


def test_the_model_builds_its_layers_from_its_config():
    """The config's heads, kv heads, mixing and dropout reach every attention layer, which is
    causal and rotary (decoding and the sequence-parallel runs compare the model with itself:
    a layer built without them passed)."""
    config = LongNetConfig(
        vocab_size=32, dim=32, depth=2, num_heads=4, num_kv_heads=2, segment_lengths=(4, 8),
        dilation_rates=(1, 2), mixing="head_groups", dropout=0.25, strategy=MATH,
    )  # fmt: skip
    for block in LongNet(config).blocks:
        layer = block.attn
        assert (layer.num_heads, layer.num_kv_heads, layer.rotary_embedding) == (4, 2, True)
        assert layer.k_proj.out_features == 2 * 8 and layer.dropout.p == 0.25
        attention = layer.attention.config
        assert (attention.causal, attention.mixing) == (True, "head_groups")


def test_generate_of_no_new_tokens_is_the_prompt():
    model = _tiny_model()
    prompt = torch.randint(0, 32, (2, 5))
    assert torch.equal(model.generate(prompt, 0), prompt)
    assert torch.equal(model.generate(prompt[:, :1], 0), prompt[:, :1])


def test_longnet_built_on_meta_is_initialised_by_init_weights_as_a_direct_build():
    """A model built on meta and materialised with ``to_empty`` holds uninitialised memory, and
    LongNet had no public init: its own (``_init``) left the LayerNorms as that memory, and the
    modules' ``reset_parameters`` scaled the tied embedding otherwise (another model, silently).
    ``init_weights`` draws what ``LongNet(config)`` draws, in the same order."""
    config = LongNetConfig(vocab_size=32, dim=16, depth=2, num_heads=2, segment_lengths=(8,),
                           dilation_rates=(1,), num_kv_heads=1)  # fmt: skip
    torch.manual_seed(3)
    direct = LongNet(config)
    with torch.device("meta"):
        model = LongNet(config)
    model = model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    assert model.head.weight is model.embed.weight
    want = direct.state_dict()
    assert all(torch.equal(value, want[name]) for name, value in model.state_dict().items())


def test_multihead_layer_takes_device_and_dtype_so_skip_init_builds_it():
    """torch's factory arguments, as ``nn.MultiheadAttention``'s: without them
    ``torch.nn.utils.skip_init`` refused the layer ("Module must support a 'device' arg")."""
    from torch.nn.utils import skip_init

    args = (16, 4, (4, 8), (1, 2))
    layer = skip_init(MultiheadDilatedAttention, *args, causal=True, dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in layer.parameters()} == {("cpu", torch.float64)}
    torch.manual_seed(0)
    for module in layer.modules():
        if module is not layer and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.manual_seed(0)
    direct = MultiheadDilatedAttention(*args, causal=True, dtype=torch.float64)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    assert torch.equal(layer(x), direct(x))
    with torch.device("meta"):
        on_meta = MultiheadDilatedAttention(*args, device="cpu")
    assert {p.device.type for p in on_meta.parameters()} == {"cpu"}
