"""``head_groups``' unselected rows zeroed by FA4's forward itself (``ringattn.kernels.fa4_zero``),
without a GPU.

The kernel runs only on SM90 GPUs (held to FA4's forward there by ``experiments/fa4_probe.py
--part zero`` and to the oracle by ``experiments/flex_gpu.py --part check``). Here, on the FA4
stand-in of ``tests/fake_fa4.py``, with the core's fill replaced by one that poisons every pair
a block should write (NaN) and zeroes only the pairs of the selection it is given:

* the core's wiring: which launches are offered the zeroing kernel, the shifts they get, that
  the fill then skips exactly those configs (a stand-in that writes its rows and zeros must
  still match the oracle, and one that declines must leave the core to zero), and that a config
  whose blocks do not all zero (a tail segment) is left to the fill;
* the first-call guard: a kernel is kept only if its rows, LSE and zeros agree with FA4's
  forward on the blocks' first entries (``fa4.CHECKED_BATCH``), then launched on the whole call;
  one that fails to compile or disagrees is refused with a warning and never called again, and
  the core's plain path writes the call (the oracle holds either way).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_qkv, options, problems, rel_err
from fake_fa4 import FakeFA4, installed
from hypothesis import given
from hypothesis import strategies as st
from test_fa4 import (
    KERNEL_DIMS,
    PLACED,
    full_configs,
    kernel_layouts,
    sdpa_strategies,
    with_fixture,
)
from test_strategies import check_against_oracle

import ringattn.api
import ringattn.core
from ringattn import reference
from ringattn.kernels import fa4, fa4_merge, fa4_zero
from ringattn.kernels.unselected import shifted
from ringattn.pattern import Block, Job, make_plan

# h = 4 over configs (8, 1), (16, 2), (32, 4): the r = 2 and r = 4 groups leave rows out
ZEROED = {**PLACED, "segment_lengths": (8, 16, 32), "dilation_rates": (1, 2, 4), "h": 6}


def poisoning_fill(selections: list):
    """The core's fill, in torch: NaN into every pair some block should write, 0 into the
    pairs ``selection`` leaves out (recorded in ``selections``)."""

    def fill_(x, selection, memory) -> None:
        selections.append(selection)
        if selection is None:
            x.zero_()
            return
        x.fill_(float("nan"))
        rows = torch.arange(x.shape[1])
        for head, (rate, offset) in enumerate(zip(*selection)):
            x[:, rows % rate != offset, head] = 0

    return fill_


class StandIn:
    """``fa4_zero.forward_zero_`` on the CPU: FA4's (stand-in's) forward into the views it is
    given and zeros at its shifts, after checking their contract; declines every
    ``decline``-th call, and skips the zeros if ``lazy``."""

    def __init__(self, decline: int = 0, lazy: bool = False) -> None:
        self.calls = self.zeroed = 0
        self.decline, self.lazy = decline, lazy
        self.shifts: set[tuple[int, ...]] = set()

    def __call__(self, q, k, v, causal, scale, out, lse, shifts) -> bool:
        self.calls += 1
        assert fa4_zero.supported(q, k, v, out, lse, shifts)
        storage = out.untyped_storage().nbytes() // out.element_size()
        for shift in shifts:  # every neighbour row lies inside the output
            view = shifted(out, shift)
            lo = view.storage_offset()
            hi = lo + sum((size - 1) * stride for size, stride in zip(view.shape, view.stride()))
            assert lo >= 0 and hi < storage
        self.shifts.add(shifts)
        if self.decline and self.calls % self.decline == 0:
            return False
        out_block, lse_block = fa4.forward(q, k, v, causal, scale)
        out.copy_(out_block)
        if lse is not None:
            lse.copy_(lse_block)
        if not self.lazy:
            for shift in shifts:
                shifted(out, shift).zero_()
        self.zeroed += 1
        return True


@pytest.fixture
def zeroing(monkeypatch):
    """FA4's stand-in installed, the zeroing kernel offered wherever the layouts allow it, the
    core's fill poisoning what the blocks write; yields (monkeypatch, selections the fill got)."""
    selections: list = []
    monkeypatch.setattr(
        fa4_zero,
        "supported",
        lambda q, k, v, out, lse, shifts: bool(shifts) and fa4_merge.layout_ok(q, k, v, out, lse),
    )
    monkeypatch.setattr(ringattn.core, "fill_unselected_", poisoning_fill(selections))
    with installed(FakeFA4()):
        yield monkeypatch, selections


