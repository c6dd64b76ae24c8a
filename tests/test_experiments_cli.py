"""Every script under ``experiments/`` imports on a CPU-only machine and parses ``--help``: the GPU
ones are run only on a lent device, so a broken import or argument table must show up here."""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCE, make_qkv, options, problems, rel_err
from hypothesis import given

import ringattn
from ringattn import reference

SCRIPTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "experiments").glob("*.py") if p.stem != "__init__"
)


def refused(main, argv: list[str], capsys) -> str:
    """What ``main(argv)`` says as it exits with argparse's code 2 (a one-line refusal)."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    return capsys.readouterr().err


def test_every_script_is_listed():
    assert {"bench", "overheads", "merge_launch", "distributed_bench"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_parses_help(name, capsys):
    module = importlib.import_module(f"experiments.{name}")
    main = getattr(module, "main", None)
    if main is None:
        pytest.skip(f"experiments.{name} has no main()")
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out


class _Parsed(Exception):
    """Raised in place of parsing, carrying the script's parser."""


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_says_what_it_does(name, monkeypatch):
    """``--help`` is the scripts' manual (they run on a lent GPU from one command line): every
    option of every script has a help text."""
    module = importlib.import_module(f"experiments.{name}")
    main = getattr(module, "main", None)
    if main is None:
        pytest.skip(f"experiments.{name} has no main()")

    def parsed(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    with pytest.raises(_Parsed) as got:
        main([])
    parser = got.value.args[0]
    silent = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert not silent, f"experiments.{name}: options without a help text: {silent}"


GPU_ONLY = [
    "overheads",
    "profile_core",
    "sdpa_backends",
    "merge_launch",
    "clock_probe",
    "fa4_probe",
    "gpu_fuzz",
    "cudnn_frontend_probe",  # (it said to install the frontend, which needs a GPU too)
    "graph_capture_check",
    "replay_check",
    "timing_floor",
    "cuda_graph_modes",
    "one_key_grads",
    "peak_probe",
    "kernel_timeline",  # (these two said so in their own words)
    "flex_gpu",
]


@pytest.mark.parametrize(
    "n, want",
    [
        (1024, ((1024,), (1,))),  # (shorter than the first: cut to n, where it was kept at 2048)
        (2048, ((2048,), (1,))),
        (12288, ((2048, 4096, 8192), (1, 2, 4))),
        (1 << 20, ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16))),
    ],
)
def test_issue_configs_keep_the_lengths_that_fit_n(n, want):
    from experiments import issue_configs

    assert issue_configs(n) == want


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_tools_say_so_without_cuda(name, monkeypatch):
    """Run without a GPU they exit with one line naming the tool (they failed inside torch with
    "Torch not compiled with CUDA enabled")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as done:
        module.main([])
    assert "CUDA is not available here" in str(done.value.code)


@pytest.mark.parametrize("name", ["distributed_bench", "rank_check_cost"])
def test_multi_rank_tools_say_how_to_launch_outside_torchrun(name, monkeypatch):
    """Run with plain python they exit with one line naming the launcher (rank_check_cost failed
    inside torch.distributed's rendezvous with "environment variable RANK expected")."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as done:
        module.main([])
    assert str(done.value.code) == f"{name}: error: launch with torchrun --nproc_per_node=P"


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_longrange_refuses_a_step_count_below_one(steps, capsys):
    from experiments import train_longrange

    err = refused(train_longrange.main, ["--steps", steps], capsys)
    assert "--steps must be a positive integer" in err


def test_train_longrange_baselines_refuse_a_kv_cache():
    """The dense / sliding-window baselines keep no cache: given one, a decoding step attended
    the new token to itself alone, with no error."""
    from experiments import train_longrange
    from ringattn.models import LongNetConfig
    from ringattn.nn import KVCache

    config = LongNetConfig(vocab_size=8, dim=16, depth=1, num_heads=2)
    attention = train_longrange.BaselineAttention(config, window=None)
    x = torch.randn(1, 3, 16)
    assert attention(x).shape == x.shape
    with pytest.raises(ValueError, match="keep no KV cache"):
        attention(x[:, :1], KVCache.empty(1, 4, 2, 8, torch.float32, "cpu"))


def test_train_longrange_refuses_an_out_it_cannot_make_before_training(monkeypatch, capsys):
    """A bad --out raised NotADirectoryError after every model had trained (~20 min on CPU)."""
    from experiments import train_longrange

    def train(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(train_longrange, "train", train)
    err = refused(train_longrange.main, ["--task", "majority", "--out", "/dev/null/x"], capsys)
    assert "--out: cannot make '/dev/null/x/majority'" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        # unknown names timed no strategy, silently (--memory: a traceback from the registry)
        ("--computers sdpa nope", "--computers: unknown computer nope; registered:"),
        ("--dilations nope", "--dilations: unknown dilation nope; registered:"),
        ("--memory nope", "--memory: unknown memory nope; registered:"),
        ("--b2b-calls -1", "--b2b-calls must be >= 0"),  # (negative ratios)
        ("--warmup -1", "--warmup must be >= 0"),
        ("--dense-max-n 0", "--dense-max-n must be >= 1"),  # (ZeroDivisionError)
        ("--batch 0", "--batch must be >= 1"),  # (empty inputs: no row, no error)
        # (the same rows twice under one label)
        ("--compile-modes default default", "--compile-modes: default given more than once"),
        ("--n 64 128 64", "--n: 64 given more than once"),
        ("--computers sdpa math sdpa", "--computers: sdpa given more than once"),
        ("--graphs", "--graphs replays CUDA graphs: it needs --device cuda"),
        # (the baselines alone, timed, and exit status 0)
        ("--computers flex --no-compile", "no strategy to time with --computers flex"),
        ("--no-eager --no-compile", "no strategy to time"),
    ],
)
def test_bench_refuses_bad_options_in_one_line(argv, message, capsys):
    from experiments import bench

    assert message in refused(bench.parse, ["--device", "cpu", *argv.split()], capsys)


def run_fuzz(tmp_path, *extra: str) -> dict:
    from experiments import gpu_fuzz

    args = ["--device", "cpu", "--draws", "2", "--max-n", "48", "--max-d", "16"]
    gpu_fuzz.main([*args, "--out", str(tmp_path), *extra])
    import json

    return json.loads((tmp_path / "gpu_fuzz.json").read_text())


def test_gpu_fuzz_runs_on_the_cpu(tmp_path):
    """The GPU fuzz's draws, modules and checks, on the CPU's kernels: no failure."""
    rows = run_fuzz(tmp_path)["rows"]
    checked = [row for row in rows if "ok" in row]
    assert len(checked) >= 2 * 3 * 4 and all(row["ok"] for row in checked)
    assert {row["call"] for row in checked} == {0, 1, 2}
    assert (
        "--seed 0 --max-n 48 --max-d 16 --kernels installed --draws 2`"
        in (tmp_path / "gpu_fuzz.md").read_text()
    )  # the recorded command draws what was drawn (it left --draws out)


def test_gpu_fuzz_deterministic_holds_a_repeated_call_to_its_bits(tmp_path, monkeypatch):
    """--deterministic: every call in that mode (restored after), and each module's second call
    on the first problem given the first call's bits; results an ulp apart on one element (far
    below the oracle's bound, as an atomic sum's other order) fail only that check."""
    from experiments import gpu_fuzz

    rows = run_fuzz(tmp_path, "--deterministic")["rows"]
    checked = [row for row in rows if "ok" in row]
    assert checked and all(row["ok"] for row in checked)
    assert {row["same_bits"] for row in checked if row["call"] == 1} == {True}
    assert all("same_bits" not in row for row in checked if row["call"] != 1)
    assert not torch.are_deterministic_algorithms_enabled()
    run = gpu_fuzz.run
    calls = iter(range(10**6))

    def nudged(*args):  # (every other call: one element of dQ an ulp up)
        out, grads = run(*args)
        if next(calls) % 2:
            dq = grads[0].clone(memory_format=torch.contiguous_format)
            dq.view(-1)[:1] = torch.nextafter(dq.view(-1)[:1], torch.tensor(math.inf))
            grads = (dq, *grads[1:])
        return out, grads

    monkeypatch.setattr(gpu_fuzz, "run", nudged)
    rows = [row for row in run_fuzz(tmp_path, "--deterministic")["rows"] if "ok" in row]
    repeats = [row for row in rows if row["call"] == 1]
    assert repeats and not any(row["ok"] or row["same_bits"] for row in repeats)
    assert all(row["ok"] for row in rows if row["call"] != 1)


def plant_a_dq_error(monkeypatch) -> None:
    """sdpa's dQ 5% off."""
    from ringattn.computers.sdpa import SDPAComputer

    backward = SDPAComputer.backward

    def off(self, *args):
        dq, dk, dv = backward(self, *args)
        return dq * 1.05, dk, dv

    monkeypatch.setattr(SDPAComputer, "backward", off)


