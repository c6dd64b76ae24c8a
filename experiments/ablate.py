"""Ablation sweep: every valid ``Strategy`` × configs × sequence lengths × compile on/off.

Run::

    python -m experiments.ablate                       # preset "quick": CPU, fp32, well under 2 min
    python -m experiments.ablate --preset gpu          # CUDA, bf16, h=16, d=128, LongNet configs
    torchrun --nproc-per-node 2 -m experiments.ablate --preset distributed
    python -m experiments.ablate --computer sdpa,math --dilation global \\
        --segment-lengths 64,128 --dilation-rates 1,2 --seq-lens 512,2048 --compile both

Run it from the repository root (``experiments`` is not installed). Every variant gets

* a correctness check against the float64 oracle ``ringattn.reference.dilated_attention`` on a
  small input (``--check-n`` rows): relative error ‖out−ref‖/‖ref‖ of the forward and the largest
  of the q/k/v gradients' (each against ``max(‖ref‖, 0.1·‖grad_out‖)``, as tests/conftest.py does
  for gradients that vanish in exact arithmetic), bounded per dtype (:data:`TOLERANCE`, the
  tests' ``ringattn.reference.TOLERANCE``);
* forward and forward+backward times, median of ``--repeats`` after ``--warmup`` calls (CUDA
  events on CUDA, ``time.perf_counter`` on CPU);
* peak memory of one warm call: the call's inputs, plus what the module's memory manager keeps
  between calls (``pooled`` scratch buffers, index patterns: ``held_bytes()``, live before the
  call, so no call's peak shows them), plus the most memory the call allocates on top of what was
  live before it (CUDA: ``max_memory_allocated``; CPU: the PyTorch CPU allocator's events
  replayed from ``torch.autograd.profiler``);
* useful TFLOP/s: ``4·d·b·P`` FLOPs forward (×3.5 forward+backward), ``P`` = :func:`useful_pairs`,
  the (query, key) pairs the dilated definition scores, not what a kernel happens to compute;
* its time relative to dense ``scaled_dot_product_attention`` on the same input (same causality),
  measured in the same run (rows with strategy ``dense_sdpa``): ``fwd_time_vs_dense`` below 1 is
  faster than dense. (``experiments.bench``'s ``fwd_vs_dense`` is the other way up: useful
  TFLOP/s over dense's, issue 5's measure of how fast each kept FLOP runs.)

Results go to ``results/<YYYY-mm-dd_HHMMSS>_<preset>/`` (``--out``): ``results.csv`` (every
column), ``results.md`` and one PNG per (config, compile, fwd | fwd+bwd) with time and peak memory
against n, log-log. ``results.csv``'s columns, after the variant's own (strategy, compile,
segment_lengths, dilation_rates, mixing, causal, n, batch, heads, head_dim, dtype, device):
``check`` (pass | FAIL | error | oom | unsupported; n/a for the baseline) against ``tolerance``;
``fwd_rel_err`` / ``grad_rel_err``; ``fwd_ms`` / ``fwdbwd_ms``; ``fwd_peak_mib`` /
``fwdbwd_peak_mib`` and ``peak_source`` (how the peak was measured); ``useful_pairs`` (``P``);
``fwd_tflops`` / ``fwdbwd_tflops``; ``fwd_time_vs_dense`` / ``fwdbwd_time_vs_dense``; ``wall_s``
(the whole row: module build, compile, check, timing, memory); ``note`` (why a row failed, or
what it left out). The short Markdown table is printed last. The exit status is 0 when every
check passed, 1 when one failed or errored, 2 for bad command-line input, 130 when interrupted
(Ctrl-C: the rows measured so far are written). Inputs are drawn from fixed seeds (the timed
ones from seed ``n``, the correctness check's from ``1 + --check-n``), so a command run again
measures the same inputs and reproduces its oracle errors.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

import ringattn
from experiments import CAUSALITY, ISSUE_LENGTHS, ISSUE_RATES, worst
from ringattn import DilatedConfig, Strategy, reference, registry
from ringattn import flops as flop_count
from ringattn.flops import FORWARD_BACKWARD_FACTOR, dense_pairs, useful_pairs
from ringattn.memory.base import MemoryManager

if TYPE_CHECKING:
    _T = TypeVar("_T")

# ‖out − ref‖ / ‖ref‖ bounds against the float64 oracle: the tests' (fp16's was 4x looser here)
TOLERANCE = reference.TOLERANCE
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
DISTRIBUTED_COMMUNICATORS = ("ring", "all_gather")
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


class UsageError(Exception):
    """Bad command-line input: reported as one ``ablate: error: ...`` line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Presets and settings
# --------------------------------------------------------------------------------------------

Config = tuple[tuple[int, ...], tuple[int, ...]]  # (segment_lengths, dilation_rates)


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    dtype: str
    batch: int
    heads: int
    head_dim: int
    configs: tuple[Config, ...]
    seq_lens: tuple[int, ...]
    check_n: int  # rows of the correctness input (the float64 oracle is a Python loop)
    mixings: tuple[str, ...] = ("lse",)
    causal: tuple[bool, ...] = (False,)
    compile: str = "off"  # "on" | "off" | "both"
    # At most this many compile-on variants (default strategy first); None: all of them.
    # Every (strategy, config, n) is new graphs: Inductor needs ~15 s for one on a 2-core CPU.
    compile_budget: int | None = None
    communicators: tuple[str, ...] = ("local",)
    warmup: int = 2
    repeats: int = 5


LONGNET: Config = (ISSUE_LENGTHS, ISSUE_RATES)

PRESETS = {
    "quick": Preset(
        name="quick",
        device="cpu",
        dtype="fp32",
        batch=1,
        heads=4,
        head_dim=32,
        configs=(((64, 128), (1, 2)), ((32, 64, 256), (1, 2, 4))),
        seq_lens=(256, 1024),
        check_n=256,
        compile="both",
        compile_budget=1,
    ),
    "gpu": Preset(
        name="gpu",
        device="cuda",
        dtype="bf16",
        batch=1,
        heads=16,
        head_dim=128,
        configs=(LONGNET,),
        seq_lens=(32768, 65536, 131072, 262144),
        check_n=8192,
        mixings=("lse", "head_groups"),
        causal=(False, True),
        compile="both",
        # Inductor took ~5 min for one (strategy, n) of this config on an H100 (check, forward and
        # forward+backward graphs): compile the default strategy at every config and n only.
        compile_budget=16,
        warmup=3,
        repeats=10,
    ),
}
# the gpu sweep, sharded over the ranks of a torchrun launch
PRESETS["distributed"] = dataclasses.replace(
    PRESETS["gpu"],
    name="distributed",
    seq_lens=(131072, 262144, 524288),
    compile="off",  # (a module's own compiled frame cannot hold P2P/collective calls)
    compile_budget=None,
    communicators=DISTRIBUTED_COMMUNICATORS,
)


