"""``lse`` gradients added by FA4's backward itself (``ringattn.kernels.fa4_add``), without a GPU.

The adding kernel (FA4's SM90 backward with its dK / dV stores as TMA reduce-adds) runs only on
an SM90 GPU (held to the plain kernel plus the add there by ``experiments/fa4_probe.py --part
add`` and to the oracle by ``experiments/flex_gpu.py --part check``). Here, on the FA4 stand-in:

* the core's wiring: a stand-in that adds dK / dV into the views it is handed and returns dQ
  must still give the oracle's gradients (so the views are the gradients' own rows and dQ is
  added exactly once), also when it declines some calls;
* the first-call guard: a kernel is kept only if its sums agree with the plain kernel's, is
  refused with a warning when it disagrees or fails, and the gradients are never added twice.
"""

from __future__ import annotations

import pytest
import torch
from conftest import problems
from fake_fa4 import FakeFA4, installed
from hypothesis import given
from hypothesis import strategies as st
from test_fa4 import sdpa_strategies, with_fixture
from test_fa4_merge import MERGED
from test_strategies import check_against_oracle

from ringattn.kernels import fa4, fa4_add


class StandIn:
    """``fa4_add.backward_add_`` on the CPU: FA4's backward (the stand-in's), its dK / dV added
    into the views it is given; declines every ``decline``-th call."""

    def __init__(self, decline: int = 0) -> None:
        self.calls = self.added = 0
        self.decline = decline

    def __call__(self, dout, q, k, v, out, lse, causal, scale, dk, dv):
        self.calls += 1
        assert dk.shape == k.shape and dv.shape == v.shape and dk.dtype == q.dtype
        if self.decline and self.calls % self.decline == 0:
            return None
        dq_block, dk_block, dv_block = fa4.backward(dout, q, k, v, out, lse, causal, scale)
        dk.add_(dk_block), dv.add_(dv_block)
        self.added += 1
        return dq_block


@pytest.fixture
def adding(monkeypatch):
    """FA4's stand-in installed, the adding backward offered to every merged block."""
    monkeypatch.setattr(fa4_add, "supported", lambda q: True)
    with installed(FakeFA4()):
        yield monkeypatch


@pytest.mark.parametrize("causal", [False, True])
def test_merged_blocks_add_dk_dv_in_the_kernel(adding, causal):
    stand_in = StandIn()
    adding.setattr(fa4_add, "backward_add_", stand_in)
    check_against_oracle({**MERGED, "causal": causal}, torch.float32, sdpa_strategies())
    assert stand_in.added > 0


@with_fixture(max_examples=15)
@given(problems(), st.sampled_from([0, 2, 3]))
def test_any_problem_matches_oracle_whichever_launches_add(adding, p, decline):
    adding.setattr(fa4_add, "backward_add_", StandIn(decline))
    check_against_oracle(p, torch.float32, sdpa_strategies())


def operands(seed: int = 0):
    """``(dout, q, k, v, out, lse)`` blocks and gradient rows ``dk, dv`` (strided views)."""
    gen = torch.Generator().manual_seed(seed)

    def rows(*tail):
        return torch.randn(2, 6, 2, *tail, generator=gen)[:, :, 0]

    dout, q, k, v, out = (rows(3, 8) for _ in range(5))
    lse = rows(3).abs() + 1
    return (dout, q, k, v, out, lse), rows(3, 8), rows(3, 8)


class FakeAdding:
    """``fa4.backward`` whose ``kernels`` variant adds dK / dV into the given rows (plus
    ``error`` to dK, ``dv_error`` to dV), or raises; the plain variant is the stand-in's."""

    def __init__(self, error: float = 0.0, fail: bool = False, dv_error: float = 0.0) -> None:
        self.error, self.dv_error, self.fail, self.adding_runs = error, dv_error, fail, 0
        self.plain = fa4.backward

    def __call__(self, dout, q, k, v, out, lse, causal, scale, grads=None, kernels=None):
        if kernels is None:
            return self.plain(dout, q, k, v, out, lse, causal, scale, grads)
        self.adding_runs += 1
        dq, dk, dv = self.plain(dout, q, k, v, out, lse, causal, scale)
        grads[1].add_(dk + self.error), grads[2].add_(dv + self.dv_error)
        if self.fail:  # (after it added: a launch may fail midway)
            raise RuntimeError("no such kernel")
        return dq, grads[1], grads[2]


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(fa4_add, "_CHECKED", {})
    with installed(FakeFA4()):
        yield monkeypatch