def test_gpu_fuzz_reports_a_wrong_gradient(tmp_path, monkeypatch):
    """A planted bug (sdpa's dQ 5% off) is a failure of every sdpa call, not of math's."""
    plant_a_dq_error(monkeypatch)
    rows = [row for row in run_fuzz(tmp_path)["rows"] if "ok" in row]
    assert {row["ok"] for row in rows if "/sdpa/" in row["strategy"]} == {False}
    assert {row["ok"] for row in rows if "/math/" in row["strategy"]} == {True}


def test_gpu_fuzz_threads_check_every_threads_call(tmp_path, monkeypatch):
    """--threads 2: each call is made by two threads at once, the second on the next problem,
    and each thread's result is held to its own oracle. Planted: a wrong output from calls made
    off the main thread at the second problem's length, which call 1 makes in thread 1 only
    (call 2 in thread 0, as without threads)."""
    import threading

    from experiments import gpu_fuzz

    run, seconds = gpu_fuzz.run, []

    def wrong_off_main(module, q, k, v, grad):
        out, grads = run(module, q, k, v, grad)
        off_main = threading.current_thread() is not threading.main_thread()
        return (out * 2 if off_main and q.shape[1] == seconds[-1] else out), grads

    def longer(p, rng, max_n):
        seconds.append(p["n"] + 16)
        return p | {"n": seconds[-1]}

    monkeypatch.setattr(gpu_fuzz, "run", wrong_off_main)
    monkeypatch.setattr(gpu_fuzz, "second_problem", longer)
    rows = [row for row in run_fuzz(tmp_path, "--threads", "2")["rows"] if "ok" in row]
    assert {row["ok"] for row in rows if row["call"] == 1} == {False}
    assert {row["ok"] for row in rows if row["call"] == 0} == {True}
    assert "threads 2" in (tmp_path / "gpu_fuzz.md").read_text()


def test_gpu_fuzz_threads_check_the_others_where_one_thread_is_refused(tmp_path, monkeypatch):
    """A call refused in one thread (its own problem) left the row "refused" and the other
    threads' results unchecked. Planted: sdpa refuses the second problem's length and is wrong
    at the first's, so calls 1 and 2 (one thread on each) must fail, not be refused."""
    from experiments import gpu_fuzz

    run, seconds = gpu_fuzz.run, []

    def refused_at_second_wrong_at_first(module, q, k, v, grad):
        if module.strategy.computer != "sdpa":
            return run(module, q, k, v, grad)
        if q.shape[1] == seconds[-1]:
            raise ValueError("planted refusal")
        out, grads = run(module, q, k, v, grad)
        return out * 2, grads

    def longer(p, rng, max_n):
        seconds.append(p["n"] + 16)
        return p | {"n": seconds[-1]}

    monkeypatch.setattr(gpu_fuzz, "run", refused_at_second_wrong_at_first)
    monkeypatch.setattr(gpu_fuzz, "second_problem", longer)
    rows = run_fuzz(tmp_path, "--threads", "2")["rows"]
    sdpa = [row for row in rows if "/sdpa/" in row["strategy"]]
    assert {row["call"] for row in sdpa} == {0, 1, 2}
    assert all(row.get("ok") is False for row in sdpa), [r.get("refused") for r in sdpa]


def test_gpu_fuzz_replays_the_problems_its_run_drew(tmp_path):
    """--replay redrew each seed at the replay's own --max-n / --max-d (8192 / 256 unless given):
    a run at other values had its failures replayed on other problems, without a word.
    --replay-from takes them from the run's gpu_fuzz.json and redraws its problems."""
    from experiments import gpu_fuzz

    record = run_fuzz(tmp_path)  # (--max-n 48 --max-d 16)
    assert (record["max_n"], record["max_d"], record["kernels"]) == (48, 16, "installed")
    assert sorted(record["problems"]) == ["0", "1"]
    # what the replay drew before: other problems (the test would prove nothing otherwise)
    assert gpu_fuzz.replay_mismatch(0, record["problems"]["0"], 8192, 256)
    out = tmp_path / "replay"
    recorded = str(tmp_path / "gpu_fuzz.json")
    gpu_fuzz.main(
        ["--device", "cpu", "--replay-from", recorded, "--replay", "0", "1", "--out", str(out)]
    )
    rows = json.loads((out / "gpu_fuzz_replay.json").read_text())
    for seed in (0, 1):
        whole = [row for row in rows if row["seed"] == seed and row["configs"] == "all"]
        problem = record["problems"][str(seed)]
        first = [row for row in whole if row["problem"] == "first"]
        assert first and all({key: row[key] for key in problem} == problem for row in first)
        assert all("error" not in row for row in whole)
        # the second problem (the run's call 2) too: the run's problem and inputs, so the same
        # strategy's default kernels make the very same error of it
        run = [
            row
            for row in record["rows"]
            if row.get("seed") == seed and row["strategy"] == "segment_local/sdpa/local/none"
        ]
        for which, call in (("first", 0), ("second", 2)):
            (drawn,) = [row for row in run if row["call"] == call]
            (again,) = [
                row for row in whole if (row["problem"], row["variant"]) == (which, "default")
            ]
            assert {key: again[key] for key in problem} == {key: drawn[key] for key in problem}
            assert again["fwd_err"] == drawn["fwd_err"]
    assert "--max-n 48 --max-d 16 --replay 0 1`" in (out / "gpu_fuzz_replay.md").read_text()


def test_gpu_fuzz_says_how_to_replay_its_failures_as_drawn(tmp_path, monkeypatch):
    """gpu_fuzz.md said how the run was drawn but no replay: ``--replay SEED`` alone redrew at
    the defaults. It prints the failures' replay with the run's --max-n / --max-d, and
    --replay-from alone replays the failed seeds at them."""
    from experiments import gpu_fuzz

    plant_a_dq_error(monkeypatch)
    record = run_fuzz(tmp_path)
    seeds = sorted({row["seed"] for row in record["rows"] if row.get("ok") is False})
    assert seeds
    replay = f"--kernels installed --max-n 48 --max-d 16 --replay {' '.join(map(str, seeds))}`"
    assert (
        f"Replay: `python -m experiments.gpu_fuzz --device cpu {replay}"
        in (tmp_path / "gpu_fuzz.md").read_text()
    )
    replayed = []

    def replay_stub(seeds, args, device):
        replayed.append((seeds, args.max_n, args.max_d))
        return []

    monkeypatch.setattr(gpu_fuzz, "replay", replay_stub)
    recorded = str(tmp_path / "gpu_fuzz.json")
    gpu_fuzz.main(["--device", "cpu", "--replay-from", recorded, "--out", str(tmp_path / "r")])
    assert replayed == [(seeds, 48, 16)]


@given(problem=problems())
def test_bench_plain_baseline_is_head_groups_dilated_attention(problem):
    """The plain baseline (gather, SDPA, scatter) computes the oracle's ``head_groups`` at any
    length: a partial tail, ``w > n`` included (the bench checks it at ``--check-n``)."""
    from experiments import bench

    problem |= {"mixing": "head_groups", "scale": None}
    q, k, v = make_qkv(problem, torch.float64)
    lengths, rates = problem["segment_lengths"], problem["dilation_rates"]
    out = bench.plain_head_groups(q, k, v, lengths, rates, problem["causal"])
    ref = reference.dilated_attention(q, k, v, **options(problem))
    assert rel_err(out, ref) < TOLERANCE[torch.float64]


def test_bench_refuses_an_out_it_cannot_make_before_timing(monkeypatch, capsys):
    """It made --out after every row had run (and on the GPU, been timed)."""
    from experiments import bench

    def bench_case(*args):
        raise AssertionError("timed before checking --out")

    monkeypatch.setattr(bench, "bench_case", bench_case)
    with pytest.raises(SystemExit) as done:
        bench.main(["--device", "cpu", "--out", "/dev/null/x"])
    assert "--out: cannot make '/dev/null/x'" in str(done.value.code)


def test_bench_checks_at_its_own_length_by_default():
    """A CPU run at small n checked at 32K (the float64 oracle's loop there took minutes: the
    docstring's CPU line did not finish in 10)."""
    from experiments import bench

    assert bench.parse(["--device", "cpu", "--n", "512", "256"]).check_n == 512
    assert bench.parse(["--n", "131072", "32768"]).check_n == 32768
    assert bench.parse(["--n", "1048576", "--check-n", "0"]).check_n == 0