@dataclass(frozen=True)
class Sweep:
    """Everything one run needs, resolved and validated."""

    preset: Preset
    device: torch.device
    dtype: torch.dtype
    configs: tuple[DilatedConfig, ...]  # configs × mixings × causal
    strategies: tuple[Strategy, ...]
    distributed: bool  # launched under torchrun: one process group, one device per rank
    compile_modes: tuple[bool, ...]
    compile_budget: int | None
    compile_backend: str
    baseline: bool
    out: Path


@dataclass(frozen=True)
class Variant:
    strategy: Strategy
    config: DilatedConfig
    n: int
    compile: bool


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _ints(text: str) -> tuple[int, ...]:
    """``"64,128"`` → ``(64, 128)``; the library validates the values themselves."""
    try:
        return tuple(int(token) for token in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(token.strip() for token in text.split(",") if token.strip())
    if not names:  # ("--computer ," was no filter at all: every computer ran)
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return _once(names, text)


def _distinct_ints(text: str) -> tuple[int, ...]:
    return _once(_ints(text), text)


def _once(values: tuple[_T, ...], text: str) -> tuple[_T, ...]:
    """``values``, each given once (a value given twice measured its rows twice)."""
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"each value once, got {', '.join(repeated)} twice in {text!r}"
        )
    return values


def _causal(text: str) -> str:
    """``--causal``: bench's and distributed_bench's ``no`` / ``yes`` / ``both``; ``off`` / ``on``
    are this tool's older spellings."""
    return {"off": "no", "on": "yes"}.get(text, text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ablate",
        description="Sweep ringattn strategies: correctness, time, memory, TFLOP/s.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="quick (default): CPU fp32, small, < 2 min on 2 cores; gpu: CUDA bf16, LongNet"
        " configs, n >= 32K; distributed: the gpu sweep under torchrun with the ring/all_gather"
        " communicators",
    )
    p.add_argument(
        "--out", type=Path, help="results folder (default results/<date>_<time>_<preset>)"
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE|FILE.py",
        help="import this first (repeatable): a module or file that registers strategies of "
        "your own, then named like the built-ins (--computer mine)",
    )
    sel = p.add_argument_group("strategies (comma-separated registry names; default: all valid)")
    for kind in registry.KINDS:
        sel.add_argument(
            f"--{kind}", type=_names, metavar="NAMES", help=f"of: {', '.join(registry.names(kind))}"
        )
    cfg = p.add_argument_group("configs (a JSON file, or repeated flag pairs)")
    cfg.add_argument("--config-file", type=Path, help='[{"segment_lengths": [..], ...}, ...]')
    cfg.add_argument(
        "--segment-lengths",
        type=_ints,
        action="append",
        metavar="W,W,...",
        help="one config's segment lengths; repeat with --dilation-rates for more configs",
    )
    cfg.add_argument(
        "--dilation-rates",
        type=_ints,
        action="append",
        metavar="R,R,...",
        help="that config's dilation rates (each divides its segment length)",
    )
    cfg.add_argument(
        "--mixing",
        type=_names,
        metavar="lse,head_groups",
        help="how configs combine: lse (LongNet's softmax-weighted merge), head_groups (each "
        "config on its own heads); default: the preset's",
    )
    cfg.add_argument(
        "--causal",
        type=_causal,
        choices=list(CAUSALITY),
        help="causal masking (off / on also work); default: the preset's",
    )
    shape = p.add_argument_group("shapes and numerics")
    shape.add_argument(
        "--seq-lens",
        type=_distinct_ints,
        metavar="N,N,...",
        help="sequence lengths timed; default: the preset's",
    )
    shape.add_argument("--check-n", type=int, help="rows of the correctness input")
    shape.add_argument("--batch", type=int, help="batch size b; default: the preset's")
    shape.add_argument("--heads", type=int, help="heads h; default: the preset's")
    shape.add_argument("--head-dim", type=int, help="head dim d; default: the preset's")
    shape.add_argument(
        "--dtype", choices=sorted(DTYPES), help="inputs' dtype; default: the preset's"
    )
    shape.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    run = p.add_argument_group("measurement")
    run.add_argument(
        "--compile",
        choices=("on", "off", "both"),
        help="compile on: flex compiles its core (compile=True), the block computers (math, "
        "sdpa), which open no compiled frame of their own, run inside an enclosing "
        "torch.compile(fullgraph=True), sequence-parallel ones after an eager call at each new "
        "shape; given, it applies to every variant (Inductor: ~15 s per"
        " graph on CPU); by default each preset compiles only its --compile-budget variants",
    )
    run.add_argument(
        "--compile-budget",
        type=int,
        help="at most this many compile-on variants, default strategy first (-1: no limit)",
    )
    run.add_argument(
        "--compile-backend", default="inductor", help="torch.compile's backend (default: inductor)"
    )
    run.add_argument(
        "--warmup", type=int, help="untimed calls before timing; default: the preset's"
    )
    run.add_argument(
        "--repeats", type=int, help="timed calls, median reported; default: the preset's"
    )
    run.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time dense SDPA on the same inputs (the ratio column's denominator)",
    )
    return p


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def resolve(args: argparse.Namespace) -> Sweep:
    """Apply the command line to the preset; every check raises :class:`UsageError`."""
    preset = PRESETS[args.preset]
    overrides = {
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "seq_lens": args.seq_lens,
        "check_n": args.check_n,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "mixings": args.mixing,
        "communicators": args.communicator,
    }
    if args.causal:
        overrides["causal"] = CAUSALITY[args.causal]
    # the budget apart from the overrides, whose None means "not given": its None means "no
    # limit", and dropped with them, --compile on|both and --compile-budget -1 kept the preset's 1
    budget = preset.compile_budget
    if args.compile:
        # An explicit --compile applies to every variant unless a budget is given too.
        overrides["compile"] = args.compile
        budget = None
    if args.compile_budget is not None:
        if args.compile_budget < -1:
            raise UsageError(
                f"--compile-budget must be >= 0 or -1 (no limit), got {args.compile_budget}"
            )
        budget = None if args.compile_budget == -1 else args.compile_budget
    preset = dataclasses.replace(
        preset,
        compile_budget=budget,
        **{key: value for key, value in overrides.items() if value is not None},
    )
    _check_positive(preset)
    filters = {kind: getattr(args, kind) for kind in registry.KINDS if getattr(args, kind)}
    filters.setdefault("communicator", preset.communicators)
    strategies = select_strategies(filters)
    distributed = check_distributed(preset, strategies)
    device = _device(preset.device)
    backends = torch.compiler.list_backends(exclude_tags=())
    if args.compile_backend not in backends:
        raise UsageError(
            f"--compile-backend must be one of {backends}, got {args.compile_backend!r}"
        )
    compile_modes = {"off": (False,), "on": (True,), "both": (False, True)}[preset.compile]
    if True in compile_modes:
        _check_backend_runs(args.compile_backend, device)
    out = args.out or Path("results") / f"{datetime.datetime.now():%Y-%m-%d_%H%M%S}_{preset.name}"
    for mixing in preset.mixings:
        _config((1,), (1,), False, mixing, "--mixing")
    first_given: dict[DilatedConfig, str] = {}
    for (w, r), where in _raw_configs(args, preset):
        for mixing in preset.mixings:
            for causal in preset.causal:
                config = _config(w, r, causal, mixing, where)
                if config in first_given:  # (its rows measured twice, one label in the plots)
                    raise UsageError(
                        f"the config segment_lengths={config.segment_lengths} dilation_rates="
                        f"{config.dilation_rates} is given twice ({first_given[config]}; "
                        f"{where}): give each once"
                    )
                first_given[config] = where
    configs = tuple(first_given)
    return Sweep(
        preset=preset,
        device=device,
        dtype=DTYPES[preset.dtype],
        configs=configs,
        strategies=strategies,
        distributed=distributed,
        compile_modes=compile_modes,
        compile_budget=preset.compile_budget,
        compile_backend=args.compile_backend,
        baseline=args.baseline,
        out=out,
    )


