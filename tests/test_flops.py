"""The analytic useful-work count equals the oracle's multiplicity sum, and torch's
FlopCounterMode counts every strategy's call as that count."""

from __future__ import annotations

import contextlib
import gc

import numpy as np
import pytest
import torch
from conftest import dilation_configs
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.utils.flop_counter import FlopCounterMode

import ringattn
from ringattn import core, reference
from ringattn.flops import (
    FORWARD_BACKWARD_FACTOR,
    dense_flops,
    dense_pairs,
    useful_flops,
    useful_pairs,
)


@given(
    dilation_configs(),
    st.integers(1, 64),
    st.integers(1, 6),
    st.booleans(),
    st.sampled_from(["lse", "head_groups"]),
)
def test_useful_pairs_is_the_multiplicity_sum(configs, n, h, causal, mixing):
    m = reference.multiplicity(n, h, *configs, causal=causal, mixing=mixing)
    assert useful_pairs(n, h, *configs, causal, mixing) == int(m.sum())


def test_one_full_config_costs_what_dense_attention_costs():
    for causal in (False, True):
        assert useful_flops(2, 64, 4, 8, [64], [1], causal, "lse") == dense_flops(
            2, 64, 4, 8, causal
        )
        assert useful_flops(2, 64, 4, 8, [64], [1], causal, "lse", backward=True) == dense_flops(
            2, 64, 4, 8, causal, backward=True
        )


def test_forward_backward_counts_issue_5s_convention():
    """Issue 5's useful FLOPs: 4 · (queries) · (keys each sees) · d per head forward, and 2.5×
    that more for the backward. Pinned in numbers: both counts scale by the same factor, so the
    ratios the tests compare would not see it change (every fwd+bwd TFLOP/s would)."""
    forward = 4 * 8 * 64 * 64  # b = h = 1, n = w = 64, d = 8, one r = 1 config
    assert useful_flops(1, 64, 1, 8, [64], [1], False, "lse") == forward
    assert useful_flops(1, 64, 1, 8, [64], [1], False, "lse", backward=True) == 3.5 * forward
    assert dense_flops(1, 64, 1, 8, False, backward=True) == 3.5 * forward
    causal = 4 * 8 * 64 * 65 / 2  # the lower triangle, diagonal included
    assert dense_flops(1, 64, 1, 8, True, backward=True) == 3.5 * causal


@pytest.mark.parametrize("causal", [False, True])
def test_dense_pairs_is_one_whole_sequence_config(causal):
    for n, h in ((1, 1), (5, 2), (7, 3)):
        assert dense_pairs(n, h, causal) == useful_pairs(n, h, [n], [1], causal)
        assert dense_flops(2, n, h, 4, causal) == 4.0 * 4 * 2 * dense_pairs(n, h, causal)


def test_useful_pairs_defaults_are_the_oracles():
    """Called without ``causal`` and ``mixing``, the count is the oracle's default pattern's
    (non-causal, "lse"): the tests above pass both, or use one config, where mixings agree."""
    configs = ((4, 8), (1, 2))  # where causal and head_groups both count fewer pairs
    m = reference.multiplicity(16, 2, *configs)
    assert useful_pairs(16, 2, *configs) == int(m.sum())
    assert int(m.sum()) > useful_pairs(16, 2, *configs, True)
    assert int(m.sum()) > useful_pairs(16, 2, *configs, False, "head_groups")


@pytest.mark.parametrize(
    "args, error, match",
    [
        # (before: zip dropped the config without a rate, 128 pairs)
        ((16, 2, (4, 8), (1,)), ValueError, "must have the same length, got 2 and 1"),
        # (before: 8 pairs, as if 3 divided 4)
        ((16, 2, (4,), (3,)), ValueError, r"dilation_rates\[0\]=3 must divide"),
        ((16, 2, (4,), (1,), False, "groups"), ValueError, "mixing must be one of"),
        ((16.0, 2, (4,), (1,)), TypeError, "n must be an int"),
        ((16, 0, (4,), (1,)), ValueError, "h must be >= 1"),
    ],
)
def test_useful_pairs_refuses_what_the_module_refuses(args, error, match):
    with pytest.raises(error, match=match):
        useful_pairs(*args)


@pytest.mark.parametrize(
    "count",
    [
        lambda: dense_pairs(np.int32(65536), 1, False),
        lambda: dense_flops(1, np.int32(65536), 1, 1, True),
        lambda: dense_flops(1, torch.tensor(65536, dtype=torch.int32), 1, 1, False),
        lambda: useful_flops(1, 1 << 16, 1, torch.tensor(128), [2048], [1], False, "lse"),
        # (each size of each count: a tensor b, h or d made the count a tensor too)
        lambda: dense_pairs(1 << 16, torch.tensor(2), False),
        lambda: useful_flops(torch.tensor(2), 1 << 16, 1, 128, [2048], [1], False, "lse"),
        lambda: dense_flops(torch.tensor(2), 1 << 16, 1, 128, False),
        lambda: dense_flops(1, 1 << 16, 1, torch.tensor(128), False),
    ],
)
def test_flop_counts_refuse_sizes_that_are_not_ints(count):
    """An int32 n was squared in int32 (n * n wraps from n = 46341): dense_flops counted 0 at
    n = 65536 (numpy warned, torch did not); a tensor d made a float32 tensor of the count. The
    sizes are refused as useful_pairs refuses them, and Python ints count exactly at any n."""
    with pytest.raises(TypeError, match="must be an int"):
        count()