@pytest.mark.parametrize(("causal", "decline"), [(False, 0), (True, 0), (True, 2)])
def test_placed_blocks_write_their_own_zeros(zeroing, causal, decline):
    """Declined calls (every other one) are zeroed by the core, not by the fill."""
    patch, selections = zeroing
    stand_in = StandIn(decline)
    patch.setattr(fa4_zero, "forward_zero_", stand_in)
    check_against_oracle({**ZEROED, "causal": causal}, torch.float32, sdpa_strategies())
    assert stand_in.zeroed > 0 and (not decline or stand_in.zeroed < stand_in.calls)
    # n = 64: full segments only, so the forward's fill skips the r = 2 and r = 4 groups
    # (heads 2-5); the backward's (gradients) and global dilation's (no launches) do not
    assert set(selections) == {((1,) * 6, (0,) * 6), ((1, 1, 2, 2, 4, 4), (0, 0, 1, 1, 2, 2))}
    # shifts: (k - o) rows of h * d = 48 elements, o = g mod r for group g = 1, 2
    assert {(-48,), (-96, -48, 48)} <= stand_in.shifts


def test_a_launch_that_skips_its_zeros_fails_the_oracle(zeroing):
    """The poisoning fill makes the zeros the launches' job: without them, NaN stays."""
    patch, _ = zeroing
    patch.setattr(fa4_zero, "forward_zero_", StandIn(lazy=True))
    with pytest.raises(AssertionError, match="rel err"):
        check_against_oracle({**ZEROED, "causal": True}, torch.float32, sdpa_strategies())


@with_fixture(max_examples=15)
@given(problems(dims=KERNEL_DIMS, mixings=("head_groups",)), st.sampled_from([0, 2, 3]))
def test_any_problem_matches_oracle_whichever_launches_zero(zeroing, p, decline):
    """Declined calls (nothing written) are zeroed by the core; tail segments by the fill.
    Every full segment of a config that leaves rows out (r > 1) is offered to the kernel."""
    stand_in = StandIn(decline)
    zeroing[0].setattr(fa4_zero, "forward_zero_", stand_in)
    check_against_oracle(p, torch.float32, sdpa_strategies())
    if kernel_layouts(p) and any(r > 1 for _, r in full_configs(p)):
        assert stand_in.calls > 0


def test_a_config_with_a_tail_is_left_to_the_fill(zeroing):
    patch, selections = zeroing
    stand_in = StandIn()
    patch.setattr(fa4_zero, "forward_zero_", stand_in)
    # n = 72: the (16, 2) and (32, 4) configs end in a tail segment (its groups may end past n)
    check_against_oracle({**ZEROED, "n": 72, "causal": True}, torch.float32, sdpa_strategies())
    assert stand_in.zeroed > 0  # their full segments still zero their own rows
    assert (1, 1, 2, 2, 4, 4) in {s[0] for s in selections if s is not None}
    assert ((1,) * 6, (0,) * 6) not in selections


def test_neighbour_shifts():
    out = torch.zeros(1, 64, 5, 4)  # [b, n, h, d]; its rows [b * S, L, H, d] at (32, 4)
    rows = out.as_strided((2, 8, 3, 4), (32 * 20, 4 * 20, 4, 1), 20)
    job = Job(config=1, w=32, r=4, offset=1, head_start=0, head_stop=3, head_step=1)
    assert ringattn.core.neighbour_shifts(Block(job, 0, 2, 8, tail=False), rows) == (-20, 20, 40)
    assert ringattn.core.neighbour_shifts(Block(job, 64, 1, 3, tail=True), rows) == ()
    plain = Job(config=0, w=8, r=1, offset=0, head_start=0, head_stop=3, head_step=1)
    assert ringattn.core.neighbour_shifts(Block(plain, 0, 2, 8, tail=False), rows) == ()


