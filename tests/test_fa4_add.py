"""``lse`` gradients added by FA4's backward itself (``ringattn.kernels.fa4_add``), without a GPU.

The adding kernels (FA4's SM90 backward with its dK / dV stores as TMA reduce-adds, and its dQ
postprocess adding into dQ) run only on an SM90 GPU (held to the plain kernel plus the add there
by ``experiments/fa4_probe.py --part add`` and to the oracle by ``experiments/flex_gpu.py --part
check``; the postprocess compiles on the CPU too, ``experiments/cute_compile.py``). Here, on the
FA4 stand-in:

* the core's wiring: a stand-in that adds dK / dV (and dQ, or not) into the views it is handed
  and returns what it left must still give the oracle's gradients (so the views are the
  gradients' own rows and each is added exactly once), also when it declines some calls;
* the first-call guard: a kernel is kept only if its sums agree with the plain kernel's, is
  refused with a warning when it disagrees or fails (dQ's postprocess apart from dK / dV's
  kernel), and the gradients are never added twice.
"""

from __future__ import annotations

import pytest
import torch
from conftest import problems
from fake_fa4 import FakeFA4, installed
from hypothesis import given
from hypothesis import strategies as st
from test_fa4 import KERNEL_DIMS, merges_blocks, sdpa_strategies, with_fixture
from test_fa4_merge import MERGED
from test_strategies import check_against_oracle

from ringattn.kernels import fa4, fa4_add


class StandIn:
    """``fa4_add.backward_add_`` on the CPU: FA4's backward (the stand-in's, with the sums it is
    given), its dK / dV added into the views it is given, and its dQ on every ``dq_every``-th
    call (else returned); declines every ``decline``-th call."""

    def __init__(self, decline: int = 0, dq_every: int = 1) -> None:
        self.calls = self.added = self.given = 0
        self.decline, self.dq_every = decline, dq_every

    def __call__(self, dout, q, k, v, out, lse, causal, scale, dq, dk, dv, dlse=None):
        self.calls += 1
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert dk.dtype == q.dtype
        if self.decline and self.calls % self.decline == 0:
            return None
        # the core's shared sums (tests/test_fa4_dpsum.py), where given, are the dPsum FA4's
        # backward then takes: rows of another block's would give it wrong gradients
        self.given += dlse is not None
        dq_block, dk_block, dv_block = fa4.backward(
            dout, q, k, v, out, lse, causal, scale, dlse=dlse
        )
        dk.add_(dk_block), dv.add_(dv_block)
        self.added += 1
        if self.calls % self.dq_every == 0:
            dq.add_(dq_block)
            return ()
        return (dq_block,)


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
@given(
    problems(dims=KERNEL_DIMS, mixings=("lse",)),
    st.sampled_from([0, 2, 3]),
    st.sampled_from([1, 2, 1000]),
)
def test_any_problem_matches_oracle_whichever_launches_add(adding, p, decline, dq_every):
    """Every problem that merges blocks offers their backward to the kernel (offered at any
    layout here)."""
    stand_in = StandIn(decline, dq_every)
    adding.setattr(fa4_add, "backward_add_", stand_in)
    check_against_oracle(p, torch.float32, sdpa_strategies())
    if merges_blocks(p):
        assert stand_in.calls > 0


def operands(seed: int = 0):
    """``(dout, q, k, v, out, lse)`` blocks and gradient rows ``[dq, dk, dv]`` (strided views)."""
    gen = torch.Generator().manual_seed(seed)

    def rows(*tail):
        return torch.randn(3, 6, 2, *tail, generator=gen)[:, :, 0]  # (3 > fa4.CHECKED_BATCH)

    dout, q, k, v, out = (rows(3, 8) for _ in range(5))
    lse = rows(3).abs() + 1
    return (dout, q, k, v, out, lse), [rows(3, 8) for _ in range(3)]


