"""``sdpa`` on FlashAttention-4 (``ringattn.kernels.fa4``), without a GPU.

FA4 runs only on SM90+ GPUs (checked there: ``experiments/flex_gpu.py --part check``). What can
go wrong on our side is the wiring: which blocks reach it, in which layout (``[B, L, H, d]``
operands, the LSE as ``[B, H, L]`` float32, merged ``out``/``lse``), and whether placed outputs
and gradients land in the strided views handed to it, and whether the replays of its launches
(``ringattn.kernels.replay``) do the launcher's work. So here a stand-in with FA4's signatures,
contracts and launcher structure (``tests/fake_fa4.py``) replaces the kernels, and every ``sdpa``
strategy's outputs and gradients are held to the float64 oracle through it (the sequence-parallel
ones in tests/test_distributed.py).
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from contextlib import contextmanager

import pytest
import torch
from conftest import deterministic_algorithms, make_qkv, options, problems, rel_err
from fake_fa4 import FakeFA4, installed
from hypothesis import HealthCheck, given, settings
from test_strategies import check_against_oracle

import ringattn
from ringattn.computers.sdpa import SDPAComputer
from ringattn.kernels import fa4
from ringattn.pattern import head_groups


@pytest.fixture
def fake_fa4():
    with installed(FakeFA4()) as kernel:
        yield kernel


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
    return ringattn.Strategy.single_device(computer="sdpa")


# the fused kernels' hypothesis tests draw most problems where the kernels apply (views of 16-byte
# aligned rows: fa4_merge.layout_ok) and some where they do not (d = 4: every call goes plain)
KERNEL_DIMS = (4, 8, 16)


def configs_with_heads(p: dict) -> list[tuple[int, int]]:
    """A problem's ``(w, r)`` configs that have heads to attend for (``head_groups`` splits the
    heads among the configs: with fewer heads than configs, the last ones have none)."""
    configs = list(zip(p["segment_lengths"], p["dilation_rates"], strict=True))
    if p["mixing"] == "lse":
        return configs
    groups = head_groups(p["h"], len(configs))
    return [config for config, (start, stop) in zip(configs, groups) if stop > start]


def kernel_layouts(p: dict) -> bool:
    """Whether a problem's float32 block views are ones the fused kernels take."""
    return p["d"] % 8 == 0


def merges_blocks(p: dict) -> bool:
    """Whether an ``lse`` problem surely merges blocks into the accumulators (its forward's
    launches then go to ``fa4_merge``, its backward's to ``fa4_add``): every block but a first
    one that covers every row and head is merged, and only a lone ``r = 1`` config has one
    (which may still end in a tail segment, merged)."""
    return len(p["dilation_rates"]) > 1 or p["dilation_rates"][0] > 1


def full_configs(p: dict) -> list[tuple[int, int]]:
    """:func:`configs_with_heads` with at least one full segment (``w <= n``)."""
    return [(w, r) for w, r in configs_with_heads(p) if w <= p["n"]]


def with_fixture(max_examples: int) -> settings:
    """hypothesis settings for a test that also takes ``fake_fa4`` (one stand-in per test,
    shared by its examples: the tests only compare its counters before and after)."""
    return settings(
        max_examples=max_examples,
        suppress_health_check=[
            *settings().suppress_health_check,
            HealthCheck.function_scoped_fixture,
        ],
    )


def sdpa_attention(problem: dict):
    """q, k, v (requiring gradients) of ``problem`` and an ``sdpa`` module for it."""
    q, k, v = make_qkv(problem, requires_grad=True)
    attention = ringattn.DilatedAttention(**options(problem), strategy=sdpa_strategies()[0])
    return attention, (q, k, v)


@with_fixture(max_examples=12)
@given(problems())
def test_gradients_through_fa4_match_oracle(fake_fa4, p):
    before = fake_fa4.backward_runs
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert fake_fa4.backward_runs > before  # the backwards went through the stand-in


@with_fixture(max_examples=8)
@given(problems())
def test_bf16_gradients_through_fa4_match_oracle(fake_fa4, p):
    before = fake_fa4.backward_runs
    check_against_oracle(p, torch.bfloat16, sdpa_strategies())
    assert fake_fa4.backward_runs > before  # bf16 blocks went to the stand-in too