def _check_backend_runs(backend: str, device: torch.device) -> None:
    """A :class:`UsageError` unless ``backend`` compiles a one-line function on ``device``:
    listed backends need packages (``openxla``: torch_xla) or devices (``cudagraphs``: CUDA)
    that may be missing, and each compiled row then failed as "error"."""
    if backend in ("inductor", "aot_eager", "eager"):  # (ours: known to run, no time spent)
        return
    try:
        torch.compile(lambda x: x + 1, backend=backend)(torch.ones(2, device=device))
    except Exception as e:
        raise UsageError(
            f"--compile-backend {backend!r} does not run here ({type(e).__name__}: "
            f"{_one_line(e)[:200]})"
        ) from None
    finally:
        torch._dynamo.reset()


def _check_positive(preset: Preset) -> None:
    for name in ("batch", "heads", "head_dim", "check_n", "repeats"):
        if getattr(preset, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(preset, name)}"
            )
    if preset.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {preset.warmup}")
    if not preset.seq_lens or min(preset.seq_lens) < 1:
        raise UsageError(f"--seq-lens must be positive integers, got {preset.seq_lens}")


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device: {_one_line(e)}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:i], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {text!r} needs CUDA, which is not available here (try --device cpu)"
        )
    return device


def _raw_configs(args: argparse.Namespace, preset: Preset) -> list[tuple[Config, str]]:
    """``((segment_lengths, dilation_rates), where)`` pairs, ``where`` naming their source."""
    lengths, rates = args.segment_lengths or [], args.dilation_rates or []
    if args.config_file and (lengths or rates):
        raise UsageError("give configs either with --config-file or with flags, not both")
    if args.config_file:
        return load_config_file(args.config_file)
    if len(lengths) != len(rates):
        raise UsageError(
            f"got {len(lengths)} --segment-lengths but {len(rates)} --dilation-rates; "
            "give them in pairs, one pair per config"
        )
    if lengths:
        return [
            ((w, r), f"--segment-lengths {_join(w)} --dilation-rates {_join(r)}")
            for w, r in zip(lengths, rates)
        ]
    return [(c, f"preset config {i}") for i, c in enumerate(preset.configs)]


def load_config_file(path: Path) -> list[tuple[Config, str]]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"config file {str(path)!r} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(data, list) or not data:
        raise UsageError(f"config file {str(path)!r} must hold a non-empty JSON list of configs")
    out = []
    for i, item in enumerate(data):
        where = f"{path.name}[{i}]"
        if not isinstance(item, dict) or set(item) != {"segment_lengths", "dilation_rates"}:
            raise UsageError(
                f"{where} must be an object with exactly the keys segment_lengths and "
                f"dilation_rates, got {item!r}"
            )
        out.append(((_tuple(item["segment_lengths"]), _tuple(item["dilation_rates"])), where))
    return out


def _tuple(value: Any) -> Any:
    """JSON lists become tuples; anything else goes to the library as is (and is rejected)."""
    return tuple(value) if isinstance(value, list) else value


def _config(
    w: tuple[int, ...], r: tuple[int, ...], causal: bool, mixing: str, where: str
) -> DilatedConfig:
    """The library's own validation (r | w, positive ints, known mixing) as a UsageError."""
    try:
        return DilatedConfig(w, r, causal, mixing)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {_one_line(e)}") from None


def select_strategies(filters: dict[str, Sequence[str]]) -> tuple[Strategy, ...]:
    """Valid strategies whose every field is among the given names (unknown names: UsageError)."""
    for kind, names in filters.items():
        for name in names:
            try:
                Strategy(**{kind: name})
            except (TypeError, ValueError) as e:
                raise UsageError(f"--{kind}: {_one_line(e)}") from None
    chosen = tuple(
        s
        for s in Strategy.all()  # every valid combination the registry knows
        if all(getattr(s, kind) in names for kind, names in filters.items())
    )
    wanted = " ".join(f"--{kind} {','.join(names)}" for kind, names in filters.items())
    if not chosen:
        raise UsageError(f"no valid strategy matches {wanted}")
    for kind, names in filters.items():  # (one left out was dropped from the sweep, silently)
        unmatched = [name for name in names if all(getattr(s, kind) != name for s in chosen)]
        if unmatched:
            raise UsageError(
                f"--{kind} {','.join(unmatched)}: no valid strategy of {wanted} has it "
                "(see docs/catalog.md for which components combine)"
            )
    return chosen


