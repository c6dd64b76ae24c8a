"""``lse`` blocks merged by FA4's forward itself (``ringattn.kernels.fa4_merge``), without a GPU.

The fused kernel runs only on SM90 GPUs (held to the float64 merge there by
``experiments/fa4_probe.py --part merge`` and to the oracle by ``experiments/flex_gpu.py --part
check``). Here, on the FA4 stand-in of ``tests/fake_fa4.py``:

* the core's wiring: which launches are offered the one-kernel merge, that the views it gets
  are the accumulators' own rows (a stand-in that merges into them must still match the oracle,
  and one that declines must leave the core to merge), outputs and gradients;
* the first-call guard: a kernel is kept only if it agrees with the two-kernel path on the
  blocks' first entries (``fa4.CHECKED_BATCH``, restored after), then merges the whole call once;
  one that fails to compile or disagrees is refused with a warning and never called again, and
  the core's two kernels merge the call (the oracle holds either way).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import problems
from fake_fa4 import FakeFA4, installed
from hypothesis import given
from hypothesis import strategies as st
from test_fa4 import (
    KERNEL_DIMS,
    PLACED,
    kernel_layouts,
    merges_blocks,
    sdpa_strategies,
    with_fixture,
)
from test_strategies import check_against_oracle

from ringattn.kernels import fa4, fa4_merge
from ringattn.merge import merge_into_

# lse: the r = 1 config covers every row (it becomes the accumulator); the r = 2 one merges
MERGED = {**PLACED, "mixing": "lse"}


class StandIn:
    """``fa4_merge.forward_merge_`` on the CPU: FA4's forward (the stand-in's) merged into the
    views it is given, after checking their contract; declines every ``decline``-th call."""

    def __init__(self, decline: int = 0) -> None:
        self.calls = self.merged = 0
        self.decline = decline

    def __call__(self, q, k, v, causal, scale, out, lse) -> bool:
        self.calls += 1
        assert q.dim() == 4 and k.shape == q.shape and v.shape == q.shape and out.shape == q.shape
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
        assert fa4_merge.layout_ok(q, k, v, out, lse)
        if self.decline and self.calls % self.decline == 0:
            return False
        merge_into_(out, lse, *fa4.forward(q, k, v, causal, scale))
        self.merged += 1
        return True


@pytest.fixture
def fused(monkeypatch):
    """FA4's stand-in installed, the one-kernel merge offered wherever the layouts allow it."""
    monkeypatch.setattr(fa4_merge, "supported", fa4_merge.layout_ok)
    with installed(FakeFA4()):
        yield monkeypatch


@pytest.mark.parametrize("causal", [False, True])
def test_merged_blocks_go_through_one_kernel(fused, causal):
    stand_in = StandIn()
    fused.setattr(fa4_merge, "forward_merge_", stand_in)
    check_against_oracle({**MERGED, "causal": causal}, torch.float32, sdpa_strategies())
    assert stand_in.merged > 0


@with_fixture(max_examples=15)
@given(problems(dims=KERNEL_DIMS, mixings=("lse",)), st.sampled_from([0, 2, 3]))
def test_any_problem_matches_oracle_whichever_launches_merge(fused, p, decline):
    """Declined calls (nothing written) leave the merge to the core: every mix still matches.
    Every problem that merges blocks in views the kernel takes offers them to it."""
    stand_in = StandIn(decline)
    fused.setattr(fa4_merge, "forward_merge_", stand_in)
    check_against_oracle(p, torch.float32, sdpa_strategies())
    if kernel_layouts(p) and merges_blocks(p):
        assert stand_in.calls > 0


def test_float64_is_not_offered_the_kernel(fused):
    """Float64 blocks stay on torch's kernels: FA4 takes no float64 block (``fa4._DTYPES``, which
    the stand-in's ``available`` mirrors), and the kernel's own layout check refuses a float64
    LSE accumulator, whatever the blocks' dtype."""
    assert torch.float64 not in fa4._DTYPES
    q, k, v, out = (torch.zeros(2, 8, 2, 8) for _ in range(4))
    assert fa4_merge.layout_ok(q, k, v, out, torch.zeros(2, 8, 2))
    assert not fa4_merge.layout_ok(q, k, v, out, torch.zeros(2, 8, 2, dtype=torch.float64))
    stand_in = StandIn()
    fused.setattr(fa4_merge, "forward_merge_", stand_in)
    check_against_oracle({**MERGED, "causal": True}, torch.float64, sdpa_strategies())
    assert stand_in.calls == 0