def test_bench_runs_on_the_cpu(tmp_path):
    """The whole benchmark, one small row per variant: every row checked against the oracle."""
    from experiments import bench

    argv = "--device cpu --n 128 --lengths 32 64 --rates 1 2 --heads 2 --dim 8 --computers sdpa"
    argv += " --mixing lse --causal yes --repeats 1 --warmup 0 --b2b-calls 0"
    assert bench.main([*argv.split(), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    variants = [row for row in rows if row["variant"] not in ("dense SDPA", "plain")]
    # two dilations x (eager, in torch.compile): sdpa's "(compiled)" row, its own compile=True
    # in the default mode, opens no frame and repeated the eager row; the [flash] A/B is CUDA's
    # (on a CPU it repeated the eager row under another name)
    assert len(variants) == 4
    assert not any(row["variant"].endswith(("(compiled)", "[flash]")) for row in variants)
    assert all(0 <= row["oracle_err"] < 2e-2 for row in variants)  # (bf16; NaN fails too)
    assert all(row["check"] == "pass" for row in variants)
    assert (tmp_path / "bench.md").read_text().count("| 128 | lse | True |") == len(rows)
    (dense,) = [row for row in rows if row["variant"] == "dense SDPA"]
    assert dense["fwd_vs_dense"] == dense["fwdbwd_vs_dense"] == 1.0
    assert not any("graph" in name for row in rows for name in row)  # (no --graphs)


def test_bench_runs_a_batch_against_the_oracle(tmp_path):
    """``--batch``: every row, the oracle check's input and dense SDPA's at that batch size
    (whose lse blocks past the first go once per batch entry: ringattn.launches)."""
    from experiments import bench

    argv = "--device cpu --n 128 --lengths 32 64 --rates 1 2 --heads 2 --dim 8 --computers sdpa"
    argv += " --dilations segment_local --no-compile --no-in-model --no-flash-row --no-torch-row"
    argv += " --mixing lse --causal no --repeats 1 --warmup 0 --b2b-calls 0 --batch 3"
    bench.main([*argv.split(), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["meta"]["shape"]["b"] == 3
    (row,) = [row for row in report["rows"] if row["variant"] == "segment_local/sdpa"]
    assert 0 <= row["oracle_err"] < 2e-2  # (bf16; NaN fails too)
    one = bench.useful_flops(1, 128, 2, 8, (32, 64), (1, 2), False, "lse")
    assert row["fwd_tflops"] == pytest.approx(bench.tflops(3 * one, row["fwd_ms"]))  # (b = 3)


def test_bench_reports_the_first_calls_peaks_apart(monkeypatch):
    """The first calls (FA4's kernel checks, replay recordings, caches filled) get peaks of
    their own, each against its call's unavoidable tensors: step 70's 2M-token first call ran
    out of memory where the later calls' peak, the only one measured, read 1.07x."""
    from experiments import bench

    unit, calls, peaks = 1000, [], iter([5000, 9000, 1000, 2000])  # first fwd, fwdbwd; later

    def fake_peak(fn, device):
        return float(next(peaks))

    class Pool:  # a memory manager that keeps 500 bytes after the first forward
        def clear(self):
            calls.append("clear")

        def held_bytes(self):
            return 500 if "fwd" in calls else 0

    monkeypatch.setattr(bench, "peak_extra_bytes", fake_peak)
    stats = bench.time_and_memory(
        lambda: calls.append("fwd"),
        lambda: calls.append("fwdbwd"),
        unit,
        torch.device("cpu"),
        0,
        1,
        memory=Pool(),
    )
    assert calls[:3] == ["clear", "fwd", "fwdbwd"]  # (the first calls ran, outside the timings)
    assert stats["fwd_first_mem_vs_io"] == (3 + 5) / 4  # (what it keeps is in its peak)
    assert stats["fwdbwd_first_mem_vs_io"] == (4 + 9 + 0.5) / 8  # (the forward's kept bytes)
    assert stats["fwd_mem_vs_io"] == (3 + 1 + 0.5) / 4
    assert stats["fwdbwd_mem_vs_io"] == (4 + 2 + 0.5) / 8


def test_bench_rates_are_useful_tflops_per_second():
    """The absolute rates the tables print (dense SDPA's ~610-660 TFLOP/s on an H200 is read
    from them), not only their ratios, which a wrong unit leaves unchanged."""
    from experiments import bench

    stats = {"fwd_ms": 10.0, "fwdbwd_ms": None, "fwd_ms_graph": 8.0}
    bench.add_rates(stats, {"fwd": 4e12, "fwdbwd": 14e12})  # FLOPs per call
    assert stats["fwd_tflops"] == pytest.approx(400.0)  # 4e12 FLOPs in 10 ms
    assert stats["fwd_tflops_graph"] == pytest.approx(500.0)
    assert stats["fwdbwd_tflops"] is None and "fwdbwd_tflops_graph" not in stats


def test_bench_sets_each_timing_against_dense_sdpas_of_its_kind():
    """Single calls and back to back against dense SDPA's single call, replays (--graphs)
    against dense SDPA replayed: a row replayed at dense's replayed rate is at 1.0, whatever
    dense's single-call rate."""
    from experiments import bench

    useful_f, useful_fb = 4e12, 10e12  # FLOPs: 400 / 500 TFLOP/s at 10 / 20 ms
    row = {"fwd_tflops": 400.0, "fwdbwd_tflops": None, "fwd_ms_b2b": 8.0}
    row |= {"fwd_tflops_graph": 450.0, "fwdbwd_tflops_graph": 500.0}
    dense = {"fwd_tflops": 500.0, "fwdbwd_tflops": 400.0}
    dense |= {"fwd_tflops_graph": 450.0, "fwdbwd_tflops_graph": 625.0}
    bench.add_ratios(row, useful_f, useful_fb, dense)
    assert row["fwd_vs_dense"] == pytest.approx(0.8) and row["fwdbwd_vs_dense"] is None
    assert row["fwd_vs_dense_b2b"] == pytest.approx(1.0)  # 500 TFLOP/s back to back
    assert row["fwd_vs_dense_graph"] == pytest.approx(1.0)
    assert row["fwdbwd_vs_dense_graph"] == pytest.approx(0.8)
    unreplayed = {"fwd_tflops": 400.0, "fwdbwd_tflops": 200.0}
    bench.add_ratios(unreplayed, useful_f, useful_fb, {"fwd_tflops": 500.0, "fwdbwd_tflops": 400.0})
    assert unreplayed == {"fwd_tflops": 400.0, "fwdbwd_tflops": 200.0} | {
        "fwd_vs_dense": pytest.approx(0.8),
        "fwdbwd_vs_dense": pytest.approx(0.5),
    }


BENCH_CASE = "--device cpu --lengths 32 64 --rates 1 2 --heads 2 --dim 8 --computers sdpa"
BENCH_CASE += " --dilations segment_local --no-compile --no-in-model --no-flash-row --no-torch-row"
BENCH_CASE += " --check-n 0 --warmup 3 --repeats 1 --b2b-calls 4 --dense-max-n 64"


def test_bench_case_counts_each_rows_flops_against_dense_sdpas_of_its_kind(monkeypatch):
    """Every call timed 1 ms: each row's rates are then its useful FLOPs (causal where it is
    causal, x3.5 with the backward), dense SDPA's those of its own causality at --dense-max-n,
    and each ratio theirs. The pieces (flops, add_rates, add_ratios) have tests of their own;
    this holds bench_case to handing them the right counts (a non-causal count for a causal row,
    dense SDPA's at n instead of --dense-max-n, or a causal row set against non-causal dense
    SDPA's cached rate passed every test), and its timings to --warmup and --b2b-calls."""
    from experiments import bench

    timed = []

    def one_ms(fn, device, warmup, repeats, calls=1, settle_s=0.0):
        timed.append((warmup, calls))
        return 1.0

    monkeypatch.setattr(bench, "median_ms", one_ms)
    args = bench.parse(BENCH_CASE.split())
    b, n, h, d, lengths, rates = 1, 128, 2, 8, (32, 64), (1, 2)
    assert bench.useful_flops(b, n, h, d, lengths, rates, True, "lse") != bench.useful_flops(
        b, n, h, d, lengths, rates, False, "lse"
    )  # (else the causal rows could not tell)
    dense_cache: dict = {}
    for causal in (False, True):  # (one cache, as main's: causal after non-causal)
        rows = bench.bench_case(n, "lse", causal, args, torch.device("cpu"), dense_cache)
        (row,) = [row for row in rows if row["variant"] == "segment_local/sdpa"]
        (dense,) = [row for row in rows if row["variant"].startswith("dense SDPA")]
        useful = bench.useful_flops(b, n, h, d, lengths, rates, causal, "lse")
        dense_useful = bench.dense_flops(b, 64, h, d, causal)
        assert row["fwd_tflops"] == pytest.approx(bench.tflops(useful, 1.0))
        assert row["fwdbwd_tflops"] == pytest.approx(3.5 * row["fwd_tflops"])
        assert dense["fwd_tflops"] == pytest.approx(bench.tflops(dense_useful, 1.0))
        assert dense["fwdbwd_tflops"] == pytest.approx(3.5 * dense["fwd_tflops"])
        for ratio in ("fwd_vs_dense", "fwdbwd_vs_dense", "fwd_vs_dense_b2b", "fwdbwd_vs_dense_b2b"):
            assert row[ratio] == pytest.approx(useful / dense_useful), ratio
        assert dense["variant"] == "dense SDPA (rate at n=64)" and dense["fwd_ms"] is None
    assert set(timed) == {(3, 1), (0, 4)}  # (single calls after the warm-up; back to back)


def test_bench_case_times_the_forward_alone_from_fwd_only_from():
    """--fwd-only-from n: no backward at n (4M tokens: it does not fit), one below it does."""
    from experiments import bench

    argv = [*BENCH_CASE.split(), "--repeats", "1", "--warmup", "0", "--b2b-calls", "0"]
    for n, backward in ((128, False), (96, True)):
        args = bench.parse([*argv, "--fwd-only-from", "128"])
        rows = bench.bench_case(n, "lse", False, args, torch.device("cpu"), {})
        (row,) = [row for row in rows if row["variant"] == "segment_local/sdpa"]
        assert row["fwd_ms"] > 0 and (row["fwdbwd_ms"] is not None) == backward


def test_bench_fails_a_wrong_variant_and_one_that_raises(tmp_path, monkeypatch, capsys):
    """The oracle check judged nothing: a wrong computer (0.8 off) or one returning NaN was timed
    and reported as a right one, and a variant that raised was a printed line; the exit status
    was 0 either way. Now ``check`` says FAIL and the status is 1."""
    from experiments import bench
    from ringattn.computers.sdpa import SDPAComputer

    argv = [*BENCH_CASE.split(), "--n", "64", "--check-n", "64", "--mixing", "lse"]
    argv += ["--causal", "no", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    plant_a_dq_error(monkeypatch)
    monkeypatch.setattr(bench, "_ORACLE", {})
    assert bench.main(argv) == 1
    report = json.loads((tmp_path / "bench.json").read_text())
    (row,) = [row for row in report["rows"] if row["variant"] == "segment_local/sdpa"]
    assert row["check"] == "FAIL" and row["oracle_err"] > 1e-2
    assert "FAIL (oracle_err" in capsys.readouterr().out

    def raises(self, *args):
        raise RuntimeError("a broken kernel")

    monkeypatch.setattr(SDPAComputer, "forward", raises)
    assert bench.main(argv) == 1
    (failure,) = json.loads((tmp_path / "bench.json").read_text())["failed"]
    assert failure.startswith("FAILED segment_local/sdpa n=64") and "a broken kernel" in failure


def test_bench_checks_the_output_alone_where_the_timing_is_forward_only(monkeypatch):
    """``--fwd-only-from`` timed flex on the CPU (no backward there) forward only, but its
    oracle check ran a backward first, so the row failed before it was timed."""
    from experiments import bench

    monkeypatch.setattr(bench, "_ORACLE", {})
    args = bench.parse([*BENCH_CASE.split(), "--check-n", "64", "--fwd-only-from", "1"])
    flex = ringattn.DilatedAttention(
        (32, 64), (1, 2), strategy=ringattn.Strategy(computer="flex"), compile=False
    )
    cpu = torch.device("cpu")
    assert bench.check(flex, "lse", False, args, cpu, backward=False) < 2e-2
    with pytest.raises(ValueError, match="no backward"):
        bench.check(flex, "lse", False, args, cpu)


def test_bench_checks_gradients_where_a_row_is_timed_with_its_backward(tmp_path, monkeypatch):
    """The gradient check followed the check's own length: with ``--check-n`` at or past
    ``--fwd-only-from`` no row's gradients were checked, though the shorter rows were timed
    forward+backward (a dQ 5% off passed, exit 0)."""
    from experiments import bench

    monkeypatch.setattr(bench, "_ORACLE", {})
    plant_a_dq_error(monkeypatch)
    argv = [*BENCH_CASE.split(), "--n", "64", "128", "--check-n", "128", "--fwd-only-from", "128"]
    assert bench.main([*argv, "--mixing", "lse", "--causal", "no", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    checks = {row["n"]: row["check"] for row in rows if row["variant"] == "segment_local/sdpa"}
    assert checks == {64: "FAIL", 128: "pass"}  # (128: timed forward only, its output right)


def test_bench_oracle_check_sees_a_wrong_gradient(monkeypatch):
    """The oracle_err column is the worst of the output's and the gradients' errors (a check of
    the output alone passed every test)."""
    from experiments import bench

    monkeypatch.setattr(bench, "_ORACLE", {})
    args = bench.parse([*BENCH_CASE.split(), "--check-n", "96", "--dtype", "float32"])
    module = ringattn.DilatedAttention(
        (32, 64), (1, 2), strategy=ringattn.Strategy(computer="sdpa"), compile=False
    )
    assert bench.check(module, "lse", False, args, torch.device("cpu")) < 1e-4
    plant_a_dq_error(monkeypatch)
    assert bench.check(module, "lse", False, args, torch.device("cpu")) > 1e-2


def test_gpu_fuzz_measures_gradients_against_the_suites_floor():
    """A gradient that is exactly zero (dQ where each query sees one key) was compared with its
    absolute rounding noise: 1.9e-5 of a flash-style float32 backward failed seed 11's draw on
    an H200 (torch's own kernel makes the same). Measured against a tenth of ‖grad_out‖, as the
    suite measures, that noise is small and a wrong gradient is still O(1)."""
    import torch

    from experiments import gpu_fuzz

    grad_out = torch.ones(2, 4, 1, 8)  # ‖grad_out‖ = 8
    ref = (torch.ones(2, 4, 1, 8), [torch.zeros(2, 4, 1, 8), torch.ones(2, 4, 1, 8)])
    noise = torch.full((2, 4, 1, 8), 1e-6)
    fwd, grad = gpu_fuzz.errors((ref[0], [noise, ref[1][1]]), ref, grad_out)
    assert fwd == 0 and grad == pytest.approx(float(noise.norm()) / 0.8)
    _, wrong = gpu_fuzz.errors((ref[0], [torch.ones(2, 4, 1, 8), ref[1][1]]), ref, grad_out)
    assert wrong == pytest.approx(10.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        # (each ran on the GPU only: a StatisticsError, rows labelled split 0 that ran split 1,
        # the library's ValueError)
        ("--repeats 0", "--repeats must be >= 1"),
        ("--split 0", "--split must be >= 1"),
        ("--n 32768 -1", "--n must be >= 1"),
        ("--heads 0", "--heads must be >= 1"),
        ("--mixing lse nope", "--mixing must be among"),
    ],
)
def test_overheads_refuses_bad_options_in_one_line(argv, message, capsys):
    from experiments import overheads

    assert message in refused(overheads.main, argv.split(), capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        # a traceback on every rank once the part came (ringattn's ValueError from the shards)
        ("--part cp --cp-n 514", "--cp-n: 514 must be divisible by 2p = 4"),
        ("--part speed --seq-lens 1001", "--seq-lens: 1001 must be divisible by the 2 ranks"),
        ("--part speed --seq-lens 1002", "--seq-lens 1002: dilation_rates[2]=4 must divide"),
        ("--part check weak --weak-n 3000", "--weak-n 3000 on 2 ranks: segment_lengths[0]=2048"),
        ("--part all --weak-n 1001", "--weak-n 1001 on 2 ranks: dilation_rates[1]=2 must"),
        # (the files were named after the list: distributed_all_check.md)
        ("--part all check", "--part: each part once, and 'all' alone; got all check"),
        ("--part check check", "--part: each part once, and 'all' alone; got check check"),
    ],
)
def test_distributed_bench_refuses_sizes_it_cannot_shard_in_one_line(
    argv, message, monkeypatch, capsys
):
    """Before the process group starts (no RANK here: the rendezvous would raise)."""
    from experiments import distributed_bench

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert message in refused(distributed_bench.main, argv.split(), capsys)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_distributed_bench_takes_its_default_sizes(p):
    from experiments import distributed_bench

    sizes = argparse.Namespace(
        seq_lens=[65536, 262144], weak_n=[16384, 65536, 262144], cp_n=[131072, 262144, 524288]
    )
    assert distributed_bench.size_error({"check", "speed", "weak", "cp"}, sizes, p) is None


@pytest.mark.parametrize("n_per_gpu", [1024, 16384])
def test_distributed_bench_weak_efficiencies_are_all_throughput_ratios(n_per_gpu, monkeypatch):
    """The back-to-back and graph efficiencies were time ratios, equal to the TFLOP/s ratio only
    where the per-GPU work at p·N is N's: issue 5's 32K segments make it 1.6% more at 16K per GPU
    and twice at 1K. Every row timed alike here (stubs for the modules and timers, two ranks), so
    every efficiency of a row is its work ratio."""
    import torch

    from experiments import distributed_bench as bench
    from ringattn.flops import useful_flops

    monkeypatch.setattr(bench.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(bench.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(bench.dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(bench, "BHD", [1, 2, 8])
    monkeypatch.setattr(bench, "GRAPHS", [True])

    def timed(fn, q, k, v, grad, device, collective=True):
        bench.LAST_STEADY[:] = [3.0, 4.0]
        return 1.0, 2.0, 0.0

    def graph_times(fn, q, k, v, grad, device, collective=True):
        times = (5.0, 6.0, 7.0, 8.0)
        return dict(zip(bench.GRAPH_TIMES, times, strict=True))

    monkeypatch.setattr(bench, "timed", timed)
    monkeypatch.setattr(bench, "graph_times", graph_times)
    monkeypatch.setattr(bench.ringattn, "DilatedAttention", lambda *args, **kwargs: None)
    rows = bench.weak(torch.device("cpu"), n_per_gpu, False, "lse")
    lengths, rates = bench.ISSUE5_CONFIG
    one = useful_flops(1, n_per_gpu, 2, 8, lengths, rates, False, "lse")
    ratio = useful_flops(1, 2 * n_per_gpu, 2, 8, lengths, rates, False, "lse") / 2 / one
    assert ratio > 1.01  # (the case the time ratios got wrong)
    assert [row["gpus"] for row in rows] == [1, 2, 2]
    keys = ["fwd_efficiency", "fwdbwd_efficiency", "fwd_efficiency_b2b", "fwdbwd_efficiency_b2b"]
    keys += [key.replace("_ms", "_efficiency") for key in bench.GRAPH_TIMES]
    assert [row[key] for row in rows for key in keys] == pytest.approx(
        [1.0] * len(keys) + [ratio] * 2 * len(keys)
    )


def test_distributed_bench_refuses_an_out_it_cannot_make_before_any_part(monkeypatch, capsys):
    """Rank 0 made --out after the first part (the check: minutes), then raised on its own."""
    from experiments import distributed_bench

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)  # (past the check, the rendezvous would raise)
    err = refused(distributed_bench.main, ["--part", "check", "--out", "/dev/null/x"], capsys)
    assert "--out: cannot make '/dev/null/x'" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        # (each on the GPU, after CUDA started: a ZeroDivisionError once the calls were
        # profiled, torch's or the library's errors after the timelines before them)
        ("--calls 0", "--calls must be >= 1"),
        ("--n 32768 0", "--n must be >= 1"),
        ("--heads -1", "--heads must be >= 1"),
        ("--dim 0", "--dim must be >= 1"),
        ("--mixing lse nope", "--mixing must be among"),
    ],
)
def test_kernel_timeline_refuses_bad_options_in_one_line(argv, message, capsys):
    from experiments import kernel_timeline

    assert message in refused(kernel_timeline.main, argv.split(), capsys)


def test_kernel_timeline_keeps_each_turns_host_trace(tmp_path, monkeypatch):
    """``--lanes never always never --host``: the second "never" turn wrote over the first's
    trace file (one name per mode)."""
    import torch

    from experiments import kernel_timeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    monkeypatch.setattr(kernel_timeline.lanes, "MODE", kernel_timeline.lanes.MODE)  # (main sets)
    traces = []
    monkeypatch.setattr(kernel_timeline, "timeline", lambda *args: traces.append(args[-1]) or [])
    argv = ["--n", "64", "--mixing", "lse", "--causal", "no", "--host", "--out", str(tmp_path)]
    kernel_timeline.main([*argv, "--lanes", "never", "always", "never"])
    names = [path.name for path in traces]
    assert len(set(names)) == 3, names
    assert "trace_64_lse_noncausal_always.json.gz" in names  # (a mode given once: its old name)


@pytest.mark.parametrize(
    "argv, message",
    [
        # (each on the GPU: an IndexError from an empty median after the first kernels; a view's
        # RuntimeError after compare's dense and block rows; zero's rows past its segments read
        # as NaN the kernel left; group's assertion after its first size ran)
        ("--repeats 0", "--repeats must be >= 1"),
        ("--head-dim 0", "--head-dim must be >= 1"),
        ("--part compare --n 6144", "--n 6144: --part compare needs a multiple of 4096"),
        ("--part sweep --n 3000", "--n 3000: --part sweep needs a multiple of 2048"),
        ("--part zero --n 69632", "--n 69632: --part zero needs a multiple of 32768"),
        ("--part merge --n 2048", "--n 2048: --part merge needs at least 4096"),
        ("--part group --n 163840", "--n 163840: --part group runs issue 5's plan at n/4"),
        ("--part persistent --n 131073", "and at 131073 a config has a tail"),
    ],
)
def test_fa4_probe_refuses_bad_options_in_one_line(argv, message, capsys):
    from experiments import fa4_probe

    assert message in refused(fa4_probe.main, argv.split(), capsys)


@pytest.mark.parametrize(
    "part, n",  # the default, and what experiments/gpu_session.sh runs
    [(part, 131072) for part in ("compare", "sweep", "determinism", "replay", "merge")]
    + [(part, 131072) for part in ("merge_cost", "add", "dpsum", "zero", "config", "launch")]
    + [("fill", 131072)]
    + [(part, 131072) for part in ("group", "group_bwd", "persistent", "bwd_sweep")]
    + [(part, 32768) for part in ("group", "group_bwd", "replay", "add", "zero", "launch")]
    + [("fill", 32768), ("compare", 32768), ("merge_cost", 1048576)],
)
def test_fa4_probe_takes_the_lengths_it_runs_at(part, n):
    from experiments import fa4_probe

    assert fa4_probe.n_error(part, n, 16) is None


def test_flex_gpu_records_the_command_it_ran(tmp_path, monkeypatch):
    """Every --part check report said `python -m experiments.flex_gpu --n 32768` (docs/benchmarks/
    h200_bench/flex_gpu_check_*.md): not the part, nor --sdpa-forward, that ran."""
    import torch

    from experiments import flex_gpu
    from ringattn.computers.sdpa import SDPAComputer

    monkeypatch.setattr(SDPAComputer, "cuda_forward", SDPAComputer.cuda_forward)  # (main sets it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    row = {"ok": True, "strategy": "s", "fwd_err": 0.0, "grad_err": 0.0}
    monkeypatch.setattr(flex_gpu, "correctness", lambda device: [row])
    argv = ["--part", "check", "--sdpa-forward", "torch", "--out", str(tmp_path)]
    flex_gpu.main(argv)
    text = (tmp_path / "flex_gpu_check.md").read_text()
    assert f"Command: `python -m experiments.flex_gpu {' '.join(argv)}`" in text
    assert "1/1 ok" in text


@pytest.mark.parametrize(
    "argv, message",
    [("--n 0", "--n must be >= 1"), ("--out /dev/null/x", "--out: cannot make '/dev/null/x'")],
)
def test_flex_gpu_refuses_bad_options_before_the_check(argv, message, monkeypatch, capsys):
    """--n 0 failed in the speed part, after the check's minutes; a bad --out raised a
    traceback."""
    import torch

    from experiments import flex_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def correctness(device):
        raise AssertionError("checked before refusing the options")

    monkeypatch.setattr(flex_gpu, "correctness", correctness)
    assert message in refused(flex_gpu.main, argv.split(), capsys)


@pytest.mark.parametrize(
    "name, stub",
    [
        ("overheads", "probe"),  # (after every row had run on the GPU)
        ("kernel_timeline", "timeline"),  # (after every timeline; with --host, in the first)
        ("fa4_probe", "problems"),  # (after the part: bwd_sweep ~6 min on an H200)
        ("graph_capture_check", "check"),  # (after every check, its traceback lost the table)
        ("replay_check", "fa4.available"),
    ],
)
def test_gpu_scripts_refuse_an_out_they_cannot_make_before_running(name, stub, monkeypatch, capsys):
    """Each made --out after its GPU work: a bad one lost the results."""
    import torch

    module = importlib.import_module(f"experiments.{name}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def ran(*args):
        raise AssertionError("ran before checking --out")

    *path, attr = stub.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, attr, ran)
    err = refused(module.main, ["--out", "/dev/null/x"], capsys)
    assert "--out: cannot make '/dev/null/x'" in err


def test_replay_check_refuses_a_length_below_one(capsys):
    from experiments import replay_check

    assert "--n must be >= 1" in refused(replay_check.main, ["--n", "0"], capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--host --calls 0", "--calls must be >= 1"),  # (a ZeroDivisionError after the warm-up)
        ("--rows 0", "--rows must be >= 1"),
        ("--n -5", "--n must be >= 1"),
        ("--mixing lse nope", "--mixing must be among"),  # (after lse's profile)
        # (ignored without --host: no file, no word)
        ("--dump prof", "--dump writes the host's profiles: only with --host"),
        ("--host-trace trace", "--host-trace writes the host's profiles: only with --host"),
    ],
)
def test_profile_core_refuses_bad_options_in_one_line(argv, message, capsys):
    from experiments import profile_core

    assert message in refused(profile_core.main, argv.split(), capsys)


@pytest.mark.parametrize("flag", ["--dump", "--host-trace"])
def test_profile_core_refuses_a_folder_it_cannot_make_before_profiling(flag, monkeypatch, capsys):
    """It made the folder after the first profile (on the GPU), whose traceback ended the run."""
    import torch

    from experiments import profile_core

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: pytest.fail("ran first"))
    err = refused(profile_core.main, ["--host", flag, "/dev/null/x"], capsys)
    assert f"{flag}: cannot make '/dev/null/x'" in err


@pytest.fixture
def profile_core_without_a_gpu(monkeypatch):
    """experiments.profile_core with CUDA, the inputs, the module and its calls stubbed: what
    main profiles, under which titles and into which files, on the CPU."""
    import torch

    import ringattn
    from experiments import profile_core
    from ringattn import lanes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: None)
    monkeypatch.setattr(ringattn, "DilatedAttention", lambda *args, **kwargs: None)
    monkeypatch.setattr(profile_core, "fwd_and_fwdbwd", lambda *args: ("fwd", "fwdbwd"))
    monkeypatch.setattr(lanes, "MODE", lanes.MODE)  # (main sets it)
    return profile_core


def test_profile_core_host_profiles_the_forward_alone_under_forward(
    profile_core_without_a_gpu, monkeypatch
):
    """--host profiled forward and forward+backward with --forward too (gpu_session.sh's
    ``host`` part passed it): the flag was accepted and ignored."""
    profile_core = profile_core_without_a_gpu
    profiled: list[str] = []
    monkeypatch.setattr(profile_core, "host_profile", lambda call, *args: profiled.append(call))
    profile_core.main(["--host", "--forward", "--mixing", "lse"])
    assert profiled == ["fwd"]
    profiled.clear()
    profile_core.main(["--host", "--mixing", "lse"])
    assert profiled == ["fwd", "fwdbwd"]


def test_profile_core_host_profiles_have_titles_and_files_of_their_own(
    profile_core_without_a_gpu, monkeypatch, tmp_path
):
    """Under --host --compile the compiled module's profile was dumped to (and traced into) the
    eager one's file, and no title said causal or compiled: every profile of a run gets its
    own title and its own files."""
    profile_core = profile_core_without_a_gpu
    titles: list[str] = []
    dumps: list[str] = []
    traces: list[str] = []

    def host_profile(call, title, calls, rows, dump):
        titles.append(title)
        dumps.append(dump)

    monkeypatch.setattr(profile_core, "host_profile", host_profile)
    monkeypatch.setattr(profile_core, "host_trace", lambda call, calls, path: traces.append(path))
    argv = ["--host", "--compile", "--dump", str(tmp_path), "--host-trace", str(tmp_path)]
    profile_core.main([*argv, "--mixing", "lse", "head_groups", "--causal"])
    profile_core.main([*argv, "--mixing", "lse"])
    for made in (titles, dumps, traces):
        assert len(made) == 12 and len(set(made)) == 12, made
    assert all("compile=" in title and "causal=" in title for title in titles), titles


@pytest.mark.parametrize("calls", ["0", "3"])
def test_rank_check_cost_refuses_fewer_calls_than_its_arms_divide(calls, capsys):
    """--calls 3 timed 3 // 4 = 0 module calls: a ZeroDivisionError on every rank."""
    from experiments import rank_check_cost

    with pytest.raises(SystemExit) as done:
        rank_check_cost.main(["--calls", calls])
    assert done.value.code == 2
    message = f"--calls must be >= 4 (the module's arm times calls // 4), got {calls}"
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        # (a passing summary of nothing: "0 draws, 0 calls checked, 0 failed")
        ("--budget 0", "--budget must be > 0 seconds, got 0.0"),
        ("--budget nan", "--budget must be > 0 seconds, got nan"),
        ("--draws 0", "--draws must be >= 1"),
        ("--max-n 0", "--max-n must be >= 1"),  # (it drew n = 1, recorded as --max-n 0)
        ("--max-d 4", "--max-d must be >= 8, the least head dim, got 4"),  # (an IndexError)
        ("--fa4-head-dims 64 0", "--fa4-head-dims must be >= 1"),  # (after d = 64 had run)
        ("--fa4-head-dims 64 --replay 5", "--fa4-head-dims and --replay: one at a time"),
        ("--out /dev/null/x", "--out: cannot make '/dev/null/x'"),  # (a traceback)
    ],
)
def test_gpu_fuzz_refuses_bad_options_in_one_line(argv, message, capsys):
    from experiments import gpu_fuzz

    assert message in refused(gpu_fuzz.main, ["--device", "cpu", *argv.split()], capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        # (the recorded problem of seed 1 is not what draw_problem draws today)
        (
            "--replay 0 1",
            "--replay 1: redraws another problem than --replay-from recorded (n 5 drawn as ",
        ),
        ("--replay 7", "--replay 7: not among --replay-from's draws (seeds 0, 1)"),
        (
            "--replay 0 --max-n 8192",
            "--max-n 8192, but --replay-from's run drew with --max-n 48: leave it out",
        ),
        ("--replay 0 --max-d 256", "--max-d 256, but --replay-from's run drew with --max-d 16"),
        (
            "--replay 0 --kernels no_fa4",
            "--kernels no_fa4, but --replay-from's run drew with --kernels installed",
        ),
        ("", "records no failure: name seeds with --replay"),
        ("--fa4-head-dims 64", "--fa4-head-dims and --replay-from: one at a time"),
    ],
)
def test_gpu_fuzz_refuses_a_replay_of_another_problem(argv, message, tmp_path, monkeypatch, capsys):
    """--replay-from holds a replay to the run it names, before any replay runs."""
    import random

    from experiments import gpu_fuzz

    problems = {
        str(seed): gpu_fuzz.describe(gpu_fuzz.draw_problem(random.Random(seed), 48, 16))
        for seed in (0, 1)
    }
    problems["1"]["n"] = 5
    record = {"max_n": 48, "max_d": 16, "kernels": "installed", "problems": problems, "rows": []}
    (tmp_path / "gpu_fuzz.json").write_text(json.dumps(record))
    monkeypatch.setattr(gpu_fuzz, "replay", lambda *args: pytest.fail("replayed"))
    argv = ["--device", "cpu", "--replay-from", str(tmp_path / "gpu_fuzz.json"), *argv.split()]
    assert message in refused(gpu_fuzz.main, argv, capsys)