def check_distributed(preset: Preset, strategies: Sequence[Strategy]) -> bool:
    """Whether the sweep needs torch.distributed; if so, that it can have it (else UsageError).

    Preset "distributed" needs the ring and all_gather communicators; any sequence-parallel
    strategy needs a torchrun launch (one process per rank).
    """
    if preset.name == "distributed":
        registered = registry.names("communicator")
        missing = [c for c in DISTRIBUTED_COMMUNICATORS if c not in registered]
        if missing:
            raise UsageError(
                f"preset 'distributed' needs the {' and '.join(map(repr, missing))} "
                f"communicator(s), which are not registered yet (registered: "
                f"{', '.join(registered)})"
            )
    parallel = sorted({s.communicator for s in strategies if s.distributed})
    if preset.name != "distributed" and not parallel:
        return False
    if not all(name in os.environ for name in TORCHRUN_ENV):
        what = (
            "preset 'distributed'"
            if preset.name == "distributed"
            else f"the sequence-parallel communicator {parallel[0]!r}"
        )
        raise UsageError(
            f"{what} must be launched under torchrun, e.g. torchrun --nproc-per-node 2 "
            "-m experiments.ablate --preset distributed"
        )
    return True


# --------------------------------------------------------------------------------------------
# FLOP count
# --------------------------------------------------------------------------------------------


def tflops(pairs: int, b: int, d: int, ms: float | None, factor: float = 1.0) -> float | None:
    if ms is None or ms <= 0:
        return None
    return flop_count.tflops(factor * 4 * d * b * pairs, ms)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of results.csv: a strategy variant, or the dense baseline (``dense_sdpa``)."""

    strategy: str
    compile: bool
    segment_lengths: str
    dilation_rates: str
    mixing: str
    causal: bool
    n: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    check: str = "n/a"  # pass | FAIL | error | oom | unsupported | n/a (baseline)
    tolerance: float | None = None
    fwd_rel_err: float | None = None
    grad_rel_err: float | None = None
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_peak_mib: float | None = None
    fwdbwd_peak_mib: float | None = None
    peak_source: str = ""
    useful_pairs: int = 0
    fwd_tflops: float | None = None
    fwdbwd_tflops: float | None = None
    fwd_time_vs_dense: float | None = None  # time / dense SDPA time (same n, causal)
    fwdbwd_time_vs_dense: float | None = None
    wall_s: float | None = None  # the whole row: module build, compile, check, timing, memory
    note: str = ""

    @property
    def is_baseline(self) -> bool:
        return self.strategy == BASELINE


BASELINE = "dense_sdpa"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    calls: int = 1,
    settle_s: float = 0.0,
) -> float:
    """Median over ``repeats`` of the ms per call of ``fn``, CUDA events on a GPU. ``calls > 1``
    times that many calls back to back between one pair of events (no sync between them), so the
    host's work for one call overlaps the GPU's for the previous one, as in a model's steady state;
    ``calls = 1`` syncs first, and so also counts the host's latency before the first kernel.
    ``settle_s > 0``: first that many seconds of ``fn`` back to back (:func:`settle`)."""
    if settle_s > 0:
        settle(fn, device, settle_s)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def settle(fn: Callable[[], object], device: torch.device, seconds: float, batch: int = 8) -> int:
    """Calls ``fn`` back to back for about ``seconds`` (synchronizing every ``batch`` calls, so
    the host never queues more than that ahead of the GPU) and returns how many ran: the GPU's
    clocks and power then stand where ``fn``'s own sustained load puts them, whatever ran before
    it. An H200 runs a long dense SDPA call at its power cap from the first call, while a short
    burst of a lighter call runs above it (h200_perf.md step 30)."""
    calls = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            fn()
        calls += batch
        _sync(device)
    return calls


def queued_host_ms(
    fn: Callable[[], object], calls: int, sleep_cycles: int = 1_000_000_000
) -> float:
    """Host ms per call of ``calls`` calls of ``fn`` issued while the GPU sleeps ``sleep_cycles``
    clock cycles first (~0.5 s per 1e9 on an H200): every launch only queues, so nothing on the
    host waits for the GPU and the time is the host's own work."""
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return host_ms


def module_memory(fn: Callable[..., object]) -> MemoryManager | None:
    """The memory manager of ``fn``'s :class:`ringattn.DilatedAttention` (also under
    ``torch.compile``, or a function that names it as ``fn.memory``), or None (baselines): what
    it keeps between calls (:meth:`~ringattn.memory.base.MemoryManager.held_bytes`) is the
    module's memory too, though no call's peak shows it."""
    memory = getattr(getattr(fn, "_orig_mod", fn), "memory", None)
    return memory if isinstance(memory, MemoryManager) else None


