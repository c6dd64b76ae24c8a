"""Each row's dPsum formed once per ``lse`` backward and handed to FA4's backward
(``ringattn.kernels.dpsum``, ``ringattn.kernels.fa4_dpsum``), without a GPU.

FA4's preprocess compiled without its ``O`` / ``dO`` loads runs only on an SM90 GPU (it compiles
on the CPU too, ``experiments/cute_compile.py``; held to FA4's own backward there by
``experiments/fa4_probe.py --part dpsum`` and to the oracle by ``experiments/flex_gpu.py --part
check``). Here, on the FA4 stand-in, whose kernels under the swap form dPsum from the given
``dLSE`` alone, as the swapped preprocess does:

* the core's wiring: the gradients must still be the oracle's, so every launch must be handed the
  sums of its own rows (another row's sums, or none, are off by O(1));
* where it applies: ``lse`` launches reading enough rows over, not ``head_groups``, not when
  switched off;
* the first-call guard: the swap is kept only if FA4's gradients with it agree with FA4's own,
  and refused with a warning when they disagree or it fails.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import problems
from fake_fa4 import FakeFA4, installed
from hypothesis import given
from test_fa4 import KERNEL_DIMS, kernel_layouts, sdpa_strategies, with_fixture
from test_fa4_add import StandIn as AddStandIn
from test_fa4_add import operands
from test_fa4_merge import MERGED, PLACED
from test_strategies import check_against_oracle

import ringattn
import ringattn.core
from ringattn.kernels import dpsum, fa4, fa4_add, fa4_dpsum


@pytest.fixture
def sharing(monkeypatch):
    """FA4's stand-in installed, the given sums offered to every backward launch, no signature
    checked yet."""
    monkeypatch.setattr(fa4_dpsum, "supported", lambda q: True)
    monkeypatch.setattr(fa4_dpsum, "_CHECKED", {})
    with installed(FakeFA4()) as kernel:
        yield kernel


# an lse plan whose r = 4 config goes as offset runs (ringattn.pattern.OffsetRun: two launches
# of four heads, each head a row offset), its first block in 8 placed parts
RUNS = {**MERGED, "h": 8, "segment_lengths": (8, 16, 32), "dilation_rates": (1, 2, 4)}


@pytest.fixture
def adding_too(sharing, monkeypatch):
    """``sharing``, with the merged blocks' backward offered to ``fa4_add``'s stand-in
    (tests/test_fa4_add.py), which hands the sums it is given to FA4's (stand-in's) backward.
    (Without it the CPU's merged blocks take the plain backward, which forms its own sums: only
    the covering first config's placed launches would read the shared ones.)"""
    adding = AddStandIn()
    monkeypatch.setattr(fa4_add, "supported", lambda q: True)
    monkeypatch.setattr(fa4_add, "backward_add_", adding)
    return sharing, adding


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [MERGED, RUNS], ids=["blocks", "offset_runs"])
def test_merged_blocks_take_the_shared_sums(adding_too, causal, p):
    sharing, adding = adding_too
    check_against_oracle({**p, "causal": causal}, torch.float32, sdpa_strategies())
    assert sharing.unloaded_runs > 0 and sharing.given_dlse > 0 and adding.given > 0


@with_fixture(max_examples=20)
@given(problems(dims=KERNEL_DIMS, mixings=("lse",), shared_rows=True))
def test_any_problem_matches_oracle_with_shared_sums(adding_too, p):
    """Wherever two configs or more overlap (every row and head then reads the merged output,
    the plan is not disjoint), the merged blocks' backward takes the shared sums."""
    # (every backward that launches shares: the small problems' plans rarely read their rows
    # 1.25 times over)
    ringattn.core.DPSUM_SHARED_FROM, before = 0.0, ringattn.core.DPSUM_SHARED_FROM
    try:
        check_against_oracle(p, torch.float32, sdpa_strategies())
    finally:
        ringattn.core.DPSUM_SHARED_FROM = before
    if kernel_layouts(p) and len(p["dilation_rates"]) >= 2:
        assert adding_too[1].given > 0


def backward_once(p: dict, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(p["b"], p["n"], p["h"], p["d"], generator=gen) for _ in range(3))
    inputs = [x.requires_grad_() for x in (q, k, v)]
    opts = {key: p[key] for key in ("segment_lengths", "dilation_rates", "mixing")}
    module = ringattn.DilatedAttention(**opts, causal=p.get("causal", False), compile=False)
    out = module(*inputs)
    return list(torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=gen)))


@pytest.mark.parametrize("case", ["head_groups", "switched_off", "one_config", "unsupported"])
def test_not_shared_where_it_does_not_apply_or_pay(sharing, monkeypatch, case):
    """``head_groups`` (each row in one launch), the A/B switch off, a plan whose launches read
    each row once (the shared sums would read as many rows as they save), a device without the
    swap: every launch forms its own sums (MERGED itself shares: the test above)."""
    p = {**MERGED}
    if case == "head_groups":
        p = {**PLACED}
    elif case == "switched_off":
        monkeypatch.setattr(ringattn.core, "SHARE_DPSUM", False)
    elif case == "one_config":
        p.update(segment_lengths=(8,), dilation_rates=(1,))
    else:
        monkeypatch.setattr(fa4_dpsum, "supported", lambda q: False)
    backward_once(p)
    assert sharing.calls > 0 and sharing.given_dlse == 0


def test_shared_launches_are_replayed_with_their_sums(sharing):
    """The second backward replays the launches recorded with the given sums (no launcher
    call), each reading that call's sums: the same gradients."""
    first = backward_once(MERGED)
    calls, runs = sharing.calls, sharing.unloaded_runs
    second = backward_once(MERGED)
    assert sharing.calls == calls and sharing.unloaded_runs > runs
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def block_sums(inputs) -> torch.Tensor:
    dout, _, _, _, out, _ = inputs
    return -(dout * out).sum(-1)