_DRAWS_WITHOUT_ROWS = '{"max_n": 48, "max_d": 16, "kernels": "installed", "problems": {}}'


@pytest.mark.parametrize(
    "text, replay, message",
    [
        (None, ["--replay", "0"], "--replay-from: cannot read"),
        ("{", ["--replay", "0"], "is not JSON"),
        ('{"summary": "", "rows": []}', ["--replay", "0"], "is not a fuzz run's gpu_fuzz.json"),
        # hand-trimmed: its failed seeds (what --replay-from replays by default) come from "rows"
        (_DRAWS_WITHOUT_ROWS, [], "is not a fuzz run's gpu_fuzz.json with its draws"),
    ],
)
def test_gpu_fuzz_refuses_a_replay_from_a_file_without_its_draws(
    text, replay, message, tmp_path, capsys
):
    """A record from before the draws were kept (or no record) cannot hold a replay to them."""
    from experiments import gpu_fuzz

    path = tmp_path / "gpu_fuzz.json"
    if text is not None:
        path.write_text(text)
    argv = ["--device", "cpu", "--replay-from", str(path), *replay]
    assert message in refused(gpu_fuzz.main, argv, capsys)


def test_gpu_fuzz_lists_a_nan_gradient_among_the_worst():
    """Sorted by a NaN ratio, the printed worst five left out the NaN row and the 6 beside it
    (Python's sort compares with <, False both ways against NaN)."""
    from experiments import gpu_fuzz

    errors = [8.0, 9.0, 1.0, 2.0, 5.0, 3.0, 7.0, 4.0, 0.0, math.nan, 6.0]
    rows = [{"grad_err": e, "math_grad_err": 1.0} for e in errors]
    got = [row["grad_err"] for row in gpu_fuzz.worst_gradients(rows)]
    assert math.isnan(got[0]) and got[1:] == [9.0, 8.0, 7.0, 6.0]