def operands(seed: int = 0):
    """Strided ``[B, L, H, d]`` blocks and accumulator rows (every other row of a bigger
    tensor, as ``segment_local`` makes them), some rows not selected yet (LSE -inf, output 0)."""
    gen = torch.Generator().manual_seed(seed)
    b, length, h, d = 3, 10, 2, 8

    def rows(*tail):
        return torch.randn(b, length, 2, *tail, generator=gen)[:, :, 1]

    q, k, v, out = (rows(h, d) for _ in range(4))
    lse = rows(h)
    lse[:, ::3, 0] = float("-inf")
    out[:, ::3, 0] = 0
    return q, k, v, out, lse


def two_kernel(q, k, v, causal, out, lse):
    out, lse = out.clone(), lse.clone()
    merge_into_(out, lse, *fa4.forward(q, k, v, causal, 0.3))
    return out, lse


@pytest.fixture
def fresh(monkeypatch):
    """The stand-in installed and no compiled kernel yet."""
    monkeypatch.setattr(fa4_merge, "_COMPILED", {})
    with installed(FakeFA4()):
        yield monkeypatch


class FakeKernel:
    """A "compiled" kernel: merges correctly, or writes ``wrong`` into the output (``lse_wrong``
    into the LSE), or raises (after it wrote: a launch may fail midway)."""

    def __init__(
        self,
        causal: bool,
        wrong: float | None = None,
        fail: bool = False,
        lse_wrong: float | None = None,
    ) -> None:
        self.causal, self.wrong, self.fail, self.runs = causal, wrong, fail, 0
        self.lse_wrong = lse_wrong
        self.batches: list[int] = []  # each run's entries

    def __call__(self, q, k, v, out, lse_bhl, scale, *none_args) -> None:
        self.runs += 1
        self.batches.append(q.shape[0])
        assert 0 not in (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_bhl.stride())
        merge_into_(out, lse_bhl.transpose(1, 2), *fa4.forward(q, k, v, self.causal, scale))
        if self.wrong is not None:
            out.fill_(self.wrong)
        if self.lse_wrong is not None:
            lse_bhl.fill_(self.lse_wrong)
        if self.fail:
            raise RuntimeError("no such kernel")


@pytest.mark.parametrize("causal", [False, True])
def test_first_call_keeps_a_kernel_that_agrees(fresh, causal):
    kernel = FakeKernel(causal)
    fresh.setattr(fa4_merge, "_compile", lambda key, *args: kernel)
    q, k, v, out, lse = operands()
    expected = two_kernel(q, k, v, causal, out, lse)
    assert fa4_merge.forward_merge_(q, k, v, causal, 0.3, out, lse)
    torch.testing.assert_close((out, lse), expected)  # merged once, not twice
    assert fa4_merge.forward_merge_(q, k, v, causal, 0.3, *operands()[3:])
    # checked on the first entries only (a whole 2M-token block's copies took GBs), then the
    # call's blocks launched whole; the later call goes straight to the kernel
    assert q.shape[0] > fa4.CHECKED_BATCH
    assert kernel.batches == [fa4.CHECKED_BATCH, q.shape[0], q.shape[0]]
    assert list(fa4_merge._COMPILED.values()) == [kernel]