def test_placed_gradients_are_written_by_fa4(fake_fa4):
    """head_groups blocks are placed: their gradients go to FA4 as the gradients' own strided
    rows (no copy), through the prepared launcher and the general path alike."""
    check_against_oracle({**PLACED, "causal": True}, torch.float32, sdpa_strategies())
    assert fake_fa4.into > 0


def test_the_backward_gathers_the_placed_launches_lse_at_once(fake_fa4, monkeypatch):
    """head_groups' placed launches read their LSE rows from one buffer gathered per backward
    (ringattn.launches.packed), in FA4's layout, where each launch copied its own: the same
    gradients, bit for bit."""
    gathers: list[int] = []
    gather = ringattn.core.gather
    monkeypatch.setattr(ringattn.core, "gather", lambda *a: gathers.append(1) or gather(*a))
    problem = {**PLACED, "b": 2, "causal": True}
    inputs = make_qkv(problem, requires_grad=True)
    strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa")  # (views: prepared)
    attention = ringattn.DilatedAttention(**options(problem), strategy=strategy)
    grads = {}
    for pack in (True, False, True):
        monkeypatch.setattr(ringattn.core, "PACK_LSE", pack)
        gathers.clear()
        grads[pack] = torch.autograd.grad(attention(*inputs).sum(), inputs)
        assert len(gathers) == pack
    for packed_grad, copied_grad in zip(grads[True], grads[False], strict=True):
        assert torch.equal(packed_grad, copied_grad)


@pytest.mark.parametrize(("d", "reaches_fa4"), [(8, False), (40, False), (32, True), (64, True)])
def test_fa4_backward_only_at_head_dims_it_computes_right(fake_fa4, monkeypatch, d, reaches_fa4):
    """FA4's SM90 backward returned a wrong dQ (relative error ~1) at head dims off a multiple
    of 32 (16, 40, 48, 72, 80, 104, 112 on an H200; 104 and 112 non-causal failed to compile),
    silently: experiments/gpu_fuzz.py. Those blocks' backward is torch's; the forward, right at
    every head dim there, stays on FA4."""
    monkeypatch.setattr(fa4, "BACKWARD_HEAD_DIM_MULTIPLE", 32)
    forwards, backwards = fake_fa4.forward_runs, fake_fa4.backward_runs
    problem = {**PLACED, "d": d, "causal": True}
    check_against_oracle(problem, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_runs > forwards
    assert (fake_fa4.backward_runs > backwards) is reaches_fa4


def test_torch_backward_bypasses_fa4(fake_fa4, monkeypatch, small_problem):
    monkeypatch.setattr(SDPAComputer, "cuda_backward", "torch")
    check_against_oracle(small_problem, torch.float32, sdpa_strategies())
    assert fake_fa4.calls == 0


def test_deterministic_mode_reaches_fa4(fake_fa4, small_problem):
    """Also after the same blocks' non-deterministic launches were recorded: their replay (FA4's
    atomic dQ) is not taken for a deterministic call (the replays are keyed by the mode)."""
    attention, qkv = sdpa_attention(small_problem)
    for flag in (False, True):
        with deterministic_algorithms(flag):
            attention(*qkv).sum().backward()
        assert fake_fa4.deterministic is flag


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


def test_installed_but_failing_at_import_says_why(fresh_import):
    # an interface module that raises something other than ImportError while it loads (a CUDA
    # DSL that does not run here): the same warning, and torch's kernels
    def failing(name, *args, **kwargs):
        if name == "flash_attn.cute.interface":
            raise RuntimeError("no CUDA driver")
        return original(name, *args, **kwargs)

    original = importlib.import_module
    fresh_import.setattr(fa4.importlib, "import_module", failing)
    with pytest.warns(RuntimeWarning, match=r"cannot be loaded \(RuntimeError: no CUDA driver\)"):
        assert not fa4.installed()


def test_installed_finds_the_launchers_and_their_compile_caches(fresh_import):
    # FA4's interface as ringattn reads it: the two launchers, and every callable of the module
    # with a compile cache (what ringattn.kernels.replay watches), nothing else
    def forward(): ...

    def backward(): ...

    def preprocess(): ...

    forward.compile_cache = preprocess.compile_cache = {}
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = forward, backward
    interface.preprocess = preprocess
    interface.settings = types.SimpleNamespace(compile_cache={})  # (no callable: no launcher)
    fresh_import.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    fresh_import.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute"))
    fresh_import.setitem(sys.modules, "flash_attn.cute.interface", interface)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels = fa4._kernels()
    assert kernels is not None and fa4.installed()
    assert kernels.forward is forward and kernels.backward is backward
    assert kernels.caches == {forward: "compile_cache", preprocess: "compile_cache"}


def test_not_available_off_gpu():
    # (True only on an SM90+ GPU with flash-attn-4 installed: never for CPU tensors)
    assert not fa4.available(torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16))