@pytest.mark.parametrize("causal", [False, True])
def test_first_call_keeps_a_kernel_that_agrees(fresh, causal):
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    inputs, dk, dv = operands()
    old = dk.clone(), dv.clone()
    assert fa4_add.backward_add_(*inputs, causal, 0.3, dk, dv) is None  # checked, not added
    torch.testing.assert_close((dk, dv), old)
    dq = fa4_add.backward_add_(*inputs, causal, 0.3, dk, dv)
    want = fake.plain(*inputs, causal, 0.3)
    torch.testing.assert_close((dq, dk, dv), (want[0], old[0] + want[1], old[1] + want[2]))
    assert fake.adding_runs == 2 and list(fa4_add._CHECKED.values()) == [True]


@pytest.mark.parametrize(
    ("fake", "why"),
    [
        (FakeAdding(error=0.5), "disagreed"),
        (FakeAdding(error=float("nan")), "disagreed"),
        (FakeAdding(error=1e-4), "disagreed"),  # ~28 units in the last place, not 4
        # (a NaN in dV, after a finite dK error: max() of the two dropped it, and kept the kernel)
        (FakeAdding(dv_error=float("nan")), "disagreed"),
        (FakeAdding(fail=True), "failed to compile or launch"),
    ],
)
def test_first_call_refuses_a_kernel_that_disagrees_or_fails(fresh, fake, why):
    fresh.setattr(fa4, "backward", fake)
    inputs, dk, dv = operands()
    old = dk.clone(), dv.clone()
    with pytest.warns(RuntimeWarning, match=why):
        assert fa4_add.backward_add_(*inputs, False, 0.3, dk, dv) is None
    torch.testing.assert_close((dk, dv), old, equal_nan=False)  # untouched: the caller adds
    runs = fake.adding_runs
    assert fa4_add.backward_add_(*inputs, False, 0.3, dk, dv) is None  # never again
    assert fake.adding_runs == runs


def test_disabled_or_empty_declines_without_work(fresh):
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    inputs, dk, dv = operands()
    fresh.setattr(fa4_add, "ENABLED", False)
    assert fa4_add.backward_add_(*inputs, False, 0.3, dk, dv) is None
    fresh.setattr(fa4_add, "ENABLED", True)
    empty = [x[:, :0] for x in inputs]
    assert fa4_add.backward_add_(*empty, False, 0.3, dk[:, :0], dv[:, :0]) is None
    assert fake.adding_runs == 0


@pytest.mark.parametrize("change", ["deterministic", "dtype", "tiles"])
def test_each_signature_is_checked_on_its_own(fresh, change):
    """A kernel kept for one signature is not taken for another (each is compiled apart): a
    deterministic backward, another dtype, or other BACKWARD_CONFIG tiles get a first call."""
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    inputs, dk, dv = operands()
    assert fa4_add.backward_add_(*inputs, True, 0.3, dk, dv) is None  # checked and kept
    if change == "deterministic":
        fresh.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    elif change == "dtype":
        inputs, dk, dv = [x.bfloat16() for x in inputs], dk.bfloat16(), dv.bfloat16()
    else:
        tiles = (64, 128, 2, 2, 1, True, False, False, 1, 2, 1)
        fresh.setitem(fa4.BACKWARD_CONFIG, (inputs[1].shape[-1], True), tiles)
    old = dk.clone(), dv.clone()
    assert fa4_add.backward_add_(*inputs, True, 0.3, dk, dv) is None  # its own first call
    torch.testing.assert_close((dk, dv), old)
    assert len(fa4_add._CHECKED) == 2


def test_no_first_call_while_a_cuda_graph_is_captured(fresh):
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    fresh.setattr(fa4, "capturing", lambda q: True)
    inputs, dk, dv = operands()
    old = dk.clone(), dv.clone()
    assert fa4_add.backward_add_(*inputs, False, 0.3, dk, dv) is None
    assert fake.adding_runs == 0 and not fa4_add._CHECKED
    torch.testing.assert_close((dk, dv), old)


def test_supported_only_where_the_sm90_kernels_run(monkeypatch):
    monkeypatch.setattr(fa4, "available", lambda q: True)
    monkeypatch.setattr(fa4, "sm90", lambda q: False)
    assert not fa4_add.supported(torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16))