def peak_mib(fn: Callable[[], object], device: torch.device, live_bytes: int) -> tuple[float, str]:
    """``live_bytes`` (the call's inputs) + the most the call allocates above the level before."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        source = "cuda_max_allocated"
    else:
        extra = cpu_allocator_peak(fn)
        source = "cpu_profiler"
    return (live_bytes + extra) / 2**20, source


def cpu_allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes the PyTorch CPU allocator holds during ``fn`` above its level at the start.

    The profiler records every allocation and free with its size; replaying them in time order
    gives the exact high-water mark (the CPU analogue of ``torch.cuda.max_memory_allocated``),
    unlike RSS, which malloc's free lists and arenas blur.
    """
    with _quiet_fd2(), torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Kineto prints start/stop lines on file descriptor 2 whatever its log level: drop them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def make_inputs(sweep: Sweep, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[b, n, h, d]`` and a gradient for the output, reproducible per ``n``."""
    p = sweep.preset
    gen = torch.Generator(device=sweep.device).manual_seed(seed + n)
    shape = (p.batch, n, p.heads, p.head_dim)
    return tuple(
        torch.randn(shape, generator=gen, device=sweep.device, dtype=sweep.dtype) for _ in range(4)
    )


@dataclass
class Oracle:
    """The float64 reference on the correctness input of one config."""

    inputs: tuple[torch.Tensor, ...]  # q, k, v, grad_out in the sweep's dtype
    out: torch.Tensor
    grads: tuple[torch.Tensor, ...]


def make_oracle(sweep: Sweep, config: DilatedConfig) -> Oracle:
    inputs = make_inputs(sweep, sweep.preset.check_n, seed=1)
    leaves = [x.detach().double().requires_grad_() for x in inputs[:3]]
    out = reference.dilated_attention(
        *leaves,
        segment_lengths=config.segment_lengths,
        dilation_rates=config.dilation_rates,
        causal=config.causal,
        mixing=config.mixing,
    )
    grads = torch.autograd.grad(out, leaves, inputs[3].double())
    return Oracle(inputs, out.detach(), grads)


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    denom = max(float(ref.norm()), floor)
    return float((x - ref).norm()) / denom if denom else float(x.norm())


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Layout:
    """How a strategy holds the sequence: whole, or this rank's shard (sequence parallel)."""

    split: Callable[[torch.Tensor], torch.Tensor] = _same  # full [b, n, ...] → what it gets
    join: Callable[[torch.Tensor], torch.Tensor] = _same  # its output → full [b, n, ...]

    @staticmethod
    def of(strategy: Strategy) -> Layout:
        if strategy.distributed:
            from ringattn import distributed

            return Layout(distributed.shard, distributed.gather)
        return Layout()


def check(
    module: torch.nn.Module, oracle: Oracle, layout: Layout = Layout()
) -> tuple[float, float | None, str]:
    """Forward rel err, max q/k/v gradient rel err and a note, against the oracle.

    A strategy that refuses the backward for these inputs (``DilatedAttention`` raises
    ``ValueError("... cannot run ...")`` before any work) is checked forward-only: the gradient
    error is ``None`` and the note says why.
    """
    q, k, v, grad_out = (layout.split(x) for x in oracle.inputs)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    try:
        out = module(*leaves)
    except ValueError as e:
        if not is_unsupported(e):
            raise
        with torch.no_grad():
            out = module(q, k, v)
        return rel_err(layout.join(out), oracle.out), None, f"forward only: {_one_line(e)}"
    grads = [layout.join(g) for g in torch.autograd.grad(out, leaves, grad_out)]
    floor = 0.1 * float(oracle.inputs[3].double().norm())
    grad_err = worst(rel_err(g, ref, floor) for g, ref in zip(grads, oracle.grads))
    return rel_err(layout.join(out), oracle.out), grad_err, ""


def is_unsupported(error: BaseException) -> bool:
    """The eager refusal of ``DilatedAttention.forward`` (computer cannot run these inputs)."""
    return isinstance(error, ringattn.UnsupportedError)


def forward_fn(
    attend: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]
) -> Callable[[], None]:
    q, k, v, _ = inputs

    def fwd() -> None:
        with torch.no_grad():
            attend(q, k, v)

    return fwd


def forward_backward_fn(
    attend: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]
) -> Callable[[], None]:
    q, k, v, grad_out = inputs
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd_bwd() -> None:
        # views, as a model's projections hand q, k, v: the core's one gradient buffer, where
        # leaves take three (bench does the same)
        out = attend(*(x.view_as(x) for x in leaves))
        torch.autograd.grad(out, leaves, grad_out)

    return fwd_bwd


def time_and_memory(
    row: Row,
    attend: Callable[..., torch.Tensor],
    sweep: Sweep,
    backward: bool = True,
    layout: Layout = Layout(),
) -> None:
    """Fill the timing, memory and TFLOP/s columns of ``row`` (same inputs for every variant).

    Sequence-parallel strategies get this rank's shard; times and peaks are the slowest rank's
    (TFLOP/s therefore counts all ranks together, memory is per rank).
    """
    p, device = sweep.preset, sweep.device
    inputs = tuple(layout.split(x) for x in make_inputs(sweep, row.n))
    tensor_bytes = inputs[0].numel() * inputs[0].element_size()
    fwd = forward_fn(attend, inputs)
    memory = module_memory(attend)
    if memory is not None:  # (what it keeps from here on counts: see module_memory)
        memory.clear()
    row.fwd_ms = median_ms(fwd, device, p.warmup, p.repeats)
    # live inputs: q, k, v (forward); q, k, v, grad_out (forward+backward); and what the
    # module's memory manager keeps
    held = memory.held_bytes() if memory is not None else 0
    row.fwd_peak_mib, row.peak_source = peak_mib(fwd, device, 3 * tensor_bytes + held)
    if backward:
        fwd_bwd = forward_backward_fn(attend, inputs)
        row.fwdbwd_ms = median_ms(fwd_bwd, device, p.warmup, p.repeats)
        held = memory.held_bytes() if memory is not None else 0
        row.fwdbwd_peak_mib, _ = peak_mib(fwd_bwd, device, 4 * tensor_bytes + held)
    _slowest_rank(row, device)
    row.fwd_tflops = tflops(row.useful_pairs, p.batch, p.head_dim, row.fwd_ms)
    row.fwdbwd_tflops = tflops(
        row.useful_pairs, p.batch, p.head_dim, row.fwdbwd_ms, FORWARD_BACKWARD_FACTOR
    )


MEASURED = ("fwd_ms", "fwdbwd_ms", "fwd_peak_mib", "fwdbwd_peak_mib")