@with_fixture(max_examples=10)
@given(problems())
def test_outputs_through_fa4_forward_match_oracle(fake_fa4, p):
    before = fake_fa4.forward_runs
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_runs > before


def test_placed_outputs_are_written_by_fa4_forward(fake_fa4):
    check_against_oracle({**PLACED, "causal": False}, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_into > 0


@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
def test_torch_forward_bypasses_fa4(fake_fa4, monkeypatch, small_problem, mixing):
    """(head_groups: placed blocks, through forward_into on the general path, whose choice is
    cuda_forward's too, not cuda_backward's)"""
    monkeypatch.setattr(SDPAComputer, "cuda_forward", "torch")
    for causal in (True, False):
        problem = {**small_problem, "causal": causal, "mixing": mixing}
        check_against_oracle(problem, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls == 0 and fake_fa4.calls > 0


def test_flash_backend_keeps_both_directions_off_fa4(fake_fa4, monkeypatch, small_problem):
    """cuda_backend = "flash" is the FlashAttention-2 A/B: FA4 runs neither direction."""
    monkeypatch.setattr(SDPAComputer, "cuda_backend", "flash")
    for mixing in ("lse", "head_groups"):
        check_against_oracle({**small_problem, "mixing": mixing}, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls == fake_fa4.calls == 0


def test_forward_goes_to_fa4_by_default(fake_fa4, small_problem):
    """causal or not: with its launches replayed FA4's forward was as fast as cuDNN's or faster
    through the module (docs/benchmarks/h200_perf.md, step 21)."""
    for causal in (True, False):
        before = fake_fa4.forward_runs
        check_against_oracle({**small_problem, "causal": causal}, torch.float32, sdpa_strategies())
        assert fake_fa4.forward_runs > before


@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
def test_replays_are_kept_apart_by_scale(fake_fa4, mixing):
    """Two modules that differ only in ``scale``, one shape: each records its own launches (the
    scale is a constant of the recorded call, so a replay keyed without it computed the other
    module's function: 1.4 off)."""
    q, k, v, dout = (torch.randn(1, 32, 4, 8, dtype=torch.float64) for _ in range(4))
    shape = {"segment_lengths": (8, 16), "dilation_rates": (1, 2), "mixing": mixing}
    for scale in (None, 0.05, None, 0.05):  # the second turn replays
        inputs = [x.float().requires_grad_() for x in (q, k, v)]
        attention = ringattn.DilatedAttention(
            **shape, scale=scale, strategy=sdpa_strategies()[0], compile=False
        )
        out = attention(*inputs)
        grads = torch.autograd.grad(out, inputs, dout.float())
        exact = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = ringattn.reference.dilated_attention(*exact, **shape, scale=scale)
        ref_grads = torch.autograd.grad(ref, exact, dout)
        for got, want in zip((out, *grads), (ref, *ref_grads)):
            assert rel_err(got, want) < 1e-5, scale
    assert fake_fa4.forward_runs > fake_fa4.forward_calls  # (replays were among them)


def test_replays_are_bounded(fake_fa4, monkeypatch):
    """The replays are kept by signature, one per scale, shape, layout...: past
    ``fa4._MAX_REPLAYS`` they are dropped and recorded again, not kept for ever (a long run of
    changing scales or lengths grew the dict, and the recorded launches it holds, without
    bound); calls past the bound still match the oracle."""
    monkeypatch.setattr(fa4, "_MAX_REPLAYS", 2)
    monkeypatch.setattr(fa4, "_REPLAYS", {})  # (none of other tests' signatures)
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    exact = [x.double() for x in (q, k, v)]
    shape = {"segment_lengths": (8,), "dilation_rates": (1,), "mixing": "lse"}
    for scale in (0.1, 0.2, 0.3, 0.4, 0.1):  # a signature per scale
        attention = ringattn.DilatedAttention(
            **shape, scale=scale, strategy=sdpa_strategies()[0], compile=False
        )
        with torch.no_grad():
            out = attention(q, k, v)
        assert len(fa4._REPLAYS) <= 2, scale
        ref = ringattn.reference.dilated_attention(*exact, **shape, scale=scale)
        assert rel_err(out, ref) < 1e-5, scale
    assert fake_fa4.forward_runs >= 5


@pytest.mark.parametrize("problem", ["small", "placed"])
def test_repeated_calls_replay_fa4_without_its_launcher(fake_fa4, small_problem, problem):
    """Each block signature's first call runs FA4's launcher once (recorded); later calls of the
    same signatures replay its kernel launches on the new operands (merged and placed blocks,
    forward and backward), held to the oracle like the launcher."""
    p = small_problem if problem == "small" else {**PLACED, "causal": True}
    check_against_oracle(p, torch.float32, sdpa_strategies())
    launcher_calls = (fake_fa4.forward_calls, fake_fa4.calls)
    runs = (fake_fa4.forward_runs, fake_fa4.backward_runs)
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert (fake_fa4.forward_calls, fake_fa4.calls) == launcher_calls
    assert fake_fa4.forward_runs > runs[0] and fake_fa4.backward_runs > runs[1]


def test_replay_off_calls_the_launcher_every_time(fake_fa4, monkeypatch, small_problem):
    monkeypatch.setattr(fa4, "REPLAY", False)
    check_against_oracle(small_problem, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls == fake_fa4.forward_runs > 0
    assert fake_fa4.calls == fake_fa4.backward_runs > 0


def test_deterministic_backward_keeps_calling_the_launcher(fake_fa4, small_problem):
    """FA4's deterministic backward zeroes semaphores in Python; a replay would skip that, so
    that signature is not replayed (the forward still is)."""
    attention, qkv = sdpa_attention(small_problem)
    with deterministic_algorithms(True):
        attention(*qkv).sum().backward()
        launcher_calls = (fake_fa4.forward_calls, fake_fa4.calls)
        attention(*qkv).sum().backward()
    assert fake_fa4.forward_calls == launcher_calls[0]
    assert fake_fa4.calls == 2 * launcher_calls[1] > 0


def test_no_recording_while_a_cuda_graph_is_captured(fake_fa4, monkeypatch, small_problem):
    """A recording checks its replay against the launcher, which syncs the host: forbidden while
    a CUDA graph is captured. There an unrecorded signature calls the launcher and records
    nothing; recorded ones still replay (launches only)."""
    monkeypatch.setattr(fa4, "capturing", lambda q: True)
    check_against_oracle(small_problem, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls == fake_fa4.forward_runs > 0
    assert fake_fa4.calls == fake_fa4.backward_runs > 0
    assert not fa4._REPLAYS
    monkeypatch.setattr(fa4, "capturing", lambda q: False)
    check_against_oracle(small_problem, torch.float32, sdpa_strategies())  # records
    launcher_calls = (fake_fa4.forward_calls, fake_fa4.calls)
    monkeypatch.setattr(fa4, "capturing", lambda q: True)
    check_against_oracle(small_problem, torch.float32, sdpa_strategies())  # replays
    assert (fake_fa4.forward_calls, fake_fa4.calls) == launcher_calls


def test_a_capturing_launch_waits_while_another_thread_holds_the_launcher(
    fake_fa4, monkeypatch, small_problem
):
    """Another thread's recording swaps FA4's compile caches, and its adding backward FA4's
    module state, under ``_LAUNCHER_LOCK``: a launch captured into a CUDA graph in between ran
    the adding kernel into uninitialised gradients. It now waits for the lock."""
    import threading

    monkeypatch.setattr(fa4, "capturing", lambda q: True)
    done = threading.Event()
    failure: list[BaseException] = []

    def capture() -> None:
        try:
            check_against_oracle(small_problem, torch.float32, sdpa_strategies()[:1])
        except BaseException as exc:  # (reported by the test's thread)
            failure.append(exc)
        done.set()

    with fa4._LAUNCHER_LOCK:
        worker = threading.Thread(target=capture)
        worker.start()
        assert not done.wait(0.5), "a capturing launch ran while the launcher was held"
    worker.join(60)
    assert done.is_set() and not failure, failure
    assert fake_fa4.forward_calls > 0


@pytest.mark.parametrize("capturing", [False, True])
def test_capturing_asks_torch_about_the_current_stream(monkeypatch, capturing):
    """The fused kernels' first-call guards rely on it (every other test patches it out)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # (a CUDA q's, here)
    assert fa4.capturing(types.SimpleNamespace(is_cuda=True)) is capturing
    assert not fa4.capturing(torch.zeros(1)) and not fa4.capturing(None)


def test_backward_tile_config_reaches_the_launcher_and_keys_the_replays(fake_fa4, monkeypatch):
    """``fa4.BACKWARD_CONFIG`` (the A/B of FA4's backward tiles) is in place around every
    backward launcher call of its ``(head dim, causal)`` and keys the replays; other blocks, and
    calls without it, take FA4's own."""
    p = {**PLACED, "causal": True}
    check_against_oracle(p, torch.float32, sdpa_strategies())
    calls = fake_fa4.calls
    assert calls > 0 and set(fake_fa4.backward_configs) == {None}
    tiles = (64, 128, 2, 2, 1, True, False, False, 1, 2, 1)
    monkeypatch.setitem(fa4.BACKWARD_CONFIG, (PLACED["d"] + 8, True), (80, 128))  # another d
    monkeypatch.setitem(fa4.BACKWARD_CONFIG, (PLACED["d"], False), (80, 128))  # not causal
    monkeypatch.setitem(fa4.BACKWARD_CONFIG, (PLACED["d"], True), tiles)
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert fake_fa4.calls > calls  # recorded anew, not replayed
    assert set(fake_fa4.backward_configs[calls:]) == {tiles}


def test_backward_tiles_are_swapped_in_for_the_call_only():
    """FA4's launcher reads its SM90 backward tiles from ``_tile_size_bwd_sm90``: replaced
    under ``Kernels.backward_tiles`` only, and not at all for None."""
    interface = types.SimpleNamespace(
        _tile_size_bwd_sm90=lambda *args, **kwargs: "fa4's", BwdConfig=lambda *fields: fields
    )
    with fa4._tiles(interface, (64, 128)):
        assert interface._tile_size_bwd_sm90(128, 128, True, False) == (64, 128)
    assert interface._tile_size_bwd_sm90(128, 128, True, False) == "fa4's"
    with fa4._tiles(interface, None):
        assert interface._tile_size_bwd_sm90(128, 128, True, False) == "fa4's"


@pytest.mark.parametrize("wrong", [[64, 128], (64, 128), "dq1wg", [1] * 11, (1,) * 10, (1,) * 14])
def test_malformed_backward_config_is_refused(monkeypatch, wrong):
    monkeypatch.setitem(fa4.BACKWARD_CONFIG, (128, True), wrong)
    with pytest.raises(ValueError, match="BACKWARD_CONFIG's entries must be tuples"):
        fa4.backward_config(128, True)
    assert fa4.backward_config(128, False) is None


@pytest.mark.parametrize("fields", [11, 13])
def test_backward_config_takes_11_to_13_fields(monkeypatch, fields):
    monkeypatch.setitem(fa4.BACKWARD_CONFIG, (128, True), (1,) * fields)
    assert fa4.backward_config(128, True) == (1,) * fields


@pytest.mark.parametrize(
    ("dtype", "d", "arch", "forward", "backward", "sm90"),
    [
        (torch.bfloat16, 64, 9, True, True, True),
        (torch.float16, 256, 9, True, True, True),
        (torch.bfloat16, 40, 9, True, False, True),  # dQ wrong off multiples of 32
        (torch.bfloat16, 128, 10, True, True, False),  # Blackwell: FA4, not its SM90 kernels
        (torch.bfloat16, 128, 8, False, False, False),  # Ampere
        (torch.float32, 64, 9, False, False, False),
        (torch.bfloat16, 12, 9, False, False, False),  # not a multiple of 8
        (torch.bfloat16, 264, 9, False, False, False),  # over 256
    ],
)
def test_what_fa4_is_offered(monkeypatch, dtype, d, arch, forward, backward, sm90):
    """fa4.available / backward_available / sm90 on a (stand-in) CUDA tensor: the dtypes, head
    dims and GPU generations FA4 computes right; never while tracing, never off the GPU."""
    monkeypatch.setattr(fa4, "installed", lambda: True)
    monkeypatch.setattr(fa4, "_arch_ok", fa4._arch_ok.__wrapped__)  # (uncached)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (arch, 0))
    q = types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 4, 2, d), device="cuda:0")
    assert fa4.available(q) is forward
    assert fa4.backward_available(q) is backward
    assert fa4.sm90(q) is sm90
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fa4.available(q)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    q.is_cuda = False
    assert not fa4.available(q) and not fa4.sm90(q)


def test_forward_tile_config_reaches_the_launcher_and_keys_the_replays(fake_fa4, monkeypatch):
    """``fa4.FORWARD_CONFIG`` (the A/B of a tile configuration) goes to FA4's launcher, and a
    replay recorded without it is not reused with it (the replays are keyed by it)."""
    p = {**PLACED, "causal": True}
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_tiles == {}
    calls = fake_fa4.forward_calls
    monkeypatch.setitem(fa4.FORWARD_CONFIG, True, (128, 128, False, True))
    check_against_oracle(p, torch.float32, sdpa_strategies())
    assert fake_fa4.forward_calls > calls  # recorded anew, not replayed
    assert fake_fa4.forward_tiles == {
        "tile_mn": (128, 128),
        "mma_pv_is_rs": False,
        "intra_wg_overlap": True,
    }


@pytest.mark.parametrize("adds_dq", [False, True])
def test_adding_backward_launches_are_replayed_apart_from_plain_ones(fake_fa4, adds_dq):
    """fa4.backward under ``kernels`` (fa4_add's adding kernels) launches other kernels, which
    add into dK / dV (and into dQ, by the postprocess, where dQ's rows are given): recorded and
    replayed under a key of their own (a plain replay found for it wrote the gradients instead
    of adding; an adding one found for a plain call added), adding once per call, replayed or
    not."""
    adding_cache: dict = {}

    def adding_kernel(q, k, v, out, dout, lse, dlse, dq_accum, dk, dv, *rest):
        dk_block, dv_block = torch.empty_like(dk), torch.empty_like(dv)
        fake_fa4._backward_kernel(
            q, k, v, out, dout, lse, dlse, dq_accum, dk_block, dv_block, *rest
        )
        dk.add_(dk_block), dv.add_(dv_block)

    def adding_postprocess(dq_accum, dq):
        dq_block = torch.empty_like(dq)
        fake_fa4._postprocess_kernel(dq_accum, dq_block)
        dq.add_(dq_block)

    @contextmanager
    def adding():
        own = fake_fa4.bwd.compile_cache
        fake_fa4.bwd.compile_cache = adding_cache
        try:
            yield
        finally:
            fake_fa4.bwd.compile_cache = own

    postprocess = adding_postprocess if adds_dq else fake_fa4._postprocess_kernel
    adding_cache.update({("bwd", False, False): adding_kernel, "postprocess": postprocess})
    gen = torch.Generator().manual_seed(0)
    dout, q, k, v, out = (torch.randn(2, 6, 3, 8, generator=gen) for _ in range(5))
    lse = torch.randn(2, 6, 3, generator=gen).abs() + 1
    blocks = fa4.backward(dout, q, k, v, out, lse, False, 0.3)
    roles = slice(0 if adds_dq else 1, 3)
    for _ in range(2):  # the first call records, the second replays
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        fa4.backward(dout, q, k, v, out, lse, False, 0.3, (None, *grads[1:]))
        torch.testing.assert_close(grads[1:], list(blocks[1:]))
        old = [torch.randn(2, 6, 3, 8, generator=gen) for _ in range(3)]
        grads = [x.clone() for x in old]
        given = (grads[0] if adds_dq else None, *grads[1:])
        fa4.backward(dout, q, k, v, out, lse, False, 0.3, given, adding)
        want = [o + block for o, block in zip(old, blocks)]
        torch.testing.assert_close(grads[roles], want[roles])