def test_a_tail_without_selected_rows_is_left_to_the_fill(zeroing):
    """n = 3 at (2, 2) offset 1: row 2 (the tail) is selected by nothing, so no block covers it."""
    patch, selections = zeroing
    stand_in = StandIn()
    patch.setattr(fa4_zero, "forward_zero_", stand_in)
    p = {"b": 1, "n": 3, "h": 2, "d": 8, "segment_lengths": (1, 2), "dilation_rates": (1, 2)}
    check_against_oracle(
        {**p, "causal": False, "mixing": "head_groups"}, torch.float32, sdpa_strategies()
    )
    assert stand_in.zeroed > 0 and ((1, 1), (0, 0)) not in selections


def test_unzeroed_selection_marks_only_configs_whose_parts_all_zero():
    plan = make_plan(64, 6, ((8, 1), (16, 2), (32, 4)), "head_groups")

    def zeroing_launch():
        pass

    zeroing_launch.zeroes_unselected = True
    by_config = {i: block.job.config for i, block in enumerate(plan.blocks)}
    launches = {
        i: tuple((None, zeroing_launch if config == 2 else print) for _ in plan.parts[i])
        for i, config in by_config.items()
    }
    zeroed = ringattn.core.zeroing_blocks(launches)
    rates, offsets = ringattn.core.unzeroed_selection(plan, zeroed)
    assert rates == (1, 1, 2, 2, 1, 1) and offsets == (0, 0, 1, 1, 0, 0)
    assert ringattn.core.unzeroed_selection(plan, ()) == plan.selection
    assert ringattn.core.unzeroed_selection(make_plan(64, 6, ((8, 2),), "lse"), ()) is None


def operands(seed: int = 0, lse: bool = True):
    """A ``(16, 4)`` block's rows ``[B, L, H, d]`` (offset 1) of ``[2, 32, 2, 8]`` tensors and
    its neighbours' shifts."""
    gen = torch.Generator().manual_seed(seed)
    b, n, h, d, r, o = 2, 32, 2, 8, 4, 1

    def rows(x):  # [b, n, h, ...] -> its selected rows as [b * 2 segments, 4, h, ...]
        return x.unflatten(1, (2, 16))[:, :, o::r].flatten(0, 1)

    q, k, v = (rows(torch.randn(b, n, h, d, generator=gen)) for _ in range(3))
    out_full = torch.randn(b, n, h, d, generator=gen)
    lse_full = torch.randn(b, n, h, generator=gen)
    shifts = tuple((k_ - o) * h * d for k_ in range(r) if k_ != o)
    return q, k, v, rows(out_full), rows(lse_full) if lse else None, shifts, out_full


@pytest.fixture
def fresh(monkeypatch):
    """The stand-in installed and no compiled kernel yet."""
    monkeypatch.setattr(fa4_zero, "_COMPILED", {})
    with installed(FakeFA4()):
        yield monkeypatch


class FakeKernel:
    """A "compiled" kernel: writes rows, LSE and zeros, or skips the zeros (``lazy``), or writes
    ``wrong`` into the output (``lse_wrong`` into the LSE), or raises."""

    def __init__(self, causal, shifts, lazy=False, wrong=None, fail=False, lse_wrong=None) -> None:
        self.causal, self.shifts, self.runs = causal, shifts, 0
        self.lazy, self.wrong, self.fail, self.lse_wrong = lazy, wrong, fail, lse_wrong
        self.batches: list[int] = []  # each run's entries

    def __call__(self, q, k, v, out, lse_bhl, scale) -> None:
        self.runs += 1
        self.batches.append(q.shape[0])
        if self.fail:
            raise RuntimeError("no such kernel")
        out_block, lse_block = fa4.forward(q, k, v, self.causal, scale)
        out.copy_(out_block if self.wrong is None else torch.full_like(out, self.wrong))
        assert 0 not in (*q.stride(), *k.stride(), *v.stride(), *out.stride())
        if lse_bhl is not None:
            lse_bhl.transpose(1, 2).copy_(lse_block)
            if self.lse_wrong is not None:
                lse_bhl.fill_(self.lse_wrong)
        if not self.lazy:
            for shift in self.shifts:
                shifted(out, shift).zero_()


def expected(q, k, v, causal, out_full, shifts, lse):
    """The rows written, the neighbours zeroed, everything else of out as it was."""
    out_full = out_full.clone()
    rows = out_full.unflatten(1, (2, 16))[:, :, 1::4].flatten(0, 1)
    out_block, lse_block = fa4.forward(q, k, v, causal, 0.3)
    rows.copy_(out_block)
    for shift in shifts:
        shifted(rows, shift).zero_()
    return out_full, (None if lse is None else lse_block)