@pytest.mark.parametrize(
    ("kernel", "why"),
    [
        (FakeKernel(False, wrong=0.5), "disagreed"),
        (FakeKernel(False, wrong=float("nan")), "disagreed"),
        (FakeKernel(False, lse_wrong=0.5), "disagreed"),  # the output right, the LSE not
        (FakeKernel(False, fail=True), "failed to compile or launch"),
    ],
)
def test_first_call_refuses_a_kernel_that_disagrees_or_fails(fresh, kernel, why):
    fresh.setattr(fa4_merge, "_compile", lambda key, *args: kernel)
    q, k, v, out, lse = operands()
    before = out.clone(), lse.clone()
    with pytest.warns(RuntimeWarning, match=why):
        assert not fa4_merge.forward_merge_(q, k, v, False, 0.3, out, lse)
    # untouched (the checked entries restored) for the caller to merge with two kernels
    assert torch.equal(out, before[0]) and torch.equal(lse, before[1])
    assert kernel.batches == [fa4.CHECKED_BATCH]  # never on the call's whole blocks
    runs = kernel.runs
    assert not fa4_merge.forward_merge_(q, k, v, False, 0.3, out, lse)  # never again
    assert kernel.runs == runs and fa4_merge._COMPILED


def test_disabled_switch_declines_without_work(fresh):
    kernel = FakeKernel(False)
    fresh.setattr(fa4_merge, "_compile", lambda key, *args: kernel)
    fresh.setattr(fa4_merge, "ENABLED", False)
    q, k, v, out, lse = operands()
    before = out.clone()
    assert not fa4_merge.forward_merge_(q, k, v, False, 0.3, out, lse)
    assert kernel.runs == 0 and torch.equal(out, before)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda x: x.update(lse=x["lse"].double()),  # float64 statistics
        lambda x: x.update(q=x["q"][..., ::2]),  # channels not contiguous
        lambda x: x.update(out=x["out"][:, :, :1]),  # a shape that is not q's
        lambda x: x.update(k=x["k"][:, :, :, 1:]),  # rows not 16-byte aligned (float32: 4)
        lambda x: x.update(v=x["v"][:1].expand(3, -1, -1, -1)),  # broadcast along B
        lambda x: x.update(lse=x["lse"][:, :, :1]),  # an LSE shape that is not q's rows
        lambda x: x.update(lse=x["lse"][:1].expand(3, -1, -1)),  # LSE broadcast along B
        lambda x: x.update(v=x["v"].double()),  # a dtype that is not q's (compiled for q's)
        lambda x: x.update(k=x["k"][..., 2:]),  # rows 8-byte aligned, not 16
        # heads 12 elements apart: a stride that is not a multiple of 16 bytes (in bf16)
        lambda x: x.update(q=torch.zeros(3, 10, 2, 12)[..., :8]),
        lambda x: x.update(k=x["k"][:, :, :1], v=x["v"][:, :, :1]),  # fewer K/V heads than q's
        lambda x: x.update(v=torch.zeros(3, 10, 2, 16)),  # v wider than q
        lambda x: x.update(k=x["k"][:1], v=x["v"][:1]),  # K/V of another batch size
        lambda x: x.update(v=x["v"][:, :6]),  # fewer values than keys
    ],
)
def test_layouts_the_kernel_cannot_take_are_refused(spoil):
    x = dict(zip(("q", "k", "v", "out", "lse"), operands()))
    assert fa4_merge.layout_ok(**x)
    spoil(x)
    assert not fa4_merge.layout_ok(**x)


def test_a_block_with_fewer_keys_than_queries_is_taken():
    """Keys are as many as the block's columns (a causal or cross-rank block): only their
    batch, heads and width must be q's."""
    q, k, v, out, lse = operands()
    assert fa4_merge.layout_ok(q, k[:, :6], v[:, :6], out, lse)


def test_unit_dims_of_stride_zero_are_restrided():
    x = torch.randn(1, 10, 2, 8).expand(1, 10, 2, 8)
    y = x.as_strided((1, 10, 2, 8), (0, 16, 8, 1))
    assert fa4_merge.layout_ok(y, y, y, y, torch.zeros(1, 10, 2))
    z = fa4_merge._unit_dims_restrided(y)
    assert 0 not in z.stride() and torch.equal(z, y) and z.data_ptr() == y.data_ptr()
    assert fa4_merge.layout_ok(z, z, z, z, torch.zeros(1, 10, 2))  # strides of 16 bytes still


