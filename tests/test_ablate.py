"""experiments.ablate: a tiny sweep's outputs, the analytic FLOP count, one-line CLI errors."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ringattn
from experiments import ablate
from ringattn import Strategy

REPO = Path(__file__).resolve().parents[1]

# The quick preset's logic on a sweep small enough for a unit test.
TINY = [
    "--seq-lens", "64",
    "--check-n", "40",
    "--segment-lengths", "16,32",
    "--dilation-rates", "1,2",
    "--heads", "3",
    "--head-dim", "8",
    "--warmup", "0",
    "--repeats", "1",
]  # fmt: skip


def read_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_writes_csv_markdown_and_plots(tmp_path, capsys):
    assert ablate.main([*TINY, "--compile", "off", "--causal", "both", "--out", str(tmp_path)]) == 0
    rows = read_rows(tmp_path)
    variants = [r for r in rows if r["strategy"] != ablate.BASELINE]
    local = {s.label for s in Strategy.single_device()}
    assert {r["strategy"] for r in variants} == local
    assert len(variants) == len(local) * 2  # × causal
    assert all(r["check"] == "pass" for r in variants), [r["note"] for r in variants]
    for r in variants:
        assert float(r["fwd_rel_err"]) <= 1e-5 and float(r["fwd_ms"]) > 0
        assert float(r["fwd_time_vs_dense"]) > 0  # related to the same run's baseline
    dense = [r for r in rows if r["strategy"] == ablate.BASELINE]
    assert {(r["n"], r["causal"]) for r in dense} == {("64", "False"), ("64", "True")}
    md = (tmp_path / "results.md").read_text()
    assert "| strategy |" in md and md.count("\n|") >= len(rows)
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("| strategy") and len(printed) == len(rows) + 2


@pytest.mark.compile
def test_compiled_variant_is_checked_and_timed(tmp_path):
    argv = [*TINY, "--compile", "on", "--compile-backend", "aot_eager", "--seq-lens", "40"]
    argv += ["--dilation", "segment_local", "--computer", "sdpa", "--memory", "pooled"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert ablate.main([*argv, "--out", str(tmp_path)]) == 0
    # sdpa opens no compiled frame of its own: the row compiled nothing, as compile off, until
    # ablate wrapped such a module in torch.compile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    (row,) = [r for r in read_rows(tmp_path) if r["strategy"] != ablate.BASELINE]
    assert row["compile"] == "True" and row["check"] == "pass"
    assert float(row["fwdbwd_ms"]) > 0 and float(row["fwdbwd_peak_mib"]) > 0


def test_quick_preset_compiles_only_the_default_strategy_within_budget():
    sweep = ablate.parse([])
    assert sweep.preset.name == "quick" and sweep.device.type == "cpu"
    variants, notes = ablate.plan_variants(sweep)
    compiled = [v for v in variants if v.compile]
    assert len(compiled) == sweep.compile_budget == 1
    assert compiled[0].strategy == Strategy()
    assert any("budget" in note for note in notes)
    assert len(variants) - 1 == len(sweep.strategies) * len(sweep.configs) * 2


def test_a_check_shorter_than_the_longest_segment_says_so():
    """The check's verdict stands for every n's row: at --check-n 256 a 512-row segment was
    checked on part of one segment and every row said "pass" without a word."""
    argv = ["--segment-lengths", "512", "--dilation-rates", "4", "--seq-lens", "1024"]
    _, notes = ablate.plan_variants(ablate.parse(argv))
    assert any(note.startswith("check: n=256 holds part of one segment") for note in notes)
    _, notes = ablate.plan_variants(ablate.parse([*argv, "--check-n", "512"]))
    assert not any(note.startswith("check:") for note in notes)
    _, notes = ablate.plan_variants(ablate.parse([]))  # (the quick preset checks whole ones)
    assert not any(note.startswith("check:") for note in notes)


@pytest.mark.parametrize("argv", [["--compile", "both"], ["--compile-budget", "-1"]])
def test_explicit_compile_lifts_the_quick_presets_budget(argv):
    """``--compile on|both`` and ``--compile-budget -1`` mean every variant compiled, as --help
    says; both kept the quick preset's budget of 1 (a None override was dropped as "not
    given"), so a new strategy was never timed or checked compiled."""
    sweep = ablate.parse(argv)
    assert sweep.compile_budget is None
    variants, notes = ablate.plan_variants(sweep)
    compiled = {v.strategy for v in variants if v.compile}
    assert compiled == set(sweep.strategies), notes
    assert not any("budget" in note for note in notes)