@pytest.mark.parametrize(("causal", "with_lse"), [(False, True), (True, True), (True, False)])
def test_first_call_keeps_a_kernel_that_agrees(fresh, causal, with_lse):
    q, k, v, out, lse, shifts, out_full = operands(lse=with_lse)
    kernel = FakeKernel(causal, shifts)
    fresh.setattr(fa4_zero, "_compile", lambda key, *args: kernel)
    out_want, lse_want = expected(q, k, v, causal, out_full, shifts, lse)
    assert fa4_zero.forward_zero_(q, k, v, causal, 0.3, out, lse, shifts)
    torch.testing.assert_close(out_full, out_want)
    if with_lse:
        torch.testing.assert_close(lse, lse_want)
    assert fa4_zero.forward_zero_(q, k, v, causal, 0.3, out, lse, shifts)
    # checked on the first entries only (a whole 2M-token block's copies took GBs), then the
    # call's blocks launched whole; the later call goes straight to the kernel
    assert q.shape[0] > fa4.CHECKED_BATCH
    assert kernel.batches == [fa4.CHECKED_BATCH, q.shape[0], q.shape[0]]
    assert list(fa4_zero._COMPILED.values()) == [kernel]


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda s: FakeKernel(False, s, lazy=True), "neighbour zeros wrong"),
        (lambda s: FakeKernel(False, s, wrong=0.5), "disagreed"),
        (lambda s: FakeKernel(False, s, wrong=float("nan")), "disagreed"),
        (lambda s: FakeKernel(False, s, lse_wrong=0.5), "LSE wrong"),
        (lambda s: FakeKernel(False, s, fail=True), "failed to compile or launch"),
    ],
)
def test_first_call_refuses_a_kernel_that_disagrees_or_fails(fresh, make, why):
    q, k, v, out, lse, shifts, out_full = operands()
    kernel = make(shifts)
    fresh.setattr(fa4_zero, "_compile", lambda key, *args: kernel)
    before = out_full.clone(), lse.clone()
    with pytest.warns(RuntimeWarning, match=why):
        assert not fa4_zero.forward_zero_(q, k, v, False, 0.3, out, lse, shifts)
    # run on the checked entries only: the others' segments (rows and neighbours) untouched,
    # for the caller's plain path, which writes every row (test_a_refused_kernel_...)
    assert kernel.batches == [fa4.CHECKED_BATCH]
    segments = out_full.shape[0] * 2  # (operands(): [2, 32] rows as 2 segments of 16 each)
    assert torch.equal(
        out_full.unflatten(1, (2, 16)).flatten(0, 1)[fa4.CHECKED_BATCH : segments],
        before[0].unflatten(1, (2, 16)).flatten(0, 1)[fa4.CHECKED_BATCH : segments],
    )
    assert torch.equal(lse[fa4.CHECKED_BATCH :], before[1][fa4.CHECKED_BATCH :])
    runs = kernel.runs
    assert not fa4_zero.forward_zero_(q, k, v, False, 0.3, out, lse, shifts)  # never again
    assert kernel.runs == runs


def test_disabled_switch_declines_without_work(fresh):
    q, k, v, out, lse, shifts, out_full = operands()
    kernel = FakeKernel(False, shifts)
    fresh.setattr(fa4_zero, "_compile", lambda key, *args: kernel)
    fresh.setattr(fa4_zero, "ENABLED", False)
    before = out_full.clone()
    assert not fa4_zero.forward_zero_(q, k, v, False, 0.3, out, lse, shifts)
    assert kernel.runs == 0 and torch.equal(out_full, before)


def test_misaligned_shifts_are_not_offered_the_kernel(monkeypatch):
    monkeypatch.setattr(fa4, "sm90", lambda q: True)
    q, k, v, out, lse, shifts, _ = operands()
    assert fa4_zero.supported(q, k, v, out, lse, shifts)
    assert not fa4_zero.supported(q, k, v, out, lse, (2,))  # 8 bytes: vector stores misaligned
    assert not fa4_zero.supported(q, k, v, out, lse, ())
    q, k, v, out = (x.to(torch.bfloat16) for x in (q, k, v, out))  # 16 bytes: 8 elements
    assert fa4_zero.supported(q, k, v, out, lse, (8, -16))
    assert not fa4_zero.supported(q, k, v, out, lse, (4,))