def test_compile_keys_follow_the_lse_unit_stride():
    q = torch.zeros(2, 4, 3, 8)
    heads_contiguous = torch.zeros(2, 4, 3)
    strided_heads = torch.zeros(2, 4, 6)[..., ::2]
    keys = {
        fa4_merge._key(q, causal, lse)
        for causal, lse in itertools.product((False, True), (heads_contiguous, strided_heads))
    }
    assert len(keys) == 4
    assert fa4_merge._key(q, False, heads_contiguous)[3] == 1  # [B, H, L]: H has stride 1
    assert fa4_merge._key(q, False, strided_heads)[3] is None


def test_compile_keys_follow_dtype_head_dim_and_tiles(monkeypatch):
    """A kernel is compiled for its dtype, head dim and FORWARD_CONFIG's tiles: one compiled for
    bf16, d = 64 or other tiles must not be found for fp16, d = 128 or FA4's own tiles."""
    lse = torch.zeros(2, 4, 3)
    key = fa4_merge._key(torch.zeros(2, 4, 3, 64, dtype=torch.bfloat16), True, lse)
    assert key != fa4_merge._key(torch.zeros(2, 4, 3, 64, dtype=torch.float16), True, lse)
    assert key != fa4_merge._key(torch.zeros(2, 4, 3, 128, dtype=torch.bfloat16), True, lse)
    monkeypatch.setitem(fa4.FORWARD_CONFIG, True, (128, 128, False, True))
    assert key != fa4_merge._key(torch.zeros(2, 4, 3, 64, dtype=torch.bfloat16), True, lse)


def test_agreement_checks_of_the_first_calls():
    """fa4.output_agrees: within 4 units in the last place of the largest magnitude, at least
    1; fa4.lse_agrees: infinite in the same places and within 1e-3 elsewhere."""
    want = torch.tensor([2.0, -1.0])
    ulp = torch.finfo(torch.float32).eps
    assert fa4.output_agrees(want + torch.tensor([3 * ulp, 0]), want)[0]
    assert not fa4.output_agrees(want + torch.tensor([16 * ulp, 0]), want)[0]
    small = torch.tensor([1e-3, 0.0])  # (the floor of 1: an error of 1 ulp at 1 is fine)
    assert fa4.output_agrees(small + torch.tensor([ulp, 0]), small)[0]
    assert not fa4.output_agrees(torch.tensor([float("nan"), -1.0]), want)[0]
    lse = torch.tensor([0.5, float("-inf")])
    assert fa4.lse_agrees(lse + torch.tensor([1e-4, 0]), lse)
    assert not fa4.lse_agrees(lse + torch.tensor([1e-2, 0]), lse)
    assert not fa4.lse_agrees(torch.tensor([0.5, 0.0]), lse)  # finite where -inf belongs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_agreement_in_the_outputs_dtype_matches_float32s(dtype):
    """fa4.output_agrees takes the difference in the outputs' own dtype (float32 copies of
    whole blocks were most of a first forward's peak at 2M tokens, step 70): its verdict and
    error equal those of the float32 difference, for errors from 0 to 16 units in the last
    place around the bound's 4, on values of mixed sign and magnitude."""
    gen = torch.Generator().manual_seed(0)
    want = (torch.randn(64, 32, generator=gen) * 3).to(dtype)
    ulp = torch.finfo(dtype).eps * max(want.float().abs().max().item(), 1.0)
    for units in (0, 1, 3, 4, 5, 8, 16):
        got = want.clone()
        got.view(-1)[7] = (want.float().view(-1)[7] + units * ulp).to(dtype)
        err_32 = (got.float() - want.float()).abs().max().item()
        assert fa4.output_agrees(got, want) == (err_32 <= 4 * ulp, err_32)


def test_no_first_call_while_a_cuda_graph_is_captured(fresh):
    """A first call compiles and syncs to check its kernel: declined under capture (nothing
    written, no kernel tried), tried on the first call outside it."""
    kernel = FakeKernel(False)
    fresh.setattr(fa4_merge, "_compile", lambda key, *args: kernel)
    fresh.setattr(fa4, "capturing", lambda q: True)
    q, k, v, out, lse = operands()
    before = out.clone(), lse.clone()
    assert not fa4_merge.forward_merge_(q, k, v, False, 0.3, out, lse)
    assert kernel.runs == 0 and not fa4_merge._COMPILED
    torch.testing.assert_close((out, lse), before)