def _slowest_rank(row: Row, device: torch.device) -> None:
    """Under torch.distributed, every rank's row gets the maximum over ranks of each measure."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    values = [getattr(row, name) for name in MEASURED]
    t = torch.tensor([-1.0 if x is None else x for x in values], dtype=torch.float64)
    t = t.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    for name, value in zip(MEASURED, t.tolist()):
        setattr(row, name, None if value < 0 else value)


def _row(
    sweep: Sweep, strategy: str, compile: bool, n: int, config: DilatedConfig | None, causal: bool
) -> Row:
    p = sweep.preset
    return Row(
        strategy=strategy,
        compile=compile,
        segment_lengths=_join(config.segment_lengths) if config else "",
        dilation_rates=_join(config.dilation_rates) if config else "",
        mixing=config.mixing if config else "",
        causal=causal,
        n=n,
        batch=p.batch,
        heads=p.heads,
        head_dim=p.head_dim,
        dtype=str(sweep.dtype).removeprefix("torch."),
        device=str(sweep.device),
    )


def _join(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def measure_baseline(sweep: Sweep, n: int, causal: bool) -> Row:
    row = _row(sweep, BASELINE, False, n, None, causal)
    row.useful_pairs = dense_pairs(n, sweep.preset.heads, causal)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q_bhnd, k_bhnd, v_bhnd = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(q_bhnd, k_bhnd, v_bhnd, is_causal=causal).transpose(
            1, 2
        )

    _guarded(row, lambda: time_and_memory(row, attend, sweep))
    return row


class EagerFirst(torch.nn.Module):
    """A compiled sequence-parallel module that makes, at each new input shape, the eager call
    such a module needs first (the ranks' agreement on its shapes, a collective the graph does
    not hold: README), then calls the compiled one. (These variants were left out of
    ``--compile on``, although the README says that compiling them works.)"""

    def __init__(self, eager: torch.nn.Module, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.eager, self.compiled = eager, compiled
        self.seen: set[tuple[torch.Size, torch.Size, torch.Size, torch.dtype]] = set()

    @property
    def memory(self) -> MemoryManager:
        """The module's memory manager, whose kept buffers the peaks count (``module_memory``
        found none here: these rows' peaks left out what the eager rows' held)."""
        return cast(MemoryManager, self.eager.memory)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        shape = (q.shape, k.shape, v.shape, q.dtype)
        if shape not in self.seen:
            with torch.no_grad():
                self.eager(q, k, v)
            self.seen.add(shape)
        out: torch.Tensor = self.compiled(q, k, v)
        return out


def measure_variant(sweep: Sweep, variant: Variant, oracle: Callable[[], Oracle]) -> Row:
    c = variant.config
    row = _row(sweep, variant.strategy.label, variant.compile, variant.n, c, c.causal)
    tolerance = row.tolerance = TOLERANCE[sweep.dtype]
    row.useful_pairs = useful_pairs(
        variant.n, sweep.preset.heads, c.segment_lengths, c.dilation_rates, c.causal, c.mixing
    )

    def run() -> None:
        attention = ringattn.DilatedAttention(
            c.segment_lengths,
            c.dilation_rates,
            causal=c.causal,
            mixing=c.mixing,
            strategy=variant.strategy,
            compile=variant.compile,
            compile_backend=sweep.compile_backend,
        )
        module: torch.nn.Module = attention
        if variant.compile and not attention.compiled_frame:
            # a block computer (math, sdpa) opens no compiled frame of its own: compile=True
            # alone runs its core eagerly, so the row repeated compile off. Compiling it means
            # an enclosing torch.compile, which captures the core as its opaque ops (README)
            module = cast(
                torch.nn.Module,
                torch.compile(attention, backend=sweep.compile_backend, fullgraph=True),
            )
            if variant.strategy.distributed:
                module = EagerFirst(attention, module)
        layout = Layout.of(variant.strategy)
        row.fwd_rel_err, row.grad_rel_err, row.note = check(module, oracle(), layout)
        errors = [e for e in (row.fwd_rel_err, row.grad_rel_err) if e is not None]
        row.check = "pass" if worst(errors) <= tolerance else "FAIL"
        backward = row.grad_rel_err is not None
        time_and_memory(row, module, sweep, backward, layout)

    _guarded(row, run)
    if variant.compile:
        # Each variant's graphs differ in their guards (its computer's type, causality, its
        # communicator), so they piled up on DilatedAttention.forward's one code object: past
        # Dynamo's recompile_limit (8) the next fullgraph compile failed (a sequence-parallel
        # sweep ended on every rank). bench resets after every variant too
        torch._dynamo.reset()
    return row


def _guarded(row: Row, run: Callable[[], None]) -> None:
    """Run one measurement; an exception becomes the row's ``check``/``note``, not a crash.

    Under torch.distributed with several ranks, only ringattn's refusals (``TypeError`` /
    ``ValueError``, which it raises on every rank of a call) become a row: any other error
    (out of memory, a kernel's failure) may be this rank's alone, and it ends the sweep, so
    torchrun stops every rank and prints it. Caught, the rank went on to the next row while
    its peers still waited in this row's exchanges: its next calls paired with theirs, and rows
    were measured against another variant's calls or failed with "Connection closed by peer",
    the real error never printed (rank 0 alone prints)."""
    started = time.perf_counter()
    try:
        run()
    except Exception as e:
        if _rank_local(e):
            raise
        _record_failure(row, e)
    finally:
        row.wall_s = time.perf_counter() - started
        if row.device.startswith("cuda"):  # free what reference cycles hold before the next row
            gc.collect()  # (costs ~0.2 s with Dynamo's heap: not worth it on CPU)
            torch.cuda.empty_cache()


def _rank_local(error: Exception) -> bool:
    """Whether ``error`` may have been raised on this rank alone of a multi-rank sweep (see
    :func:`_guarded`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    return not isinstance(error, (TypeError, ValueError))


def _record_failure(row: Row, e: Exception) -> None:
    if isinstance(e, torch.OutOfMemoryError):
        row.check, row.note = "oom", _one_line(e)[:200]
    else:  # a broken strategy must not lose the rest of the sweep
        row.check = "unsupported" if is_unsupported(e) else "error"
        row.note = f"{type(e).__name__}: {_one_line(e)}"[:300]


# --------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------


def plan_variants(sweep: Sweep) -> tuple[list[Variant], list[str]]:
    """Variants in run order (compile off first), and notes on what was left out and why."""
    notes, variants = [], []
    longest = max(max(c.segment_lengths) for c in sweep.configs)
    if sweep.preset.check_n < longest:  # (its verdict stands for every n's row: say what it saw)
        notes.append(
            f"check: n={sweep.preset.check_n} holds part of one segment of the longest config "
            f"(w={longest}): segment boundaries there are not checked; --check-n {longest} or "
            "more checks them"
        )
    for compile in sweep.compile_modes:
        strategies = list(sweep.strategies)
        # default strategy first, so that a compile budget spends itself on it
        ordered = sorted(strategies, key=lambda s: s != Strategy()) if compile else strategies
        chosen = [
            Variant(s, c, n, compile)
            for s in ordered
            for c in sweep.configs
            for n in sweep.preset.seq_lens
        ]
        if compile and sweep.compile_budget is not None and len(chosen) > sweep.compile_budget:
            notes.append(
                f"compile on: {sweep.compile_budget} of {len(chosen)} variants "
                "(budget; --compile on|both or --compile-budget -1 runs all)"
            )
            chosen = chosen[: sweep.compile_budget]
        variants += chosen
    return variants, notes


def run_sweep(
    sweep: Sweep, variants: list[Variant], progress: Progress, notes: list[str]
) -> tuple[list[Row], bool]:
    """Baselines first, then the variants: the rows, and whether Ctrl-C stopped the sweep (it
    keeps what was measured, and says so in ``notes``)."""
    baseline_keys = sorted({(v.n, v.config.causal) for v in variants}) if sweep.baseline else []
    task = progress.add_task("ablate", total=len(variants) + len(baseline_keys))
    oracles: dict[DilatedConfig, Oracle] = {}

    def oracle(config: DilatedConfig) -> Oracle:
        if config not in oracles:
            oracles[config] = make_oracle(sweep, config)
        return oracles[config]

    rows: list[Row] = []
    interrupted = False
    try:
        for n, causal in baseline_keys:
            progress.update(task, description=f"{BASELINE} n={n}{' causal' if causal else ''}")
            rows.append(measure_baseline(sweep, n, causal))
            progress.advance(task)
        for v in variants:
            progress.update(task, description=_describe(v))
            rows.append(measure_variant(sweep, v, partial(oracle, v.config)))
            progress.advance(task)
    except KeyboardInterrupt:
        notes.append(f"interrupted: {len(rows)} of {len(variants) + len(baseline_keys)} rows")
        interrupted = True
    relate_to_baseline(rows)
    return rows, interrupted


def _describe(v: Variant) -> str:
    c = v.config
    compiled = " compiled" if v.compile else ""
    return f"{v.strategy.label} {config_label(c)} n={v.n}{compiled}"


def config_label(c: DilatedConfig) -> str:
    causal = " causal" if c.causal else ""
    return f"w={_join(c.segment_lengths)} r={_join(c.dilation_rates)} {c.mixing}{causal}"


def relate_to_baseline(rows: list[Row]) -> None:
    dense = {(r.n, r.causal): r for r in rows if r.is_baseline}
    for r in rows:
        base = dense.get((r.n, r.causal))
        if base is None:
            continue
        r.fwd_time_vs_dense = _ratio(r.fwd_ms, base.fwd_ms)
        r.fwdbwd_time_vs_dense = _ratio(r.fwdbwd_ms, base.fwdbwd_ms)


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _sort_key(r: Row) -> tuple[int, bool, str, str, bool, bool, str]:
    return (r.n, not r.is_baseline, r.segment_lengths, r.mixing, r.causal, r.compile, r.strategy)


def write_csv(rows: list[Row], path: Path) -> None:
    names = [f.name for f in dataclasses.fields(Row)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "" if x is None else format(x, spec)


def _config_cell(r: Row) -> str:
    config = "dense" if r.is_baseline else f"w={r.segment_lengths} r={r.dilation_rates} {r.mixing}"
    return config + (" causal" if r.causal else "")


# (header, cell) of the printed table; results.csv has every column of Row.
SHORT_COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("strategy", lambda r: r.strategy),
    ("config", _config_cell),
    ("n", lambda r: str(r.n)),
    ("compile", lambda r: _on(r.compile)),
    ("check", lambda r: r.check),
    ("err fwd", lambda r: _fmt(r.fwd_rel_err, ".1e")),
    ("err grad", lambda r: _fmt(r.grad_rel_err, ".1e")),
    ("fwd ms", lambda r: _fmt(r.fwd_ms)),
    ("f+b ms", lambda r: _fmt(r.fwdbwd_ms)),
    ("t/dense fwd", lambda r: _fmt(r.fwd_time_vs_dense, ".2f")),
    ("t/dense f+b", lambda r: _fmt(r.fwdbwd_time_vs_dense, ".2f")),
    ("MiB f+b", lambda r: _fmt(r.fwdbwd_peak_mib)),
    ("TFLOP/s f+b", lambda r: _fmt(r.fwdbwd_tflops)),
)


def short_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    return [h for h, _ in SHORT_COLUMNS], [[cell(r) for _, cell in SHORT_COLUMNS] for r in rows]


def to_markdown(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def dict_rows_to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) in ``columns`` order; floats to 3 significant digits."""

    def fmt(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    return to_markdown(columns, [[fmt(row.get(c, "")) for c in columns] for row in rows])


def write_markdown(rows: list[Row], sweep: Sweep, path: Path, notes: list[str]) -> str:
    """results.md (context + short table); returns the table."""
    p = sweep.preset
    table = to_markdown(*short_table(rows))
    device_name = (
        torch.cuda.get_device_name(sweep.device)
        if sweep.device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    source = next((r.peak_source for r in rows if r.peak_source), "")
    header = [
        f"# ringattn ablation: preset `{p.name}`",
        "",
        f"- {device_name}; torch {torch.__version__}; dtype {p.dtype}; "
        f"b={p.batch}, h={p.heads}, d={p.head_dim}",
        f"- times: median of {p.repeats} after {p.warmup} warm-up calls",
        f"- check: relative error against the float64 oracle on n={p.check_n}, bound "
        f"{TOLERANCE[sweep.dtype]:g}; gradients relative to max(‖ref‖, 0.1·‖grad_out‖)",
        "- t/dense: time / dense `scaled_dot_product_attention` time (same n, causality; "
        "below 1: faster)",
        f"- MiB: inputs + what the module's memory manager keeps between calls + peak extra "
        f"allocation during one warm call ({source})",
        "- TFLOP/s: 4·d·b·(score pairs the dilated pattern defines), ×3.5 for forward+backward",
        *_distributed_note(),
        *(f"- {note}" for note in notes),
    ]
    path.write_text("\n".join(header) + "\n\n" + table + "\n")
    return table


def _distributed_note() -> list[str]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return []
    return [
        f"- {dist.get_world_size()} ranks ({dist.get_backend()}): sequence-parallel rows hold "
        "n/p rows per rank; times and MiB are the slowest / largest rank's, TFLOP/s all ranks'"
    ]


def plot(rows: list[Row], out: Path) -> list[Path]:
    """One PNG per (config, compile, fwd | fwd+bwd): time and peak memory against n, log-log."""
    measured = [r for r in rows if r.fwd_ms is not None]
    groups: dict[tuple[str, str, str, bool, bool], list[Row]] = {}
    for r in measured:
        if not r.is_baseline:
            key = (r.segment_lengths, r.dilation_rates, r.mixing, r.causal, r.compile)
            groups.setdefault(key, []).append(r)
    styles = _strategy_styles(sorted({r.strategy for r in measured if not r.is_baseline}))
    written = []
    for (w, rates, mixing, causal, compile), group in sorted(groups.items()):
        dense = [r for r in measured if r.is_baseline and r.causal == causal]
        masking = "causal" if causal else "full"
        for mode, label in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
            title = f"w={w} r={rates} {mixing} {masking}, compile {_on(compile)}, {label}"
            name = f"{w}_{rates}_{mixing}_{masking}_compile-{_on(compile)}_{mode}.png"
            path = out / name.replace(",", "-")
            if not any(getattr(r, f"{mode}_ms") is not None for r in group):
                continue  # (forward-only strategies: a plot of the baseline alone)
            if _plot_group(group + dense, mode, title, styles, path):
                written.append(path)
    return written


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _strategy_styles(strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The same color and marker for a strategy in every figure; the baseline dashed black."""
    cmap = plt.get_cmap("tab20")
    styles = {
        s: {"color": cmap(i % cmap.N), "marker": "os^vD<>ph*"[i % 10], "linestyle": "-"}
        for i, s in enumerate(strategies)
    }
    styles[BASELINE] = {"color": "black", "marker": "o", "linestyle": "--"}
    return styles


def _plot_group(
    rows: list[Row], mode: str, title: str, styles: dict[str, dict[str, Any]], path: Path
) -> bool:
    """Time and peak memory of ``mode`` against n, one line per strategy; False if no data."""
    series: dict[str, list[Row]] = {}
    for r in sorted(rows, key=lambda r: r.n):
        if getattr(r, f"{mode}_ms") is not None:
            series.setdefault(r.strategy, []).append(r)
    if not series:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for strategy, rs in sorted(series.items()):
        ns = [r.n for r in rs]
        ax_t.plot(ns, [getattr(r, f"{mode}_ms") for r in rs], label=strategy, **styles[strategy])
        ax_m.plot(ns, [getattr(r, f"{mode}_peak_mib") for r in rs], **styles[strategy])
    for ax, ylabel in ((ax_t, "time (ms, median)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax_t.get_legend_handles_labels(), loc="outside right center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    rows: list[Row]
    table: str
    files: list[Path] = field(default_factory=list)
    interrupted: bool = False


def import_plugins(argv: Sequence[str] | None) -> None:
    """Run the ``--import`` modules and files before the parser is built, so their registered
    strategies are valid names (and listed in ``--help``): a strategy out of the tree could be
    ablated only by editing a built-in ``__init__.py``."""
    pre = _Parser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    for target in pre.parse_known_args(argv)[0].imports:
        try:
            if target.endswith(".py"):
                spec = importlib.util.spec_from_file_location(Path(target).stem, target)
                if spec is None or spec.loader is None:
                    raise ImportError("not a Python file")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(target)
        except Exception as error:
            raise UsageError(f"--import {target!r}: {type(error).__name__}: {error}") from error


def parse(argv: Sequence[str] | None) -> Sweep:
    import_plugins(argv)  # (None: sys.argv, as argparse reads it)
    return resolve(build_parser().parse_args(argv))


def setup_distributed(sweep: Sweep) -> tuple[Sweep, bool]:
    """Under torchrun: the default process group (NCCL on CUDA, gloo on CPU), one GPU per rank.

    Returns the sweep on this rank's device and whether the group was created here.
    """
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    device = sweep.device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dataclasses.replace(sweep, device=device), created


def run(sweep: Sweep, console: Console, write: bool = True) -> Outcome:
    variants, notes = plan_variants(sweep)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with (
        Progress(*columns, console=console, transient=True) as progress,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("default")  # each distinct warning once, reported as a note
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # (rich's progress bar in a notebook without ipywidgets: about the display, not a result)
        warnings.filterwarnings("ignore", message='install "ipywidgets"')
        rows, interrupted = run_sweep(sweep, variants, progress, notes)
    notes += sorted({f"warning: {str(w.message).splitlines()[0]}" for w in caught})
    rows.sort(key=_sort_key)
    forward_only = sorted({r.strategy for r in rows if r.note.startswith("forward only")})
    if forward_only:
        notes.append(
            f"forward only (the computer refuses a backward here; reason in results.csv): "
            f"{', '.join(forward_only)}"
        )
    for note in notes:
        console.print(f"note: {note}", style="dim", soft_wrap=True, markup=False)
    if not write:
        return Outcome(rows, to_markdown(*short_table(rows)), interrupted=interrupted)
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, sweep.out / "results.csv")
    table = write_markdown(rows, sweep, sweep.out / "results.md", notes)
    files = [sweep.out / "results.csv", sweep.out / "results.md", *plot(rows, sweep.out)]
    return Outcome(rows, table, files, interrupted)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        sweep = parse(argv)
        # every rank, before any work or process group: a bad folder lost a whole sweep
        sweep.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(
            f"ablate: error: --out: cannot make {str(sweep.out)!r}: {e.strerror}", file=sys.stderr
        )
        return 2
    except UsageError as e:
        print(f"ablate: error: {_one_line(e)}", file=sys.stderr)
        return 2
    created_group = False
    if sweep.distributed:
        sweep, created_group = setup_distributed(sweep)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    console = Console(stderr=True, quiet=not rank0)
    started = time.perf_counter()
    try:
        outcome = run(sweep, console, write=rank0)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()
    failed = [r for r in outcome.rows if r.check in ("FAIL", "error")]
    if rank0:
        console.print(
            f"{len(outcome.rows)} rows in {time.perf_counter() - started:.0f} s, "
            f"{len(failed)} failed or errored; wrote {sweep.out}/ (results.csv, results.md, "
            f"{len(outcome.files) - 2} plots)",
            soft_wrap=True,
            markup=False,
        )
        print(outcome.table)
    if outcome.interrupted:  # (a partial sweep, its rows written: not a complete one's 0)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