def test_a_strategy_of_ones_own_is_ablated_with_import(tmp_path, capsys):
    """``--import FILE.py`` registers a strategy out of the tree before the names are read
    (there was no way but editing a built-in ``__init__.py``); a wrong one is reported as
    failing, and a module that cannot be imported is a one-line usage error."""
    plugin = tmp_path / "my_strategies.py"
    plugin.write_text(
        "from ringattn.computers.math import MathComputer\n"
        "from ringattn.registry import register\n\n\n"
        '@register("computer", "plugin_math")\n'
        "class PluginMath(MathComputer):\n"
        "    pass\n\n\n"
        '@register("computer", "plugin_wrong")\n'
        "class PluginWrong(MathComputer):\n"
        "    def forward(self, q, k, v, causal, scale):\n"
        "        out, lse = super().forward(q, k, v, causal, scale)\n"
        "        return 2 * out, lse\n"
    )
    argv = [*TINY, "--import", str(plugin), "--computer", "plugin_math,plugin_wrong"]
    argv += ["--dilation", "segment_local", "--memory", "none", "--compile", "off"]
    try:
        assert ablate.main([*argv, "--out", str(tmp_path / "out")]) == 1  # (the wrong one)
        rows = read_rows(tmp_path / "out")
        checks = {r["strategy"]: r["check"] for r in rows if r["strategy"] != ablate.BASELINE}
        assert checks == {
            "segment_local/plugin_math/local/none": "pass",
            "segment_local/plugin_wrong/local/none": "FAIL",
        }
    finally:
        ringattn.registry.unregister("computer", "plugin_math", missing_ok=True)
        ringattn.registry.unregister("computer", "plugin_wrong", missing_ok=True)
    capsys.readouterr()
    assert ablate.main(["--import", "no_such_module_xyz"]) == 2
    assert "--import 'no_such_module_xyz': ModuleNotFoundError" in capsys.readouterr().err


def test_cpu_peak_memory_sees_allocations_and_frees():
    def alloc() -> None:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(1 << 20, dtype=torch.uint8)
        del a, b
        torch.empty(1 << 19, dtype=torch.uint8)

    assert ablate.cpu_allocator_peak(alloc) == 2 << 20


def test_peaks_count_what_the_memory_manager_keeps(monkeypatch):
    # a pooled buffer outlives the call, so no call's peak shows it: counted all the same
    sweep = ablate.parse(["--device", "cpu", "--seq-lens", "64"])
    config = sweep.configs[0]
    kept = 1 << 20
    monkeypatch.setattr(ablate, "peak_mib", lambda fn, device, live: (live / 2**20, "test"))
    peaks = {}
    for memory in ("none", "pooled"):
        module = ringattn.DilatedAttention(
            config.segment_lengths,
            config.dilation_rates,
            mixing=config.mixing,
            strategy=Strategy(memory=memory),
            compile=False,
        )
        if memory == "pooled":
            real = module.memory.held_bytes
            module.memory.held_bytes = lambda real=real: real() + kept
        row = ablate._row(sweep, memory, False, 64, config, False)
        ablate.time_and_memory(row, module, sweep)
        peaks[memory] = (row.fwd_peak_mib * 2**20, row.fwdbwd_peak_mib * 2**20)
    assert peaks["pooled"][0] >= peaks["none"][0] + kept
    assert peaks["pooled"][1] >= peaks["none"][1] + kept


@pytest.mark.compile
def test_many_compiled_variants_in_one_process(tmp_path):
    """16 local variants compiled (fullgraph) one after another: their graphs piled up on
    ``DilatedAttention.forward`` until Dynamo's recompile limit (8) made the last rows errors."""
    argv = [*TINY, "--computer", "sdpa,math", "--dilation", "segment_local,global"]
    argv += ["--memory", "none,pooled", "--causal", "both"]
    argv += ["--compile", "on", "--compile-backend", "aot_eager", "--no-baseline"]
    assert ablate.main([*argv, "--out", str(tmp_path)]) == 0
    with (tmp_path / "results.csv").open() as f:
        checks = [row["check"] for row in csv.DictReader(f)]
    assert checks == ["pass"] * 16, checks


def test_causal_takes_the_other_tools_spellings_and_its_own():
    for spelling, causal in (
        ("no", (False,)),
        ("off", (False,)),
        ("yes", (True,)),
        ("on", (True,)),
    ):
        assert ablate.parse(["--causal", spelling]).preset.causal == causal
    assert ablate.parse(["--causal", "both"]).preset.causal == (False, True)


