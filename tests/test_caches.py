"""What the caches between calls keep: pooled buffers and patterns keyed by everything they
depend on (dtype, rate), the LRU's order, and the functional form's modules per option set."""

from __future__ import annotations

import torch
from conftest import make_qkv, options, rel_err

import ringattn
from ringattn import reference
from ringattn.memory.pooled import PooledMemory


def test_pooled_scratch_is_keyed_by_dtype():
    pool = PooledMemory()
    a = pool.scratch("lse_acc", (2, 3), torch.float32, torch.device("cpu"))
    b = pool.scratch("lse_acc", (2, 3), torch.float64, torch.device("cpu"))
    assert a.dtype == torch.float32 and b.dtype == torch.float64


def test_one_pooled_module_serves_float32_then_float64():
    """One module (the functional form keeps one per option set) called in float32 and then in
    float64 at the same shape: the float64 call must not reuse the float32 scratch LSE."""
    # (first config r = 2: no block covers every row, so the no-grad call's LSE is pooled scratch)
    p = {
        "b": 1,
        "n": 12,
        "h": 2,
        "d": 4,
        "segment_lengths": (8, 4),
        "dilation_rates": (2, 1),
        "causal": False,
        "mixing": "lse",
    }
    module = ringattn.DilatedAttention(
        p["segment_lengths"],
        p["dilation_rates"],
        strategy=ringattn.Strategy(computer="math", memory="pooled"),
        compile=False,
    )
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_qkv(p, dtype)
        with torch.no_grad():
            out = module(q, k, v)
        ref = reference.dilated_attention(*(x.double() for x in (q, k, v)), **options(p))
        assert rel_err(out, ref) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_lru_keeps_the_most_recent_entries():
    pool = PooledMemory(max_entries=3)
    for n in range(5):
        pool.cached(("key", n), lambda n=n: torch.arange(n))
    pool.cached(("key", 2), lambda: torch.zeros(0))  # a hit: 2 becomes the most recent
    pool.cached(("key", 5), lambda: torch.arange(5))  # evicts the least recent: 3
    assert set(pool.patterns.items) == {("key", 2), ("key", 4), ("key", 5)}
    assert pool.stats()["pattern_hits"] == 1


def test_global_permutation_cache_distinguishes_rates_of_one_length():
    """Two configs of one segment length and different rates, global dilation, pooled patterns."""
    p = {
        "b": 1,
        "n": 16,
        "h": 2,
        "d": 4,
        "segment_lengths": (8, 8),
        "dilation_rates": (1, 2),
        "causal": True,
        "mixing": "lse",
    }
    q, k, v = make_qkv(p, torch.float64)
    ref = reference.dilated_attention(q, k, v, **options(p))
    for computer in ("math", "sdpa"):
        strategy = ringattn.Strategy(dilation="global", computer=computer, memory="pooled")
        with torch.no_grad():
            out = ringattn.dilated_attention(
                q, k, v, **options(p), strategy=strategy, compile=False
            )
        assert rel_err(out, ref) <= 1e-10, computer


P = {
    "b": 1,
    "n": 12,
    "h": 2,
    "d": 4,
    "segment_lengths": (4, 8),
    "dilation_rates": (1, 2),
    "causal": True,
    "mixing": "lse",
}


def test_functional_calls_that_differ_only_in_scale():
    q, k, v = make_qkv(P, torch.float64)
    for scale in (None, 0.3, 1.7):
        p = {**P, "scale": scale}
        out = ringattn.dilated_attention(
            q, k, v, **options(p), strategy=ringattn.Strategy(computer="math"), compile=False
        )
        assert rel_err(out, reference.dilated_attention(q, k, v, **options(p))) <= 1e-10, scale


def test_one_module_serves_two_head_dims():
    module = ringattn.DilatedAttention(
        P["segment_lengths"],
        P["dilation_rates"],
        causal=True,
        strategy=ringattn.Strategy(computer="math"),
        compile=False,
    )
    for d in (4, 16, 4):
        q, k, v = make_qkv({**P, "d": d}, torch.float64)
        ref = reference.dilated_attention(q, k, v, **options(P))  # scale 1 / sqrt(d)
        assert rel_err(module(q, k, v), ref) <= 1e-10, d