def test_fa4_probe_bwd_sweep_measures_only_against_the_default(monkeypatch):
    """Where FA4's own tiles raised, the first configuration that ran became the reference: its
    row said rel_err_vs_default 0 (itself), the others were measured against it."""
    import sys
    import types

    import torch

    from experiments import fa4_probe

    interface = types.SimpleNamespace(BwdConfig=lambda *config: config)

    def own_tiles(*args, **kwargs):
        raise AssertionError("(not called here)")

    def bwd(q, k, v, out, dout, lse, scale, causal):
        if interface._tile_size_bwd_sm90 is own_tiles:  # FA4's own tiles
            raise RuntimeError("the default's kernel failed")
        return torch.ones_like(q), torch.ones_like(k), torch.ones_like(v)

    interface._tile_size_bwd_sm90 = own_tiles
    interface._flash_attn_bwd = bwd
    interface._flash_attn_fwd = lambda q, *args, **kwargs: (q, q[..., 0])
    cute = types.SimpleNamespace(interface=interface)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(cute=cute))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setattr(fa4_probe, "_events_ms", lambda *args: 1.0)
    rows = fa4_probe.bwd_sweep(4096, 1, 8, 1, torch.device("cpu"))
    swept = [row for row in rows if row["problem"] != "dense"]
    assert [row["config"] == "default" for row in swept if "error" in row] == [True, True]
    assert len(swept) == 2 * len(fa4_probe.BWD_SWEEP)
    assert not [row for row in swept if "rel_err_vs_default" in row]