def test_supported_only_where_the_sm90_kernels_run(monkeypatch):
    """The merging forward subclasses FA4's SM90 kernel: FA4 available on another GPU (SM100)
    is not enough."""
    monkeypatch.setattr(fa4, "available", lambda q: True)
    monkeypatch.setattr(fa4, "sm90", lambda q: False)
    assert not fa4_merge.supported(*operands())
    monkeypatch.setattr(fa4, "sm90", lambda q: True)
    assert fa4_merge.supported(*operands())


def test_merger_calls_a_kept_kernel_without_the_checks(fresh):
    """A prepared launch's merger: the first call goes through the guard, later ones straight
    to the kept kernel (its key decided once), and merge exactly once each."""
    q, k, v, out, lse = operands()
    kernel = FakeKernel(True)
    plain_guard = fa4_merge.forward_merge_
    fresh.setattr(fa4_merge, "_compile", lambda key, *args: kernel)
    merge = fa4_merge.merger(q, k, v, True, out, lse)
    expected = two_kernel(q, k, v, True, out, lse)
    assert merge(q, k, v, 0.3, out, lse)
    torch.testing.assert_close((out, lse), expected)
    fresh.setattr(fa4_merge, "forward_merge_", None)  # not called again
    assert merge(q, k, v, 0.3, out, lse) and kernel.runs == 3  # (check, call, call)
    torch.testing.assert_close((out, lse), two_kernel(q, k, v, True, *expected))
    fresh.setattr(fa4_merge, "forward_merge_", plain_guard)
    fresh.setattr(fa4_merge, "ENABLED", False)  # switched off after: declined, nothing written
    before = out.clone()
    assert not merge(q, k, v, 0.3, out, lse) and kernel.runs == 3 and torch.equal(out, before)


def test_merger_restrides_unit_dims_of_stride_zero(fresh):
    """Views with a stride 0 along a size-1 dim (the kernel would compile it in as a constant)
    reach a kept kernel re-strided, through the merger as through the guard."""

    def unit_b(x):
        return x[:1].as_strided((1, *x.shape[1:]), (0, *x.stride()[1:]), x.storage_offset())

    q, k, v, out, lse = (unit_b(x) for x in operands())
    kernel = FakeKernel(True)  # (it asserts no stride is 0)
    fresh.setattr(fa4_merge, "_compile", lambda key, *args: kernel)
    merge = fa4_merge.merger(q, k, v, True, out, lse)
    expected = two_kernel(q, k, v, True, out, lse)
    assert merge(q, k, v, 0.3, out, lse)
    assert merge(q, k, v, 0.3, out, lse) and kernel.batches == [1, 1, 1]  # (check, 2 calls)
    torch.testing.assert_close((out, lse), two_kernel(q, k, v, True, *expected))


@pytest.mark.parametrize("fault", [None, "wrong", "fail"])
def test_a_first_call_through_the_core_matches_the_oracle_kept_or_refused(fused, fault):
    """The real guard under the core: a faithful kernel is checked on its blocks' first entries
    (restored after) and then merges all of them once; a refused one leaves the core's two
    kernels to merge every row. The oracle holds either way."""
    fused.setattr(fa4_merge, "_COMPILED", {})
    kernels: list[FakeKernel] = []

    def compile_(key, *args):
        kernels.append(FakeKernel(key[2], wrong=0.5 if fault == "wrong" else None))
        kernels[-1].fail = fault == "fail"
        return kernels[-1]

    fused.setattr(fa4_merge, "_compile", compile_)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if fault else "error", RuntimeWarning)
        # (n = 512: block parts (1/8 of a block each, pattern.BLOCK_SPLIT) of 4 entries)
        check_against_oracle({**MERGED, "causal": True, "n": 512}, torch.float32, sdpa_strategies())
    assert kernels and all(kernel.batches[0] <= fa4.CHECKED_BATCH for kernel in kernels)
    # (kept: launched on the call's blocks, more entries than were checked)
    launched = [batch for kernel in kernels for batch in kernel.batches[1:]]
    assert (max(launched, default=0) > fa4.CHECKED_BATCH) is (fault is None)
    assert (False in fa4_merge._COMPILED.values()) is (fault is not None)