def test_compiled_sequence_parallel_rows_count_what_their_manager_keeps():
    """``EagerFirst`` (compiled sequence-parallel rows) names its module's manager: without it
    ``module_memory`` found none, so those rows' peaks left out the pooled buffers the eager
    rows count (0.30 against 0.33 MiB forward in a two-rank sweep)."""
    module = ringattn.DilatedAttention((16,), (1,), compile=False)
    wrapped = ablate.EagerFirst(module, torch.compile(module))
    assert ablate.module_memory(wrapped) is module.memory


def test_an_interrupted_sweep_writes_its_rows_and_exits_130(tmp_path, monkeypatch):
    """Ctrl-C mid-sweep: the rows measured so far are written, and the exit status says the
    sweep is partial (it was 0, a complete sweep's)."""
    real = ablate.measure_variant
    calls = []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ablate, "measure_variant", stopped)
    argv = [*TINY, "--computer", "sdpa,math", "--dilation", "segment_local", "--memory", "none"]
    assert ablate.main([*argv, "--out", str(tmp_path)]) == 130
    rows = read_rows(tmp_path)
    assert [r["strategy"] for r in rows if r["strategy"] != ablate.BASELINE] == [
        "segment_local/math/local/none"
    ]
    assert "interrupted: 2 of " in (tmp_path / "results.md").read_text()


def test_a_forward_only_group_draws_no_forward_backward_plot(tmp_path):
    """A group whose rows have no backward (flex on a CPU) got a forward+backward figure of
    the baseline alone."""
    sweep = ablate.parse(["--device", "cpu", "--seq-lens", "64"])
    config = sweep.configs[0]
    rows = []
    for strategy, fwdbwd in ((ablate.BASELINE, 2.0), ("segment_local/flex/local/none", None)):
        own = None if strategy == ablate.BASELINE else config
        row = ablate._row(sweep, strategy, False, 64, own, config.causal)
        row.fwd_ms, row.fwdbwd_ms, row.fwd_peak_mib, row.fwdbwd_peak_mib = 1.0, fwdbwd, 1.0, 2.0
        rows.append(row)
    written = ablate.plot(rows, tmp_path)
    assert [path.name.endswith("_fwd.png") for path in written] == [True]


def test_module_memory_finds_the_modules_manager():
    module = ringattn.DilatedAttention((16,), (1,), compile=False)
    assert ablate.module_memory(module) is module.memory
    assert ablate.module_memory(torch.compile(module)) is module.memory

    def fn(q, k, v):
        return module(q, k, v)

    assert ablate.module_memory(fn) is None
    fn.memory = module.memory
    assert ablate.module_memory(fn) is module.memory


def test_useful_pairs_of_one_whole_sequence_segment_is_dense_attention():
    # the count itself is tested against the oracle in tests/test_flops.py
    n, h = 1 << 20, 16  # analytic: no n × n tensor
    assert ablate.useful_pairs(n, h, [n], [1]) == ablate.dense_pairs(n, h, False) == h * n * n
    assert ablate.useful_pairs(n, h, [n], [1], causal=True) == h * n * (n + 1) // 2