def test_gpu_fuzz_unfused_variant_turns_every_fused_kernel_off_and_back():
    """``--replay``'s ``unfused`` variant runs FA4's own kernels alone: every module of ours
    around them off (the given sums too), and back on after."""
    from experiments import gpu_fuzz
    from ringattn.kernels import fa4_add, fa4_dpsum, fa4_group, fa4_group_bwd, fa4_merge, fa4_zero

    modules = (fa4_add, fa4_dpsum, fa4_group, fa4_group_bwd, fa4_merge, fa4_zero)
    assert all(m.ENABLED for m in modules)
    with gpu_fuzz.variant("unfused"):
        assert not any(m.ENABLED for m in modules)
    assert all(m.ENABLED for m in modules)


def bench_file(path: Path, device: str, *ns: int, variant: str = "segment_local/sdpa") -> Path:
    """A bench JSON file of ``variant`` rows at ``ns`` (both mixings, causal or not)."""
    rows = [
        {"n": n, "mixing": mixing, "causal": causal, "variant": variant}
        | {"fwd_vs_dense": 0.95, "fwd_vs_dense_b2b": 0.9, "fwdbwd_vs_dense": 0.8}
        | {"fwd_vs_dense_graph": 0.97}  # (bench --graphs)
        | {"fwd_mem_vs_io": 1.0, "fwdbwd_mem_vs_io": None}  # (a forward-only row)
        for n in ns
        for mixing in ("lse", "head_groups")
        for causal in (False, True)
    ]
    path.write_text(json.dumps({"meta": {"device": device}, "rows": rows}))
    return path


