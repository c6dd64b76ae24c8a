"""``sdpa`` on FlashAttention-4 (``ringattn.kernels.fa4``), without a GPU.

FA4 runs only on SM90+ GPUs (checked there: ``experiments/flex_gpu.py --part check``). What can
go wrong on our side is the wiring: which blocks reach it, in which layout (``[B, L, H, d]``
operands, the LSE as ``[B, H, L]`` float32, merged ``out``/``lse``), and whether placed outputs
and gradients land in the strided views handed to it. So here stand-ins with FA4's signatures
and contracts (``_flash_attn_fwd`` / ``_flash_attn_bwd``: they assert the layouts, compute
attention and its flash backward in float64, write ``out`` / ``dq``, ``dk``, ``dv`` when given)
replace the kernels, and every ``sdpa`` strategy's outputs and gradients are held to the float64
oracle through them.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from conftest import make_qkv, options, problems
from hypothesis import HealthCheck, given, settings
from test_strategies import check_against_oracle

import ringattn
from ringattn.computers.sdpa import SDPAComputer
from ringattn.kernels import fa4


def _scores(q, k, softmax_scale: float, causal: bool) -> torch.Tensor:
    """``[B, H, L, L]`` float64 scores of ``[B, L, H, d]`` blocks (causal: upper triangle -inf)."""
    scores = q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1) * softmax_scale
    if causal:
        length = q.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


class FakeFA4:
    """FA4's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` contracts, computed in float64; counts
    the calls of each."""

    def __init__(self) -> None:
        self.calls = 0  # backward
        self.into = 0  # backward into given gradients
        self.forward_calls = 0
        self.forward_into = 0

    def forward(self, q, k, v, *, softmax_scale, causal, return_lse, out=None):
        self.forward_calls += 1
        b, length, h, d = q.shape
        assert k.shape == v.shape == (b, length, h, d) and return_lse
        scores = _scores(q, k, softmax_scale, causal)
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, L]
        result = (torch.softmax(scores, dim=-1) @ v.double().transpose(1, 2)).transpose(1, 2)
        result = result.to(q.dtype)
        if out is not None:
            self.forward_into += 1
            assert out.shape == result.shape and out.dtype == result.dtype
            assert out.stride(-1) == 1  # FA4 checks the layout it writes
            out.copy_(result)
            result = out
        return result, lse.float(), None, None, None

    def backward(
        self,
        q,
        k,
        v,
        out,
        dout,
        lse,
        softmax_scale,
        causal,
        *,
        dq=None,
        dk=None,
        dv=None,
        deterministic=False,
    ):
        self.calls += 1
        self.deterministic = deterministic
        b, length, h, d = q.shape
        assert k.shape == v.shape == out.shape == dout.shape == (b, length, h, d)
        assert lse.shape == (b, h, length) and lse.dtype == torch.float32
        assert out.dtype == dout.dtype == q.dtype
        qf, kf, vf, of, dof = (x.double().transpose(1, 2) for x in (q, k, v, out, dout))
        scores = _scores(q, k, softmax_scale, causal)
        probs = torch.exp(scores - lse.double().unsqueeze(-1))
        dv_ = probs.transpose(-1, -2) @ dof
        dp = dof @ vf.transpose(-1, -2)
        ds = probs * (dp - (dof * of).sum(-1, keepdim=True))
        dq_ = ds @ kf * softmax_scale
        dk_ = ds.transpose(-1, -2) @ qf * softmax_scale
        result = [g.transpose(1, 2).to(q.dtype) for g in (dq_, dk_, dv_)]
        if dq is not None:
            self.into += 1
            for given_, computed in zip((dq, dk, dv), result):
                assert given_.shape == computed.shape and given_.dtype == computed.dtype
                given_.copy_(computed)
            result = [dq, dk, dv]
        return (*result, None)  # FA4 may return more than the three


@pytest.fixture
def fake_fa4(monkeypatch):
    kernel = FakeFA4()
    monkeypatch.setattr(fa4, "_kernels", lambda: (kernel.forward, kernel.backward))
    # CPU tensors stand in for CUDA ones; float64 stays on torch's kernels as on a GPU
    monkeypatch.setattr(fa4, "available", lambda q: q.dtype != torch.float64)
    return kernel


# a head_groups problem: every block is placed (outputs and gradients written into their rows)
PLACED = {
    "b": 1,
    "n": 64,
    "h": 4,
    "d": 8,
    "segment_lengths": (8, 16),
    "dilation_rates": (1, 2),
    "mixing": "head_groups",
}


def sdpa_strategies() -> tuple[ringattn.Strategy, ...]:
    return ringattn.Strategy.all(communicator="local", computer="sdpa")


@settings(
    max_examples=12,
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(problems())
def test_gradients_through_fa4_match_oracle(fake_fa4, p):
    before = fake_fa4.calls
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert fake_fa4.calls > before  # every backward went through the stand-in


@settings(
    max_examples=8,
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(problems())
def test_bf16_gradients_through_fa4_match_oracle(fake_fa4, p):
    check_against_oracle(p, torch.bfloat16, sdpa_strategies())


def test_placed_gradients_are_written_by_fa4(fake_fa4):
    """head_groups blocks are placed: their gradients go to FA4 as the gradients' own strided
    rows (no copy), through the prepared launcher and the general path alike."""
    check_against_oracle({**PLACED, "causal": True}, torch.float32, sdpa_strategies())
    assert fake_fa4.into > 0


def test_torch_backward_bypasses_fa4(fake_fa4, monkeypatch, small_problem):
    monkeypatch.setattr(SDPAComputer, "cuda_backward", "torch")
    check_against_oracle(small_problem, torch.float32, sdpa_strategies())
    assert fake_fa4.calls == 0


def test_deterministic_mode_reaches_fa4(fake_fa4, small_problem):
    q, k, v = make_qkv(small_problem, requires_grad=True)
    attention = ringattn.DilatedAttention(**options(small_problem), strategy=sdpa_strategies()[0])
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (True, False):
            torch.use_deterministic_algorithms(flag)
            attention(q, k, v).sum().backward()
            assert fake_fa4.deterministic is flag
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("option", ["cuda_backward", "cuda_forward"])
def test_unknown_kernel_choice_is_refused_before_any_work(monkeypatch, option):
    monkeypatch.setattr(SDPAComputer, option, "cudnn")
    attention = ringattn.DilatedAttention((4,), (1,), strategy=ringattn.Strategy(computer="sdpa"))
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        attention(q, q, q)


@pytest.fixture
def fresh_import(monkeypatch):
    """``fa4._kernels`` re-imports (its result is cached per process)."""
    fa4._kernels.cache_clear()
    yield monkeypatch
    fa4._kernels.cache_clear()


def test_not_installed_is_quiet(fresh_import):
    fresh_import.setitem(sys.modules, "flash_attn", None)  # import of flash_attn fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fa4.installed()


def test_installed_but_broken_says_why(fresh_import):
    # flash_attn.cute is there, its interface module cannot be imported
    fresh_import.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    fresh_import.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute"))
    fresh_import.setitem(sys.modules, "flash_attn.cute.interface", None)
    with pytest.warns(RuntimeWarning, match="flash-attn-4 is installed but cannot be loaded"):
        assert not fa4.installed()


def test_not_available_off_gpu():
    # (True only on an SM90+ GPU with flash-attn-4 installed: never for CPU tensors)
    assert not fa4.available(torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16))


@settings(
    max_examples=10,
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(problems())
def test_outputs_through_fa4_forward_match_oracle(fake_fa4, monkeypatch, p):
    monkeypatch.setattr(SDPAComputer, "cuda_forward", "fa4")
    before = fake_fa4.forward_calls
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls > before


def test_placed_outputs_are_written_by_fa4_forward(fake_fa4, monkeypatch):
    monkeypatch.setattr(SDPAComputer, "cuda_forward", "fa4")
    check_against_oracle({**PLACED, "causal": False}, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_into > 0


def test_forward_stays_on_torch_by_default(fake_fa4, small_problem):
    for causal in (True, False):
        check_against_oracle({**small_problem, "causal": causal}, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls == 0 and fake_fa4.calls > 0


def test_auto_forward_is_fa4_for_non_causal_blocks_only(fake_fa4, monkeypatch, small_problem):
    """cuda_forward="auto": FA4's forward is faster than cuDNN's on non-causal blocks, slower on
    causal ones (docs/benchmarks/h200_perf.md, step 20)."""
    monkeypatch.setattr(SDPAComputer, "cuda_forward", "auto")
    assert small_problem["causal"]
    check_against_oracle(small_problem, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls == 0 and fake_fa4.calls > 0
    check_against_oracle({**small_problem, "causal": False}, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls > 0