def test_supported_only_where_the_sm90_kernels_run(monkeypatch):
    monkeypatch.setattr(fa4, "available", lambda q: True)
    monkeypatch.setattr(fa4, "sm90", lambda q: False)
    assert not fa4_zero.supported(*operands()[:-1])


def test_a_kernel_that_skips_zeros_already_there_is_refused(fresh):
    """The neighbours are poisoned before the first call: a kernel that writes no zeros fails
    even where the memory held zeros already (a fresh buffer; later calls reuse dirty ones)."""
    q, k, v, out, lse, shifts, _ = operands()
    for shift in shifts:
        shifted(out, shift).zero_()
    kernel = FakeKernel(False, shifts, lazy=True)
    fresh.setattr(fa4_zero, "_compile", lambda key, *args: kernel)
    with pytest.warns(RuntimeWarning, match="neighbour zeros wrong"):
        assert not fa4_zero.forward_zero_(q, k, v, False, 0.3, out, lse, shifts)
    assert list(fa4_zero._COMPILED.values()) == [False]


def test_compile_keys_follow_the_shifts_and_the_lse():
    """A kernel zeroes the shifts it was compiled with and writes an LSE only if compiled with
    one: neither may be found for other shifts, or for a call with (without) an LSE."""
    q, _, _, _, lse, shifts, _ = operands()
    strided_heads = torch.zeros(*lse.shape[:2], 2 * lse.shape[2])[..., ::2]  # (no unit stride)
    keys = {
        fa4_zero._key(q, False, lse, shifts),
        fa4_zero._key(q, False, lse, shifts[:1]),
        fa4_zero._key(q, False, None, shifts),
        fa4_zero._key(q, False, None, shifts[:1]),
        fa4_zero._key(q, False, strided_heads, shifts),
    }
    assert len(keys) == 5


def test_no_first_call_while_a_cuda_graph_is_captured(fresh):
    q, k, v, out, lse, shifts, out_full = operands()
    kernel = FakeKernel(False, shifts)
    fresh.setattr(fa4_zero, "_compile", lambda key, *args: kernel)
    fresh.setattr(fa4, "capturing", lambda q: True)
    before = out_full.clone()
    assert not fa4_zero.forward_zero_(q, k, v, False, 0.3, out, lse, shifts)
    assert kernel.runs == 0 and not fa4_zero._COMPILED and torch.equal(out_full, before)


def test_switched_off_at_preparation_the_fill_does_it_all(zeroing):
    patch, selections = zeroing
    stand_in = StandIn()
    patch.setattr(fa4_zero, "forward_zero_", stand_in)
    patch.setattr(fa4_zero, "ENABLED", False)
    check_against_oracle({**ZEROED, "causal": True}, torch.float32, sdpa_strategies())
    assert stand_in.calls == 0 and set(selections) == {((1, 1, 2, 2, 4, 4), (0, 0, 1, 1, 2, 2))}


def flipped_on_a_live_module(patch, flips: list, between) -> None:
    """Two no-grad calls of one module of ``ZEROED`` (causal) whose blocks are prepared launches
    (segment_local's views, ``sdpa``): ``between()`` after the first, then ``flips`` ((owner,
    name, value) each) patched; the second call's output against the oracle."""
    problem = {**ZEROED, "causal": True}
    strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa")
    attention = ringattn.DilatedAttention(**options(problem), strategy=strategy, compile=False)
    q, k, v = make_qkv(problem)
    with torch.no_grad():
        attention(q, k, v)
        between()
        for owner, name, value in flips:
            patch.setattr(owner, name, value)
        out = attention(q, k, v)
    ref = reference.dilated_attention(q.double(), k.double(), v.double(), **options(problem))
    assert rel_err(out, ref) < 1e-5