def test_plot_record_plots_recorded_runs_and_prints_their_ratios(tmp_path, capsys):
    from experiments import plot_record

    runs = [
        bench_file(tmp_path / "a.json", "H200", 32768),
        bench_file(tmp_path / "b.json", "H200", 1 << 20),
    ]
    out = tmp_path / "plots" / "record.png"
    assert plot_record.main([*map(str, runs), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "| 32768 | head_groups | False | 0.950 (0.900) [0.970] | 0.800 |" in printed
    assert "| 1048576 | lse | True | 0.950 (0.900) [0.970] | 0.800 |" in printed


def _kept_figure(monkeypatch) -> list:
    """The figures a plot closes, kept for the test to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def test_plot_record_plots_each_panel_of_its_own_ratios_and_the_issues_bounds(
    monkeypatch, tmp_path
):
    """The README's headline plot: each panel's line holds its ratio (the memory panel read one
    key twice unseen: the printed table is tested, the figure was not), the targets 0.90 / 0.85
    on the throughput panels and the bounds 1.1 / 1.2 on the memory panel."""
    from experiments import plot_record

    figures = _kept_figure(monkeypatch)
    rows = {
        ("lse", False, n): {"fwd_vs_dense": a, "fwdbwd_vs_dense": b, "fwd_mem_vs_io": c,
                            "fwdbwd_mem_vs_io": d}
        for n, a, b, c, d in ((1024, 0.5, 0.6, 1.01, 1.07), (2048, 0.7, 0.8, 1.02, 1.08))
    }  # fmt: skip
    plot_record.plot(rows, "title", tmp_path / "p.png")
    (figure,) = figures
    axes = figure.axes[:3]

    def lines(ax) -> dict:
        return {line.get_label(): list(line.get_ydata()) for line in ax.lines}

    assert lines(axes[0])["lse, non-causal"] == [0.5, 0.7]
    assert lines(axes[1])["lse, non-causal"] == [0.6, 0.8]
    assert lines(axes[2])["lse, non-causal, forward"] == [1.01, 1.02]
    assert lines(axes[2])["lse, non-causal, fwd+bwd"] == [1.07, 1.08]
    assert lines(axes[0])["target 0.90"] == [0.9, 0.9]
    assert lines(axes[1])["target 0.85"] == [0.85, 0.85]
    assert lines(axes[2])["bound 1.1 (forward)"] == [1.1, 1.1]
    assert lines(axes[2])["bound 1.2 (fwd+bwd)"] == [1.2, 1.2]


def test_bench_plot_draws_the_forward_backwards_peak(monkeypatch, tmp_path):
    from experiments import bench

    figures = _kept_figure(monkeypatch)
    rows = [
        {"n": n, "mixing": "lse", "causal": False, "variant": "v", "fwd_tflops": 1.0,
         "fwdbwd_tflops": 2.0, "fwd_mem_vs_io": 1.01, "fwdbwd_mem_vs_io": mem}
        for n, mem in ((1024, 1.07), (2048, 1.08))
    ]  # fmt: skip
    bench.plot(rows, tmp_path / "p.png")
    (figure,) = figures
    fwd, fwdbwd, memory = figure.axes[:3]
    assert [list(line.get_ydata()) for line in fwd.lines] == [[1.0, 1.0]]
    assert [list(line.get_ydata()) for line in fwdbwd.lines] == [[2.0, 2.0]]
    assert [list(line.get_ydata()) for line in memory.lines if line.get_label() == "v"] == [
        [1.07, 1.08]
    ]


@pytest.mark.parametrize(
    "files, extra, message",
    [
        ([("a", "H200", 4), ("b", "H200", 4)], [], "both hold 'segment_local/sdpa' at n=4"),
        ([("a", "H200", 4), ("b", "H100", 8)], [], "a.json ran on H200 and"),
        ([("a", "H200", 4)], ["--variant", "nope"], "a.json: no 'nope' rows"),
    ],
)
def test_plot_record_refuses_what_it_cannot_plot_as_one_run(
    tmp_path, capsys, files, extra, message
):
    """Two files with one row, ratios of two GPUs on one plot, or a variant no file has: each a
    one-line refusal naming the file, before anything is drawn."""
    from experiments import plot_record

    paths = [str(bench_file(tmp_path / f"{name}.json", device, n)) for name, device, n in files]
    out = tmp_path / "record.png"
    assert message in refused(plot_record.main, [*paths, *extra, "--out", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("out", ["record", "record.txt"])
def test_plot_record_refuses_an_out_without_a_figure_format(tmp_path, capsys, out):
    """No suffix: matplotlib wrote ``record.png`` while the script printed ``wrote record``;
    ``.txt``: a matplotlib traceback after the work."""
    from experiments import plot_record

    path = str(bench_file(tmp_path / "a.json", "H200", 4))
    message = refused(plot_record.main, [path, "--out", str(tmp_path / out)], capsys)
    assert "--out must end in one of" in message and ".png" in message
    assert not list(tmp_path.glob("record*"))


def test_plot_record_panels_reach_past_their_usual_range(monkeypatch, tmp_path):
    """A forward above 1.15x dense and a peak above 1.45x (a memory regression, what the
    panel is there to show) were drawn outside fixed limits, invisible."""
    from experiments import plot_record

    figures = _kept_figure(monkeypatch)
    rows = {
        ("lse", False, n): {"fwd_vs_dense": a, "fwdbwd_vs_dense": 0.9, "fwd_mem_vs_io": c,
                            "fwdbwd_mem_vs_io": 1.07}
        for n, a, c in ((1024, 1.17, 1.01), (2048, 0.9, 1.6))
    }  # fmt: skip
    plot_record.plot(rows, "title", tmp_path / "p.png")
    (figure,) = figures
    forward, _, memory = figure.axes[:3]
    assert forward.get_ylim()[1] > 1.17 and forward.get_ylim()[0] == 0
    assert memory.get_ylim()[0] <= 0.95 and memory.get_ylim()[1] > 1.6


def test_bench_plot_marks_dense_sdpa_at_a_single_length(monkeypatch, tmp_path):
    """One ``--n`` (the CPU example): dense SDPA's dashed line without a marker drew nothing."""
    from experiments import bench

    figures = _kept_figure(monkeypatch)
    row = {"n": 1024, "mixing": "lse", "causal": False, "fwd_tflops": 1.0, "fwdbwd_tflops": 2.0}
    row |= {"fwd_mem_vs_io": None, "fwdbwd_mem_vs_io": None}
    bench.plot([{**row, "variant": "dense SDPA"}, {**row, "variant": "v"}], tmp_path / "p.png")
    (figure,) = figures
    (dense,) = [line for line in figure.axes[0].lines if line.get_label() == "dense SDPA"]
    assert dense.get_marker() not in (None, "None", "")


def test_plot_record_refuses_a_file_that_is_not_a_bench_record(tmp_path, capsys):
    from experiments import plot_record

    (tmp_path / "x.json").write_text("[1, 2]")
    assert "x.json: not a bench JSON file" in refused(
        plot_record.main, [str(tmp_path / "x.json")], capsys
    )


def test_bench_graphs_fills_every_row_and_reports_a_failed_capture(monkeypatch):
    """``--graphs``' plumbing on the CPU, with ``graphed_calls`` standing in (CUDA graphs need a
    GPU): its "replays" are the eager calls, so every row gets a replayed ratio and dense SDPA's
    is 1.0; a capture that failed is the row's text, not a lost run."""
    import torch

    from experiments import bench

    def stand_in(fn, q, k, v, dout, warmup=2, backward=True):
        fwd, _ = bench.fwd_and_fwdbwd(fn, q, k, v, dout)
        return {"fwd": fwd, "fwd_err": 0.0, "fwdbwd": "RuntimeError: capture refused"}

    monkeypatch.setattr(bench, "graphed_calls", stand_in)
    argv = "--device cpu --lengths 32 64 --rates 1 2 --heads 2 --dim 8 --computers sdpa"
    argv += " --dilations segment_local --no-compile --no-in-model --no-flash-row --no-torch-row"
    args = bench.parse([*argv.split(), "--repeats", "1", "--warmup", "0", "--check-n", "0"])
    args.graphs = True  # (the parser refuses it off CUDA)
    rows = bench.bench_case(128, "lse", False, args, torch.device("cpu"), {})
    assert [row["variant"] for row in rows] == ["dense SDPA", "segment_local/sdpa"]
    for row in rows:
        assert row["fwd_ms_graph"] > 0 and row["fwd_graph_err"] == 0.0
        assert row["fwd_vs_dense_graph"] > 0 and "fwdbwd_vs_dense_graph" not in row
        assert row["fwdbwd_graph_failure"] == "RuntimeError: capture refused"
    assert rows[0]["fwd_vs_dense_graph"] == pytest.approx(1.0)


def test_determinism_check_runs_on_the_cpu(tmp_path):
    from experiments import determinism_check

    argv = ["--n", "64", "--lengths", "16", "32", "--rates", "1", "2", "--heads", "2"]
    argv += ["--dim", "8", "--check-n", "64", "--repeats", "1", "--out", str(tmp_path)]
    assert determinism_check.main(argv) == 0
    written = json.loads((tmp_path / "determinism_check.json").read_text())
    rows = written["rows"]
    assert len(rows) == 8 and all(r["same"] and r["oracle_err"] < 1e-5 for r in rows)
    assert [r["deterministic"] for r in rows] == [False, True] * 4
    assert written["meta"]["dtype"] == "torch.float32"  # (a CPU's default)
    # --dtype reaches the inputs: bfloat16's oracle error is bfloat16's, not float32's
    assert determinism_check.main([*argv, "--dtype", "bfloat16"]) == 0
    written = json.loads((tmp_path / "determinism_check.json").read_text())
    assert written["meta"]["dtype"] == "torch.bfloat16"
    assert all(1e-4 < r["oracle_err"] < 2e-2 for r in written["rows"])


def test_determinism_check_fails_a_run_that_differs(tmp_path, monkeypatch):
    from experiments import determinism_check

    draws = iter(range(1000))
    monkeypatch.setattr(  # (each run another result: the bits differ)
        determinism_check, "with_grads", lambda *a: [torch.full((3,), float(next(draws)))]
    )
    argv = ["--n", "16", "--lengths", "16", "--rates", "1", "--heads", "1", "--dim", "4"]
    assert determinism_check.main([*argv, "--check-n", "0", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "determinism_check.json").read_text())["rows"]
    assert all(not r["same"] and r["differ"] == 3 for r in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--lengths", "16", "0"], "--lengths must be >= 1, got [16, 0]"),
        (["--check-n", "-1"], "--check-n must be >= 0, got -1"),
        (["--paths", "fa3"], "argument --paths: invalid choice: 'fa3'"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--device", "cuda"], "--device cuda, but CUDA is not available here"),
    ],
)
def test_determinism_check_refuses_bad_options_in_one_line(argv, message, capsys, monkeypatch):
    from experiments import determinism_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = [] if "--device" in argv else ["--device", "cpu"]
    assert message in refused(determinism_check.main, [*argv, *device], capsys)


def test_interop_check_runs_on_the_cpu(tmp_path):
    from experiments import interop_check

    argv = ["--n", "256", "--heads", "2", "--dim", "8", "--device", "cpu", "--out", str(tmp_path)]
    assert interop_check.main(argv) == 0
    rows = json.loads((tmp_path / "interop_check.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["ok"] and r["flops_vs_useful"] == 1.0 for r in rows)


@pytest.mark.parametrize("jitter, ok", [(1e-7, True), (1e-3, False)])
def test_interop_check_holds_a_counted_calls_gradients_to_float32s_tolerance(
    tmp_path, monkeypatch, jitter, ok
):
    """The GPU's float32 backward sums in no fixed order, so a counted call's gradients differ
    from an uncounted call's in their last bits (step 87: every row failed on an H100): they
    are held to float32's tolerance, the output to its bits."""
    from experiments import interop_check

    real = interop_check.with_grads

    def jittered(*args):  # each call's gradients off by a fresh relative ``jitter``
        out, *grads = real(*args)
        return [out, *(g * (1 + jitter * torch.randn_like(g)) for g in grads)]

    monkeypatch.setattr(interop_check, "with_grads", jittered)
    argv = ["--n", "64", "--heads", "1", "--dim", "4", "--device", "cpu", "--out", str(tmp_path)]
    assert interop_check.main(argv) == (0 if ok else 1)
    rows = json.loads((tmp_path / "interop_check.json").read_text())["rows"]
    assert all(r["counted_same"] and r["ok"] == ok for r in rows)
    assert all(0 < r["counted_grad_err"] < 3 * jitter for r in rows)


def test_interop_check_fails_a_count_that_is_not_the_useful_one(tmp_path, monkeypatch):
    from experiments import interop_check

    real = interop_check.useful_flops
    monkeypatch.setattr(interop_check, "useful_flops", lambda *a: 2 * real(*a))
    argv = ["--n", "64", "--heads", "1", "--dim", "4", "--device", "cpu", "--out", str(tmp_path)]
    assert interop_check.main(argv) == 1
    rows = json.loads((tmp_path / "interop_check.json").read_text())["rows"]
    assert all(r["flops_vs_useful"] == 0.5 and not r["ok"] for r in rows)


SWITCH_ARGV = ["--n", "256", "--heads", "2", "--dim", "8", "--device", "cpu"]


def test_switch_check_runs_on_the_cpu(tmp_path):
    """Every switch flipped on a live module runs a new module's operators; on the CPU only
    BLOCK_SPLIT changes them (the FA4 switches and the launch switches are GPU paths)."""
    from experiments import switch_check

    assert switch_check.main([*SWITCH_ARGV, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "switch_check.json").read_text())["rows"]
    assert len(rows) == len(switch_check.FLIPS) and all(r["ok"] for r in rows)
    assert [r["switch"] for r in rows if r["flip_changes"]] == ["pattern.BLOCK_SPLIT=1"]


def test_switch_check_runs_the_mixings_and_causality_asked_for(tmp_path):
    from experiments import switch_check

    argv = [*SWITCH_ARGV, "--switches", "pattern.BLOCK_SPLIT", "--mixing", "lse", "--causal"]
    assert switch_check.main([*argv, "both", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "switch_check.json").read_text())["rows"]
    assert [(r["mixing"], r["causal"]) for r in rows] == [("lse", False), ("lse", True)]
    assert all(r["flip_changes"] and r["ok"] for r in rows)


def test_switch_check_fails_a_module_that_keeps_its_plan(tmp_path, monkeypatch):
    """Stop 85's module kept a plan cut with the BLOCK_SPLIT of its first call: the live module
    then runs other operators than a new one, and the row fails."""
    import types

    import ringattn.api
    from experiments import switch_check
    from ringattn import pattern

    monkeypatch.setattr(switch_check, "FLIPS", ((pattern, "BLOCK_SPLIT", 1),))
    stale = types.SimpleNamespace(BLOCK_SPLIT=pattern.BLOCK_SPLIT)  # what api reads of pattern
    monkeypatch.setattr(ringattn.api, "pattern", stale)
    assert switch_check.main([*SWITCH_ARGV, "--out", str(tmp_path)]) == 1
    (row,) = json.loads((tmp_path / "switch_check.json").read_text())["rows"]
    assert row["flip_changes"] and not row["live_as_new"] and not row["ok"]


def test_wide_check_runs_on_the_cpu_and_fails_a_wrong_last_head(tmp_path, monkeypatch):
    """The slice of the last rows against the oracle of those rows alone passes a right module
    and fails one whose last head is off (what an int32 head offset would corrupt)."""
    from experiments import wide_check

    # (the last 16 of 64 rows: the oracle of the slice must be the slice of the oracle)
    argv = ["--n", "64", "--segments", "8", "16", "--rates", "1", "2", "--heads", "4"]
    argv += ["--dim", "8", "--device", "cpu"]
    assert wide_check.main([*argv, "--out", str(tmp_path / "right")]) == 0
    rows = json.loads((tmp_path / "right" / "wide_check.json").read_text())["rows"]
    assert [r["backward"] for r in rows] == ["ran", "ran"]
    assert not any(r["past_int32"] for r in rows)  # (at this size it cannot fail for offsets)

    class LastHeadOff(ringattn.DilatedAttention):
        def forward(self, q, k, v):
            out = super().forward(q, k, v)
            return torch.cat([out[:, :, :-1], out[:, :, -1:] + 1], dim=2)

    monkeypatch.setattr(wide_check.ringattn, "DilatedAttention", LastHeadOff)
    assert wide_check.main([*argv, "--out", str(tmp_path / "wrong")]) == 1
    rows = json.loads((tmp_path / "wrong" / "wide_check.json").read_text())["rows"]
    assert all(r["out_err"] > 0.1 and not r["ok"] for r in rows)