def test_first_call_keeps_a_swap_that_agrees(sharing):
    inputs, _ = operands()
    minus = block_sums(inputs)
    assert fa4_dpsum.usable(minus, *inputs, False, 0.3) is minus
    assert list(fa4_dpsum._CHECKED.values()) == [True] and sharing.unloaded_runs > 0
    calls = sharing.calls
    assert fa4_dpsum.usable(minus, *inputs, False, 0.3) is minus  # (checked once)
    assert sharing.calls == calls


def test_each_signature_is_checked_on_its_own(sharing):
    inputs, _ = operands()
    minus = block_sums(inputs)
    fa4_dpsum.usable(minus, *inputs, False, 0.3)
    fa4_dpsum.usable(minus, *inputs, True, 0.3)
    fa4_dpsum.usable(minus, *(x.half() for x in inputs), False, 0.3)
    assert len(fa4_dpsum._CHECKED) == 3 and all(fa4_dpsum._CHECKED.values())


@pytest.mark.parametrize("why", ["disagrees", "fails"])
def test_first_call_refuses_a_swap_that_disagrees_or_fails(sharing, monkeypatch, why):
    inputs, _ = operands()
    minus = block_sums(inputs)
    if why == "disagrees":  # (a preprocess that still forms its own sums, less the given)
        monkeypatch.setattr(fa4_dpsum, "given_dpsum_kernels", contextlib.nullcontext)
        pattern = "disagreed"
    else:

        def failing():
            raise RuntimeError("no such kernel")

        monkeypatch.setattr(fa4_dpsum, "given_dpsum_kernels", failing)
        pattern = "failed to compile or launch"
    with pytest.warns(RuntimeWarning, match=pattern):
        assert fa4_dpsum.usable(minus, *inputs, False, 0.3) is None
    assert list(fa4_dpsum._CHECKED.values()) == [False] and pattern in fa4_dpsum.last_refusal
    calls = sharing.calls
    assert fa4_dpsum.usable(block_sums(inputs), *inputs, False, 0.3) is None  # (never again)
    assert sharing.calls == calls


def test_declines_without_work(sharing, monkeypatch):
    """None given, switched off, an empty block, or a first call while a CUDA graph is
    captured (the check syncs): None, and nothing run or checked."""
    inputs, _ = operands()
    minus = block_sums(inputs)
    assert fa4_dpsum.usable(None, *inputs, False, 0.3) is None
    empty = [x[:, :0] for x in inputs]
    assert fa4_dpsum.usable(minus[:, :0], *empty, False, 0.3) is None
    monkeypatch.setattr(fa4_dpsum, "ENABLED", False)
    assert fa4_dpsum.usable(minus, *inputs, False, 0.3) is None
    monkeypatch.setattr(fa4_dpsum, "ENABLED", True)
    monkeypatch.setattr(fa4, "capturing", lambda q: True)
    assert fa4_dpsum.usable(minus, *inputs, False, 0.3) is None
    assert sharing.calls == 0 and fa4_dpsum._CHECKED == {}


def test_the_swapped_loads_fill_zeros_and_keep_the_rest():
    """The preprocess's module sees a ``copy_utils`` whose ``copy`` zero-fills the registers it
    would load into (its O / dO loads), with every other helper FA4's own."""
    import types

    filled = []
    copy_utils = types.ModuleType("copy_utils")
    copy_utils.copy = lambda *args, **kwargs: pytest.fail("loaded")
    copy_utils.tiled_copy_2d = object()
    unloading = fa4_dpsum._unloading(copy_utils)
    unloading.copy("src", types.SimpleNamespace(fill=filled.append), pred=None)
    assert filled == [0.0] and unloading.tiled_copy_2d is copy_utils.tiled_copy_2d


def test_minus_dpsum_torch_twin_and_refusals():
    """Without the kernel (this CPU, no interpreter) torch's ops form the sums; operands that do
    not fit are refused (None), not misread. The kernel itself: tests/kernel_cases.py."""
    gen = torch.Generator().manual_seed(0)
    out, dout = (torch.randn(2, 5, 3, 8, generator=gen).to(torch.bfloat16) for _ in "ab")
    lse = torch.randn(2, 5, 3, generator=gen)
    got = dpsum.minus_dpsum(out, dout.transpose(1, 2).contiguous().transpose(1, 2), lse)
    want = -(out.double() * dout.double()).sum(-1)
    assert got is not None and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert dpsum.minus_dpsum(out.double(), dout.double(), lse) is None
    assert dpsum.minus_dpsum(out, dout[:, :4], lse) is None
    assert dpsum.minus_dpsum(out, dout, lse.transpose(0, 1).contiguous().transpose(0, 1)) is None
    assert dpsum.minus_dpsum(out, dout, lse[:, :4]) is None


def test_switched_off_in_the_kernel_module_the_core_forms_no_sums(sharing, monkeypatch):
    """``fa4_dpsum.ENABLED = False`` (gpu_fuzz's ``unfused`` variant): no sums formed or handed
    over, and the gradients still the oracle's."""
    formed = []
    original = dpsum.minus_dpsum
    monkeypatch.setattr(dpsum, "minus_dpsum", lambda *a: (formed.append(1), original(*a))[1])
    backward_once(MERGED)
    assert formed and sharing.given_dlse > 0  # (the positive control)
    formed.clear()
    given = sharing.given_dlse
    monkeypatch.setattr(fa4_dpsum, "ENABLED", False)
    check_against_oracle(MERGED, torch.float32, sdpa_strategies())
    assert not formed and sharing.given_dlse == given