class FakeAdding:
    """``fa4.backward`` whose ``kernels`` variants add dK / dV (plus ``error`` to dK,
    ``dv_error`` to dV) into the given rows, and under ``adding_all_kernels`` dQ too (plus
    ``dq_error``), or raise (``fail``: ``"all"`` or ``"any"`` of them); the plain variant is the
    stand-in's."""

    def __init__(self, error=0.0, fail="", dv_error=0.0, dq_error=0.0) -> None:
        self.error, self.dv_error, self.dq_error = error, dv_error, dq_error
        self.fail, self.adding_runs, self.all_runs = fail, 0, 0
        self.batches: list[int] = []  # each adding run's leading entries
        self.plain = fa4.backward

    def __call__(self, dout, q, k, v, out, lse, causal, scale, grads=None, kernels=None, dlse=None):
        assert dlse is None  # (no given sums here: tests/test_fa4_dpsum.py)
        if kernels is None:
            return self.plain(dout, q, k, v, out, lse, causal, scale, grads)
        adds_dq = kernels is fa4_add.adding_all_kernels
        assert adds_dq == (grads[0] is not None) and (adds_dq or kernels is fa4_add.adding_kernels)
        self.adding_runs += 1
        self.batches.append(q.shape[0])
        self.all_runs += adds_dq
        dq, dk, dv = self.plain(dout, q, k, v, out, lse, causal, scale)
        grads[1].add_(dk + self.error), grads[2].add_(dv + self.dv_error)
        if adds_dq:
            grads[0].add_(dq + self.dq_error)
        if self.fail == "any" or (self.fail == "all" and adds_dq):  # (after it added)
            raise RuntimeError("no such kernel")
        return (grads[0] if adds_dq else dq), grads[1], grads[2]


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(fa4_add, "_CHECKED", {})
    with installed(FakeFA4()):
        yield monkeypatch


def added(inputs, old, causal=False, scale=0.3):
    """The old gradient rows plus the plain backward's blocks."""
    blocks = fa4.backward(*inputs, causal, scale)
    return [o + block for o, block in zip(old, blocks, strict=True)]


@pytest.mark.parametrize("causal", [False, True])
def test_first_call_checks_a_few_entries_keeps_kernels_that_agree_and_adds(fresh, causal):
    """The check runs on the blocks' first ``fa4.CHECKED_BATCH`` entries (on whole blocks its
    copies ran an 80 GB H100 out of memory in lse's first forward+backward at 2M tokens, where
    every later call fits), then the call adds all three with the kernels it kept."""
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    inputs, grads = operands()
    for _ in range(2):
        old = [g.clone() for g in grads]
        assert fa4_add.backward_add_(*inputs, causal, 0.3, *grads) == ()  # all three added
        torch.testing.assert_close(grads, added(inputs, old, causal))
    assert fake.batches == [fa4.CHECKED_BATCH, 3, 3]  # (the check's, then the calls')
    assert list(fa4_add._CHECKED.values()) == [True, True]


def test_without_dq_rows_or_with_add_dq_off_dq_is_returned(fresh):
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    inputs, (dq, dk, dv) = operands()
    for _ in range(2):  # (checked, then added; added)
        old = dk.clone(), dv.clone()
        left = fa4_add.backward_add_(*inputs, False, 0.3, None, dk, dv)
        want = added(inputs, [torch.zeros_like(dq), *old])
        torch.testing.assert_close([*left, dk, dv], want)
    assert fake.all_runs == 0 and len(fa4_add._CHECKED) == 1  # (dQ's postprocess never tried)
    fresh.setattr(fa4_add, "ADD_DQ", False)
    dq_old = dq.clone()
    assert len(fa4_add.backward_add_(*inputs, False, 0.3, dq, dk, dv)) == 1
    torch.testing.assert_close(dq, dq_old)  # (left for the caller)
    assert fake.all_runs == 0 and len(fa4_add._CHECKED) == 1


@pytest.mark.parametrize(
    ("fake", "why"),
    [
        (FakeAdding(error=0.5), "disagreed"),
        (FakeAdding(error=float("nan")), "disagreed"),
        (FakeAdding(error=1e-4), "disagreed"),  # ~28 units in the last place, not 4
        # (a NaN in dV, after a finite dK error: max() of the two dropped it, and kept the kernel)
        (FakeAdding(dv_error=float("nan")), "disagreed"),
        (FakeAdding(fail="any"), "failed to compile or launch"),
    ],
)
@pytest.mark.parametrize("with_dq", [False, True])
def test_first_call_refuses_a_kernel_that_disagrees_or_fails(fresh, fake, why, with_dq):
    fresh.setattr(fa4, "backward", fake)
    inputs, grads = operands()
    if not with_dq:
        grads[0] = None
    old = [None if g is None else g.clone() for g in grads]
    with pytest.warns(RuntimeWarning, match=why):
        assert fa4_add.backward_add_(*inputs, False, 0.3, *grads) is None
    for got, want in zip(grads, old):  # untouched: the caller adds
        torch.testing.assert_close(got, want, equal_nan=False)
    runs = fake.adding_runs
    assert fa4_add.backward_add_(*inputs, False, 0.3, *grads) is None  # never again
    assert fake.adding_runs == runs