BAD_ARGS = {
    "unknown strategy": (["--computer", "sdpa,nope"], "unknown computer strategy 'nope'"),
    "r does not divide w": (
        ["--segment-lengths", "64", "--dilation-rates", "3"],
        "dilation_rates[0]=3 must divide segment_lengths[0]=64",
    ),
    "non-integer length": (["--segment-lengths", "64.5", "--dilation-rates", "1"], "integers"),
    "malformed seq lens": (["--seq-lens", "256,abc"], "expected comma-separated integers"),
    "zero seq len": (["--seq-lens", "0"], "--seq-lens must be positive"),
    "unpaired config flags": (["--segment-lengths", "64"], "give them in pairs"),
    "missing config file": (["--config-file", "/no/such/configs.json"], "cannot read config"),
    "unknown mixing": (["--mixing", "lse,sum"], "mixing must be one of"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments"),
    "unknown preset": (["--preset", "huge"], "invalid choice"),
    "distributed without torchrun": (["--preset", "distributed"], "launched under torchrun"),
    "ring without torchrun": (["--communicator", "ring"], "'ring' must be launched under torchrun"),
    # before: 0 rows and exit 0; every compiled row an error; every row an error; a traceback
    # after the whole sweep, its results lost
    "no mixing": (["--mixing", ","], "--mixing: expected comma-separated names, got ','"),
    "unknown compile backend": (["--compile-backend", "nope"], "--compile-backend must be one"),
    "meta device": (["--device", "meta"], "--device must be cpu or cuda"),
    "empty filter": (["--computer", ","], "expected comma-separated names, got ','"),
    "results folder under a file": (["--out", "/dev/null/results"], "--out: cannot make"),
    # (before: any negative budget meant "no limit", which --help gives as -1 only)
    "budget below -1": (["--compile-budget", "-2"], "--compile-budget must be >= 0 or -1"),
    # (before: each row measured twice; every compiled row an "error" row)
    "repeated seq len": (["--seq-lens", "256,64,256"], "each value once, got 256 twice"),
    "repeated mixing": (["--mixing", "lse,lse"], "each value once, got lse twice"),
    "repeated name": (["--computer", "sdpa,math,sdpa"], "each value once, got sdpa twice"),
    # (before: its rows measured twice, drawn as one series)
    "repeated config": (
        ["--segment-lengths", "32,64", "--dilation-rates", "1,2"] * 2,
        "segment_lengths=(32, 64) dilation_rates=(1, 2) is given twice",
    ),
    # (before: flex has no sequence-parallel strategy, so only sdpa's rows ran, unsaid)
    "a name no strategy of the filters has": (
        ["--computer", "flex,sdpa", "--communicator", "ring"],
        "--computer flex: no valid strategy of --computer flex,sdpa --communicator ring has it",
    ),
    "backend that does not run": (
        ["--compile-backend", "openxla", "--compile", "on"],
        "--compile-backend 'openxla' does not run here",
    ),
}


@pytest.mark.parametrize("argv, message", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_input_is_one_line_error(argv, message, capsys):
    assert ablate.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ablate: error: ") and message in lines[0]


def test_distributed_preset_on_one_gloo_rank(tmp_path, one_gloo_rank):
    """What torchrun sets up, in process: one rank, so the sequence-parallel path runs here."""
    argv = [*TINY, "--preset", "distributed", "--device", "cpu", "--dtype", "fp32"]
    argv += ["--check-n", "64"]  # sharding: segments must divide n/p or be multiples of it
    argv += ["--mixing", "lse", "--dilation", "segment_local", "--memory", "pooled"]
    assert ablate.main([*argv, "--out", str(tmp_path)]) == 0
    assert not torch.distributed.is_initialized()  # the group main() created is gone
    variants = [r for r in read_rows(tmp_path) if r["strategy"] != ablate.BASELINE]
    assert {r["strategy"].split("/")[2] for r in variants} == {"ring", "all_gather"}
    assert all(r["check"] == "pass" and r["compile"] == "False" for r in variants)


def test_distributed_preset_compiles_its_sequence_parallel_variants(tmp_path, one_gloo_rank):
    """--compile on measures sequence-parallel strategies inside torch.compile(fullgraph=True),
    each new shape after the eager call they need (they were left out: an empty table)."""
    argv = [*TINY, "--preset", "distributed", "--device", "cpu", "--dtype", "fp32"]
    argv += ["--check-n", "64", "--mixing", "lse", "--dilation", "segment_local"]
    argv += ["--memory", "none", "--computer", "math", "--compile", "on"]
    argv += ["--compile-backend", "aot_eager"]
    assert ablate.main([*argv, "--out", str(tmp_path)]) == 0
    variants = [r for r in read_rows(tmp_path) if r["strategy"] != ablate.BASELINE]
    assert {r["strategy"].split("/")[2] for r in variants} == {"ring", "all_gather"}
    assert all(r["check"] == "pass" and r["compile"] == "True" for r in variants), variants


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_preset_without_cuda_is_one_line_error(capsys):
    assert ablate.main(["--preset", "gpu"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


@pytest.mark.parametrize(
    "items, message",
    [
        ([{"segment_lengths": [64, 128], "dilation_rates": [1, 3]}], "must divide"),
        ([{"segment_lengths": [64.0], "dilation_rates": [1]}], "must be an int"),
        ([{"segment_lengths": [64]}], "exactly the keys"),
        ({"segment_lengths": [64], "dilation_rates": [1]}, "non-empty JSON list"),
        ([{"segment_lengths": [64], "dilation_rates": [1]}] * 2, "is given twice"),
    ],
)
def test_bad_config_file_is_one_line_error(tmp_path, capsys, items, message):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(items))
    assert ablate.main(["--config-file", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_config_file_is_read(tmp_path):
    path = tmp_path / "configs.json"
    items = [{"segment_lengths": [16, 32], "dilation_rates": [1, 2]}, {"segment_lengths": [8],
             "dilation_rates": [4]}]  # fmt: skip
    path.write_text(json.dumps(items))
    sweep = ablate.parse(["--config-file", str(path), "--mixing", "lse,head_groups"])
    assert [(c.segment_lengths, c.dilation_rates, c.mixing) for c in sweep.configs] == [
        ((16, 32), (1, 2), "lse"),
        ((16, 32), (1, 2), "head_groups"),
        ((8,), (4,), "lse"),
        ((8,), (4,), "head_groups"),
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dilation", "diagonal"], "unknown dilation strategy 'diagonal'"),
        (["--config-file", "missing.json"], "cannot read config file"),
    ],
)
def test_command_line_error_has_no_traceback(argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.ablate", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ablate: error: ") and message in lines[0]


def test_a_nan_gradient_fails_the_check(tmp_path):
    """A strategy whose dk is NaN: Python's max() dropped the NaN behind the finite forward
    error, and the row said "pass" with exit status 0."""
    from ringattn.computers.math import MathComputer
    from ringattn.registry import register, unregister

    @register("computer", "nan_dk_test")
    class NanDK(MathComputer):
        def backward(self, dout, q, k, v, out, lse, causal, scale):
            dq, dk, dv = super().backward(dout, q, k, v, out, lse, causal, scale)
            return dq, torch.full_like(dk, float("nan")), dv

    try:
        args = ["--computer", "nan_dk_test", "--dilation", "segment_local", "--memory", "none",
                "--seq-lens", "64", "--segment-lengths", "16,32", "--dilation-rates", "1,2",
                "--compile", "off", "--no-baseline", "--out", str(tmp_path)]  # fmt: skip
        assert ablate.main(args) == 1
        rows = list(csv.DictReader((tmp_path / "results.csv").open()))
        assert [row["check"] for row in rows] == ["FAIL"] and rows[0]["grad_rel_err"] == "nan"
    finally:
        unregister("computer", "nan_dk_test")


def test_worst_keeps_a_nan_wherever_it_comes():
    from experiments import worst

    assert math.isnan(worst([1e-7, float("nan"), 2e-7])) and worst([1e-7, 3e-7]) == 3e-7


def test_ablation_rates_are_the_useful_flops_per_second():
    """The sweep's TFLOP/s count what ``ringattn.flops`` counts (the bench's and the docs'
    convention), forward and forward+backward, in TFLOP per second."""
    from ringattn import flops

    b, n, h, d, configs = 2, 256, 4, 16, ((32, 64), (1, 2))
    for causal, backward in ((False, False), (True, True)):
        pairs = flops.useful_pairs(n, h, *configs, causal)
        factor = flops.FORWARD_BACKWARD_FACTOR if backward else 1.0
        useful = flops.useful_flops(b, n, h, d, *configs, causal, "lse", backward=backward)
        assert ablate.tflops(pairs, b, d, 2.0, factor) == pytest.approx(useful / 2e-3 / 1e12)
    assert ablate.tflops(1, b, d, None) is None


def _timed_row(strategy: str, n: int, causal: bool, fwd_ms: float, fwdbwd_ms: float):
    sweep = ablate.parse(["--device", "cpu", "--seq-lens", str(n)])
    row = ablate._row(sweep, strategy, False, n, None, causal)
    row.fwd_ms, row.fwdbwd_ms = fwd_ms, fwdbwd_ms
    return row


def test_each_row_is_timed_against_dense_sdpa_at_its_own_length_and_causality():
    """``t/dense`` is the row's time over dense SDPA's at the same n and causality (a baseline
    found by n alone, or the ratio inverted, passed every test)."""
    dense = [
        _timed_row(ablate.BASELINE, 64, False, 2.0, 8.0),
        _timed_row(ablate.BASELINE, 64, True, 1.0, 4.0),
        _timed_row(ablate.BASELINE, 128, True, 5.0, 20.0),
    ]
    rows = [*dense, _timed_row("x", 64, True, 4.0, 2.0), _timed_row("y", 128, True, 5.0, 10.0)]
    ablate.relate_to_baseline(rows)
    assert (rows[3].fwd_time_vs_dense, rows[3].fwdbwd_time_vs_dense) == (4.0, 0.5)
    assert (rows[4].fwd_time_vs_dense, rows[4].fwdbwd_time_vs_dense) == (1.0, 0.5)
    assert [row.fwd_time_vs_dense for row in dense] == [1.0, 1.0, 1.0]


def test_the_baseline_row_counts_dense_pairs_tensors_and_the_backwards_flops(monkeypatch):
    """Dense SDPA's row: its pairs of its causality, peaks over q, k, v (and the output's
    gradient with the backward), TFLOP/s with the backward's 3.5x (each checked only as > 0)."""
    from ringattn import flops

    sweep = ablate.parse(["--device", "cpu", "--seq-lens", "64", "--heads", "2"])
    p = sweep.preset
    monkeypatch.setattr(ablate, "median_ms", lambda fn, device, warmup, repeats: 2.0)
    monkeypatch.setattr(ablate, "peak_mib", lambda fn, device, live: (live / 2**20, "test"))
    unit = p.batch * 64 * 2 * p.head_dim * sweep.dtype.itemsize  # bytes of one [b, n, h, d]
    for causal in (False, True):
        row = ablate.measure_baseline(sweep, 64, causal)
        assert row.useful_pairs == flops.dense_pairs(64, 2, causal)
        assert (row.fwd_peak_mib * 2**20, row.fwdbwd_peak_mib * 2**20) == (3 * unit, 4 * unit)
        useful = flops.dense_flops(p.batch, 64, 2, p.head_dim, causal)
        assert row.fwd_tflops == pytest.approx(useful / 2e-3 / 1e12)
        assert row.fwdbwd_tflops == pytest.approx(3.5 * row.fwd_tflops)


def test_the_printed_table_shows_each_column_of_its_own_value():
    row = _timed_row("x", 64, False, 4.0, 2.0)
    row.fwd_time_vs_dense, row.fwdbwd_time_vs_dense = 0.5, 0.25
    row.fwdbwd_peak_mib, row.fwdbwd_tflops, row.grad_rel_err = 12.5, 0.125, 3e-3
    headers, (cells,) = ablate.short_table([row])
    table = dict(zip(headers, cells))
    assert (table["t/dense fwd"], table["t/dense f+b"]) == ("0.50", "0.25")
    assert (table["fwd ms"], table["f+b ms"]) == ("4", "2")
    assert (table["MiB f+b"], table["TFLOP/s f+b"]) == ("12.5", "0.125")
    assert table["err grad"] == "3.0e-03"
    rendered = ablate.dict_rows_to_markdown([{"a": 0.94712, "b": 3}], ["a", "b"])
    assert rendered.splitlines()[-1] == "| 0.947 | 3 |"


def test_the_check_measures_gradients_against_a_tenth_of_grad_outs_norm():
    """A gradient whose reference is zero is measured against 0.1‖grad_out‖ (the suite's floor):
    a larger floor hid errors near the tolerance, a zero one failed rounding noise."""
    sweep = ablate.parse(["--device", "cpu", "--seq-lens", "64", "--check-n", "32"])
    config = sweep.configs[0]
    oracle = ablate.make_oracle(sweep, config)
    zeros = tuple(torch.zeros_like(g) for g in oracle.grads)
    oracle = ablate.Oracle(oracle.inputs, oracle.out, zeros)
    module = ringattn.DilatedAttention(
        config.segment_lengths, config.dilation_rates, mixing=config.mixing, compile=False
    )
    leaves = [x.detach().clone().requires_grad_() for x in oracle.inputs[:3]]
    grads = torch.autograd.grad(module(*leaves), leaves, oracle.inputs[3])
    expected = max(float(g.double().norm()) for g in grads)
    expected /= 0.1 * float(oracle.inputs[3].double().norm())
    _, grad_err, _ = ablate.check(module, oracle)
    assert grad_err == pytest.approx(expected)


def test_timed_backwards_run_the_models_path_on_views_of_their_inputs():
    """ablate and bench time forward+backward on views of their leaf inputs, as a model's
    projections hand q, k, v: leaves take the core's three-buffer path (each .grad owns its
    storage), up to 4% slower at 32K on an H200 (h200_perf.md step 78)."""
    from experiments import bench

    seen = []

    def attend(q, k, v):
        seen.append([x.is_leaf for x in (q, k, v)])
        return q * k * v

    inputs = [torch.randn(1, 4, 2, 3) for _ in range(4)]
    ablate.forward_backward_fn(attend, inputs)()
    bench.fwd_and_fwdbwd(attend, *inputs)[1]()
    assert seen == [[False] * 3] * 2