def test_dense_counts_are_exact_at_millions_of_tokens():
    n = 1 << 22  # 4M tokens: n * n = 2**44
    assert dense_pairs(n, 32, False) == 32 * 2**44
    assert dense_flops(8, n, 32, 128, False) == 4.0 * 8 * 128 * 32 * 2**44


SHAPE, LENGTHS, RATES = (1, 64, 2, 8), (16, 32, 64), (1, 2, 4)


def _counted(fn, backward: bool) -> int:
    q, k, v = (torch.randn(*SHAPE, requires_grad=backward) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        out = fn(q, k, v)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
@pytest.mark.parametrize("causal", [False, True])
def test_flop_counter_counts_every_strategy_as_its_useful_flops(causal, mixing):
    """torch's FlopCounterMode counts a call as its useful FLOPs, forward (with and without
    gradients) and forward+backward, for every strategy: kernel by kernel it counted sdpa's as
    0 (the CPU's flash kernel has no formula) and math's masked einsums (a causal call: 2x), so
    an MFU compared across strategies compared different counts of one function."""
    want = useful_flops(SHAPE[0], SHAPE[1], SHAPE[2], SHAPE[3], LENGTHS, RATES, causal, mixing)
    for strategy in ringattn.Strategy.single_device():
        if strategy.computer == "flex":  # (a compiled frame of its own: torch runs none under
            continue  # a dispatch mode, docs/architecture.md#observability)
        attn = ringattn.DilatedAttention(
            LENGTHS, RATES, causal=causal, mixing=mixing, strategy=strategy
        )
        counts = [_counted(attn, False), _counted(attn, True)]
        assert counts == [want, want * FORWARD_BACKWARD_FACTOR], strategy.label


def test_flop_counter_counts_the_ops_of_an_exported_graph_as_eager_calls():
    """A graph's opaque ops (torch.export; torch.compile's graphs hold the same two) count as
    the eager call does: with no formula the counter ran them unseen, 0."""
    attn = ringattn.DilatedAttention(LENGTHS, RATES, causal=True)
    program = torch.export.export(attn, tuple(torch.randn(*SHAPE) for _ in range(3)))
    want = useful_flops(*SHAPE, LENGTHS, RATES, True, "lse")
    assert _counted(program.module(), False) == want
    # its module gone, the program still runs on meta inputs (the ops' fake kernels): counted
    # as 0, the config unknown, where reading the module raised
    del attn
    gc.collect()
    q = torch.randn(*SHAPE, device="meta")
    with FlopCounterMode(display=False) as counter:
        assert program.module()(q, q, q).device.type == "meta"
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("tag", ["fake", "meta"])
def test_the_flop_formulas_count_a_tag_they_cannot_read_as_zero(tag):
    """Inductor's estimates (``count_flops_fx``) count a graph's op on fake copies of its
    inputs, the module's tag too: its number cannot be read there (int() of a fake tensor
    raised), nor on meta, so the op counts 0 rather than failing the count."""
    attn = ringattn.DilatedAttention(LENGTHS, RATES)
    q = torch.randn(*SHAPE, device="meta")
    with FakeTensorMode() if tag == "fake" else contextlib.nullcontext() as mode:
        module = mode.from_tensor(attn._number) if tag == "fake" else attn._number.to("meta")
        q = mode.from_tensor(q) if tag == "fake" else q
        with FlopCounterMode(display=False) as counter:
            torch.ops.ringattn.dilated_forward(q, q, q, module)
    assert counter.get_total_flops() == 0


def test_flop_counter_on_fake_tensors_runs_the_call_as_eager_code():
    """Under a FakeTensorMode (FLOPs counted without memory) the call stays eager code, counted
    kernel by kernel: as the op, its real tag among fake inputs made the mode refuse the call."""
    attn = ringattn.DilatedAttention(LENGTHS, RATES)
    with FakeTensorMode():
        q = torch.randn(*SHAPE)
        with FlopCounterMode(display=False):
            out = attn(q, q, q)
    assert is_fake(out) and out.shape == q.shape


def test_a_counted_call_that_raises_leaves_no_flag_set(monkeypatch):
    """The flag that skips the op's cross-rank check (the eager boundary made it) is cleared
    when the call raises: left set, every later compiled call on this thread skipped the check
    (ranks of different shapes then ran the ring apart, and gloo aborted)."""
    attn = ringattn.DilatedAttention(LENGTHS, RATES)

    def fail(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(core, "dilated_forward", fail)
    q = torch.randn(*SHAPE)
    with FlopCounterMode(display=False), pytest.raises(MemoryError):
        attn(q, q, q)
    assert not getattr(core._EAGER_AS_OP, "active", False)