def test_switched_off_on_a_live_module_the_fill_does_it_all(zeroing):
    """fa4_zero.ENABLED is in SDPAComputer.launch_options: flipped on a module that already
    ran, its next call is prepared anew, without the zeroing launches (their calls stop, the
    fill zeroes every config's rows again), not run through the launches of before."""
    patch, selections = zeroing
    stand_in = StandIn()
    patch.setattr(fa4_zero, "forward_zero_", stand_in)
    calls = []

    def first_call_zeroed() -> None:
        assert stand_in.calls > 0 and selections == [((1,) * 6, (0,) * 6)]
        calls.append(stand_in.calls)
        selections.clear()

    flipped_on_a_live_module(patch, [(fa4_zero, "ENABLED", False)], first_call_zeroed)
    assert [stand_in.calls] == calls
    assert selections == [((1, 1, 2, 2, 4, 4), (0, 0, 1, 1, 2, 2))]


def test_zeroer_calls_a_kept_kernel_without_the_checks(fresh):
    q, k, v, out, lse, shifts, out_full = operands()
    kernel = FakeKernel(True, shifts)
    plain_guard = fa4_zero.forward_zero_
    fresh.setattr(fa4_zero, "_compile", lambda key, *args: kernel)
    zero = fa4_zero.zeroer(q, k, v, True, out, lse, shifts)
    out_want, lse_want = expected(q, k, v, True, out_full, shifts, lse)
    assert zero(q, k, v, 0.3, out, lse)
    fresh.setattr(fa4_zero, "forward_zero_", None)  # not called again
    out_full.fill_(float("nan"))
    assert zero(q, k, v, 0.3, out, lse) and kernel.runs == 3  # (check, call, call)
    torch.testing.assert_close((out_full, lse), (out_want, lse_want))
    fresh.setattr(fa4_zero, "forward_zero_", plain_guard)
    fresh.setattr(fa4_zero, "ENABLED", False)  # switched off after: declined, nothing written
    assert not zero(q, k, v, 0.3, out, lse) and kernel.runs == 3
    torch.testing.assert_close((out_full, lse), (out_want, lse_want))


def test_zeroer_restrides_unit_dims_of_stride_zero(fresh):
    """Views with a stride 0 along a size-1 dim (the kernel would compile it in as a constant)
    reach a kept kernel re-strided (it asserts no stride is 0), through the zeroer as through
    the guard."""

    def unit_b(x):
        return x[:1].as_strided((1, *x.shape[1:]), (0, *x.stride()[1:]), x.storage_offset())

    q, k, v, out, lse, shifts, _ = operands()
    q, k, v, out, lse = (unit_b(x) for x in (q, k, v, out, lse))
    kernel = FakeKernel(True, shifts)
    fresh.setattr(fa4_zero, "_compile", lambda key, *args: kernel)
    zero = fa4_zero.zeroer(q, k, v, True, out, lse, shifts)
    assert zero(q, k, v, 0.3, out, lse) and zero(q, k, v, 0.3, out, lse)
    assert kernel.batches == [1, 1, 1]  # (one entry: checked whole, then two calls)


@pytest.mark.parametrize("fault", [None, "lazy", "wrong"])
def test_a_first_call_through_the_core_matches_the_oracle_kept_or_refused(zeroing, fault):
    """The real guard under the core: a faithful kernel is checked on its blocks' first entries
    and then launched on all of them; a refused one (NaN neighbours or wrong rows left in the
    checked entries) leaves the core's plain path to write every row. The oracle holds either
    way."""
    patch, _ = zeroing
    patch.setattr(fa4_zero, "_COMPILED", {})
    kernels: list[FakeKernel] = []

    def compile_(key, *args):
        causal, shifts = key[2], key[-1]
        wrong = 0.5 if fault == "wrong" else None
        kernels.append(FakeKernel(causal, shifts, lazy=fault == "lazy", wrong=wrong))
        return kernels[-1]

    patch.setattr(fa4_zero, "_compile", compile_)
    problem = {**ZEROED, "causal": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if fault else "error", RuntimeWarning)
        check_against_oracle(problem, torch.float32, sdpa_strategies())
    assert kernels and all(kernel.batches[0] <= fa4.CHECKED_BATCH for kernel in kernels)
    # (kept: launched on the call's blocks, more entries than were checked)
    launched = [batch for kernel in kernels for batch in kernel.batches[1:]]
    assert (max(launched, default=0) > fa4.CHECKED_BATCH) is (fault is None)
    if fault:
        assert set(fa4_zero._COMPILED.values()) == {False}