@pytest.mark.parametrize(
    ("fake", "why"),
    [
        (FakeAdding(dq_error=0.5), "disagreed"),
        (FakeAdding(dq_error=float("nan")), "disagreed"),
        (FakeAdding(fail="all"), "failed to compile or launch"),
    ],
)
def test_a_refused_dq_postprocess_leaves_dk_dv_added_in_the_kernel(fresh, fake, why):
    fresh.setattr(fa4, "backward", fake)
    inputs, grads = operands()
    # (where the postprocess failed to compile, dK / dV's kernel is checked alone in the same
    # call); each call adds dK and dV and leaves dQ to the caller, never added twice
    all_runs = []
    with pytest.warns(RuntimeWarning, match=f"dQ in its postprocess.*{why}"):
        for _ in range(2):
            old = [g.clone() for g in grads]
            left = fa4_add.backward_add_(*inputs, False, 0.3, *grads)
            want = added(inputs, old)
            torch.testing.assert_close([old[0] + left[0], *grads[1:]], want)
            torch.testing.assert_close(grads[0], old[0])
            all_runs.append(fake.all_runs)
    assert all_runs[1] == all_runs[0]  # never tried again


def test_disabled_or_empty_declines_without_work(fresh):
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    inputs, grads = operands()
    fresh.setattr(fa4_add, "ENABLED", False)
    assert fa4_add.backward_add_(*inputs, False, 0.3, *grads) is None
    fresh.setattr(fa4_add, "ENABLED", True)
    empty = [x[:, :0] for x in inputs]
    assert fa4_add.backward_add_(*empty, False, 0.3, *(g[:, :0] for g in grads)) is None
    assert fake.adding_runs == 0


@pytest.mark.parametrize("change", ["deterministic", "dtype", "tiles"])
def test_each_signature_is_checked_on_its_own(fresh, change):
    """A kernel kept for one signature is not taken for another (each is compiled apart): a
    deterministic backward, another dtype, or other BACKWARD_CONFIG tiles get a first call."""
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    inputs, grads = operands()
    assert fa4_add.backward_add_(*inputs, True, 0.3, *grads) == ()  # checked, kept, added
    if change == "deterministic":
        fresh.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    elif change == "dtype":
        inputs, grads = [x.bfloat16() for x in inputs], [g.bfloat16() for g in grads]
    else:
        tiles = (64, 128, 2, 2, 1, True, False, False, 1, 2, 1)
        fresh.setitem(fa4.BACKWARD_CONFIG, (inputs[1].shape[-1], True), tiles)
    old = [g.clone() for g in grads]
    assert fa4_add.backward_add_(*inputs, True, 0.3, *grads) == ()  # its own first call
    torch.testing.assert_close(grads, added(inputs, old, True))
    assert len(fa4_add._CHECKED) == 4  # (dK / dV's kernel and dQ's postprocess, twice)


def test_no_first_call_while_a_cuda_graph_is_captured(fresh):
    fake = FakeAdding()
    fresh.setattr(fa4, "backward", fake)
    fresh.setattr(fa4, "capturing", lambda q: True)
    inputs, grads = operands()
    old = [g.clone() for g in grads]
    assert fa4_add.backward_add_(*inputs, False, 0.3, *grads) is None
    assert fake.adding_runs == 0 and not fa4_add._CHECKED
    torch.testing.assert_close(grads, old)


def test_supported_only_where_the_sm90_kernels_run(monkeypatch):
    monkeypatch.setattr(fa4, "available", lambda q: True)
    monkeypatch.setattr(fa4, "sm90", lambda q: False)
    assert not fa4_add.supported(torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16))
