"""Random problems against the float64 oracle on the GPU, for a time budget: every single-device
strategy, forward and backward, with what users pass and the fixed GPU check never draws.

    python -m experiments.gpu_fuzz --budget 300 --out "$OUT/fuzz"

The GPU runs kernels the CPU suite only sees faked (cuDNN, FA4 and its fused variants, the cuDNN
frontend's placed calls, Triton merges), each with its own limits (head dims, alignments, strides).
``experiments.flex_gpu --part check`` holds every strategy to the oracle on three fixed problems
(d = 64); this draws the rest: head dims 8 to 256 (some not multiples of 8), fp16 / bf16 / fp32,
1 to 4 configs with tails and ``w > n``, and the input layouts of real models: q, k, v unbound from
a fused QKV projection, permuted from ``[b, h, n, d]``, offset in their storage, or sliced off a
wider head dim. Each module is called twice on one problem (the second call replays what the
first cached: FA4's launches, pooled buffers) and then on a second problem of another length and
layout (cache keys).

A call passes when its output's and its gradients' errors against the oracle are within 4x of
what ``computer="math"`` (plain matmuls) makes of the same inputs (at least a tenth of the
suite's ``TOLERANCE`` for the dtype; for gradients, the whole of it): the inputs' own rounding,
which a sharp softmax amplifies into the gradients, sets every kernel's error alike
(tests/test_strategies.py measures that term exactly), and a kernel's own error is far below it.
Gradients are measured as the suite measures them, relative to at least a tenth of
``‖grad_out‖`` (``tests/conftest.py``'s ``grad_floor``): a gradient that is exactly zero (dQ and
dK where each query sees one key) was compared with its absolute rounding noise, and a flash-style
backward, which forms ``D = rowsum(dO ∘ O)`` from the rounded output where math's softmax backward
cancels exactly, leaves ~1e-6 of it in float32 (torch's own float32 kernel on one-key rows:
2.8-3.5x math's error, step 56). Anything else, NaN,
or an exception other than a ``ValueError``/``TypeError`` refusing the input is a failure, written
with its seed to ``gpu_fuzz.json`` / ``gpu_fuzz.md`` under ``--out``; the table of failures is
printed last. ``--device cpu`` runs the same on the CPU (what CI runs, a few draws).

``--deterministic`` makes every call under ``torch.use_deterministic_algorithms(True)`` (the kernel
choices of that mode: ``docs/architecture.md``, "Deterministic mode") and holds each module's
second call on the first problem to its first call's bits as well (``same_bits``).

A draw depends on its seed and on ``--max-n`` / ``--max-d``: ``--replay SEED`` redraws both of
its problems (with their inputs) with the values it is given, so ``gpu_fuzz.md`` prints the
failures' replay with the run's, and ``--replay-from DIR/gpu_fuzz.json`` takes them (and
``--kernels``) from the run's record and refuses a seed whose redrawn problem is not the one
recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

import ringattn
from experiments import (
    deterministic_algorithms,
    fixed_cublas_workspace,
    make_out,
    require_positive,
    same_bits,
    worst,
)
from experiments.ablate import dict_rows_to_markdown, rel_err
from experiments.bench import failure
from ringattn import reference
from ringattn.computers.sdpa import SDPAComputer
from ringattn.kernels import fa4, fa4_add, fa4_dpsum, fa4_group, fa4_group_bwd, fa4_merge, fa4_zero

if TYPE_CHECKING:
    # a module's call: fn(q, k, v) -> out, [b, n, h, d]
    Attend: TypeAlias = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # q, k, v and the output gradient
    Inputs: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    # an output and its inputs' gradients (dq, dk, dv)
    Result: TypeAlias = tuple[torch.Tensor, tuple[torch.Tensor, ...]]
    # (problem, its inputs, the oracle's result, math's output and gradient errors)
    Prepared: TypeAlias = tuple[dict[str, Any], Inputs, Result, tuple[float, float]]

TOLERANCE = reference.TOLERANCE
MATH_FACTOR = 4
LAYOUTS = ("contiguous", "fused_qkv", "bhnd", "offset", "head_dim_slice")
HEAD_DIMS = (8, 20, 24, 32, 40, 48, 64, 64, 80, 96, 112, 128, 128, 160, 192, 256)
MATH = ringattn.Strategy(dilation="segment_local", computer="math", memory="none")
MAX_N, MAX_D = 8192, 256  # --max-n / --max-d's defaults


def draw_problem(rng: random.Random, max_n: int, max_d: int) -> dict[str, Any]:
    """One problem: shapes, configs (``r | w``), options; lengths mostly multiples of 16 (the
    kernels' tiles) with some odd ones, ``n`` with a tail past the longest segment half the time."""
    k = rng.randint(1, 4)
    rates = sorted(rng.choice((1, 2, 3, 4, 8, 16)) for _ in range(k))
    lengths = []
    for r in rates:
        rows = rng.choice((1, 7, 16, 48, 64, 100, 128, 256, 512, 2048))
        lengths.append(r * min(rows, max(1, max_n // r)))
    n = max(lengths) * rng.randint(1, 3)
    if rng.random() < 0.5:
        n += rng.randint(-max(lengths) + 1, max(lengths) - 1)
    n = max(1, min(n, max_n))
    d = rng.choice([x for x in HEAD_DIMS if x <= max_d])
    head_dim_scale = d**-0.5
    return {
        "b": rng.randint(1, 3),
        "n": n,
        "h": rng.randint(1, 8),
        "d": d,
        "dtype": rng.choice(("bfloat16", "bfloat16", "float16", "float16", "float32")),
        "segment_lengths": tuple(lengths),
        "dilation_rates": tuple(rates),
        "causal": rng.random() < 0.5,
        "mixing": rng.choice(("lse", "head_groups")),
        "scale": rng.choice((None, None, 0.5 * head_dim_scale, 2.0 * head_dim_scale)),
        "layout": rng.choice(LAYOUTS),
    }


def make_inputs(p: dict[str, Any], device: torch.device, seed: int) -> Inputs:
    """q, k, v (float64 on ``device``, then cast) in ``p["layout"]``, and the output gradient."""
    b, n, h, d = p["b"], p["n"], p["h"], p["d"]
    dtype = getattr(torch, p["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    layout = p["layout"]
    if layout == "fused_qkv":  # x @ W_qkv viewed as [b, n, 3, h, d]
        q, k, v = randn(b, n, 3, h, d).unbind(2)
    elif layout == "bhnd":  # a model that keeps heads before rows
        q, k, v = (randn(b, h, n, d).transpose(1, 2) for _ in range(3))
    elif layout == "offset":  # a view starting one row in (another base pointer alignment)
        q, k, v = (randn(b, n + 1, h, d)[:, 1:] for _ in range(3))
    elif layout == "head_dim_slice":  # the last d of a wider head dim
        q, k, v = (randn(b, n, h, d + 4)[..., 4:] for _ in range(3))
    else:
        q, k, v = (randn(b, n, h, d) for _ in range(3))
    return q, k, v, randn(b, n, h, d)


def oracle(
    p: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor
) -> Result:
    opts = {key: p[key] for key in ("segment_lengths", "dilation_rates", "causal", "mixing")}
    xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = reference.dilated_attention(*xs, **opts, scale=p["scale"])
    return out.detach(), torch.autograd.grad(out, xs, grad.double())


def run(
    module: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor
) -> Result:
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    # the layouts above are views: detach keeps their strides, which is the point
    out = module(*xs)
    return out.detach(), torch.autograd.grad(out, xs, grad)


def grad_floor(grad_out: torch.Tensor) -> float:
    """The least norm gradients are measured against (the module docstring says why)."""
    return 0.1 * float(grad_out.double().norm())


def errors(got: Result, ref: Result, grad_out: torch.Tensor) -> tuple[float, float]:
    out, grads = got
    ref_out, ref_grads = ref
    floor = grad_floor(grad_out)
    return rel_err(out, ref_out), worst(rel_err(g, r, floor) for g, r in zip(grads, ref_grads))


def module_for(strategy: ringattn.Strategy, p: dict[str, Any]) -> ringattn.DilatedAttention:
    return ringattn.DilatedAttention(
        p["segment_lengths"],
        p["dilation_rates"],
        causal=p["causal"],
        mixing=p["mixing"],
        scale=p["scale"],
        strategy=strategy,
        compile=False,
    )


def together(calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
    """Each call in a thread of its own, released at once (``--threads``): ``(True, result)`` or
    ``(False, exception)`` per call, in order."""
    if len(calls) == 1:  # (no thread: one call's traceback as it always was)
        try:
            return [(True, calls[0]())]
        except Exception as exc:
            return [(False, exc)]
    start = threading.Barrier(len(calls))
    results: list[tuple[bool, Any]] = [(False, RuntimeError("thread did not finish"))] * len(calls)

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = (True, calls[i]())
        except Exception as exc:
            results[i] = (False, exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def check_module(
    strategy: ringattn.Strategy,
    problems: list[Prepared],
    device: torch.device,
    seed: int,
    threads: int = 1,
    deterministic: bool = False,
) -> list[dict[str, Any]]:
    """One module through ``problems`` (each ``(p, inputs, oracle, math errors)``): one row per
    call. The module is built from the first problem's options; later problems share them.

    ``threads`` > 1: each call is made from that many threads at once, thread ``t`` on problem
    ``(call + t) % len(problems)``, so first calls race on one block signature and later ones run
    other signatures side by side (FA4's recordings and replays, pooled buffers, cuDNN handles);
    the row holds the worst thread's errors and passes when every thread's call does.

    ``deterministic`` (one thread): a call on the problem of an earlier call must also give its
    bits (``same_bits`` in the row)."""
    rows: list[dict[str, Any]] = []
    first_results: dict[int, Result] = {}  # (by problem: its first call's result)
    try:
        module = module_for(strategy, problems[0][0])
    except (ValueError, TypeError) as exc:  # a strategy refusing these options: not a failure
        return [{"strategy": strategy.label, "seed": seed, "refused": failure(exc)}]
    for call, (p, _, _, _) in enumerate(problems):
        row = {"strategy": strategy.label, "seed": seed, "call": call, **describe(p)}
        mine = [problems[(call + t) % len(problems)] for t in range(threads)]
        results = together([partial(run, module, *inputs) for _, inputs, _, _ in mine])
        crashed = [r for ok, r in results if not ok and not isinstance(r, (ValueError, TypeError))]
        if crashed:  # a crash inside the kernels: report, keep going
            row.update(ok=False, error=failure(crashed[0], 300))
            rows.append(row)
            continue
        refused = [r for ok, r in results if not ok]
        if len(refused) == len(results):
            row["refused"] = failure(refused[0])
            rows.append(row)
            continue
        # (a thread refused on its own problem: the others' results are still held to theirs)
        passed, fwd, grad = True, 0.0, 0.0
        for (q, inputs, ref, math_errs), (ok, got) in zip(mine, results):
            if not ok:
                continue
            fwd_t, grad_t = errors(got, ref, inputs[3])
            tolerance = TOLERANCE[getattr(torch, q["dtype"])]  # where math's error is ~0
            fwd_bound = max(tolerance / 10, MATH_FACTOR * math_errs[0])
            grad_bound = max(tolerance, MATH_FACTOR * math_errs[1])
            passed &= bool(fwd_t <= fwd_bound and grad_t <= grad_bound)  # NaN fails both
            fwd, grad = worst((fwd, fwd_t)), worst((grad, grad_t))
        if deterministic and threads == 1 and results[0][0]:
            got = results[0][1]
            earlier = first_results.setdefault(id(problems[call]), got)
            if earlier is not got:
                # (output and gradients, NaN included)
                row["same_bits"] = same_bits([got[0], *got[1]], [earlier[0], *earlier[1]])
                passed &= row["same_bits"]
        math_errs = problems[call][3]
        row.update(
            fwd_err=fwd,
            grad_err=grad,
            math_fwd_err=math_errs[0],
            math_grad_err=math_errs[1],
            ok=passed,
        )
        rows.append(row)
    return rows


def describe(p: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (str(val) if isinstance(val, tuple) else val)
        for key, val in p.items()
        if key != "scale"
    } | {"scale": None if p["scale"] is None else round(p["scale"], 4)}


def prepare(p: dict[str, Any], device: torch.device, seed: int) -> Prepared:
    inputs = make_inputs(p, device, seed)
    ref = oracle(p, *inputs)
    math_errs = errors(run(module_for(MATH, p), *inputs), ref, inputs[3])
    return p, inputs, ref, math_errs


SECOND_INPUTS = 10**6  # the second problem's inputs are drawn at seed + SECOND_INPUTS


def second_problem(p: dict[str, Any], rng: random.Random, max_n: int) -> dict[str, Any]:
    """The first problem's options at another length and layout (b, h, d, dtype kept)."""
    n = max(1, min(max_n, p["n"] + rng.choice((-1, 1)) * rng.randint(1, max(1, p["n"] // 2))))
    return p | {"n": n, "layout": rng.choice(LAYOUTS)}


def fuzz(
    args: argparse.Namespace, device: torch.device
) -> tuple[list[dict[str, Any]], int, dict[str, dict[str, Any]]]:
    """The draws' rows, their count, and each seed's first problem (``describe``d: what
    ``--replay-from`` holds a replay's redraw to)."""
    strategies = [s for s in ringattn.Strategy.single_device() if args.flex or s.computer != "flex"]
    rows: list[dict[str, Any]] = []
    problems: dict[str, dict[str, Any]] = {}
    draws = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.budget and (args.draws is None or draws < args.draws):
        seed = args.seed + draws
        rng = random.Random(seed)
        p = draw_problem(rng, args.max_n, args.max_d)
        problems[str(seed)] = describe(p)
        try:
            first = prepare(p, device, seed)
            second = prepare(second_problem(p, rng, args.max_n), device, seed + SECOND_INPUTS)
        except (ValueError, TypeError) as exc:  # math refusing: a bad draw, not a finding
            rows.append({"strategy": MATH.label, "seed": seed, "refused": failure(exc)})
            draws += 1
            continue
        for strategy in strategies:
            rows += check_module(
                strategy, [first, first, second], device, seed, args.threads, args.deterministic
            )
        draws += 1
        bad = [r for r in rows if r.get("ok") is False]
        print(f"draw {draws} seed {seed}: {describe(p)} | failures so far {len(bad)}", flush=True)
    return rows, draws, problems


@contextmanager
def variant(name: str) -> Iterator[None]:
    """The kernel switches of one A/B variant (``--replay``): ``default``; ``bwd_torch`` /
    ``fwd_torch`` (torch's kernels in that direction instead of FA4's); ``unfused`` (FA4's own
    kernels without ours around them: no merging, zeroing, adding, given sums or grouped
    launches)."""
    saved = (SDPAComputer.cuda_forward, SDPAComputer.cuda_backward)
    fused: tuple[Any, ...] = (fa4_add, fa4_dpsum, fa4_group, fa4_group_bwd, fa4_merge, fa4_zero)
    enabled = [m.ENABLED for m in fused]
    try:
        if name == "bwd_torch":
            SDPAComputer.cuda_backward = "torch"
        elif name == "fwd_torch":
            SDPAComputer.cuda_forward = "torch"
        elif name == "unfused":
            for m in fused:
                m.ENABLED = False
        yield
    finally:
        SDPAComputer.cuda_forward, SDPAComputer.cuda_backward = saved
        for m, flag in zip(fused, enabled):
            m.ENABLED = flag


def measure(
    row: dict[str, Any], module: Attend, inputs: Inputs, ref: Result, forward_alone: bool = False
) -> None:
    """``row`` given the output's and each gradient's error against ``ref``, or the exception
    (text) where a call raised; ``forward_alone``: the output's from a no-grad call first (a
    forward that runs, apart from a backward that fails)."""
    try:
        if forward_alone:
            with torch.no_grad():
                row["fwd_err"] = rel_err(module(*inputs[:3]), ref[0])
        out, grads = run(module, *inputs)
        row.setdefault("fwd_err", rel_err(out, ref[0]))
        floor = grad_floor(inputs[3])
        for label, g, r in zip(("dq", "dk", "dv"), grads, ref[1]):
            row[f"{label}_err"] = rel_err(g, r, floor)
    except Exception as exc:
        row["error"] = failure(exc, 200)


def replay_mismatch(seed: int, recorded: dict[str, Any], max_n: int, max_d: int) -> str | None:
    """How ``seed``'s problem redrawn at ``max_n`` / ``max_d`` differs from ``recorded`` (a fuzz
    run's ``describe``d draw), or None where it is the same problem."""
    drawn = describe(draw_problem(random.Random(seed), max_n, max_d))
    keys = [key for key in drawn | recorded if drawn.get(key) != recorded.get(key)]
    return (
        ", ".join(f"{key} {recorded.get(key)!r} drawn as {drawn.get(key)!r}" for key in keys)
        or None
    )


def replay_record(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--replay-from``: the fuzz run's ``--max-n`` / ``--max-d`` / ``--kernels`` (refused where
    given otherwise), its failed seeds where ``--replay`` names none, and a refusal for a seed
    it did not draw or whose redraw is another problem (``draw_problem`` changed since)."""
    path = args.replay_from
    try:
        record = json.loads(path.read_text())
    except OSError as exc:
        parser.error(f"--replay-from: cannot read {str(path)!r}: {exc.strerror}")
    except ValueError as exc:
        parser.error(f"--replay-from: {str(path)!r} is not JSON ({exc})")
    keys = ("max_n", "max_d", "kernels", "problems", "rows")
    if not isinstance(record, dict) or not all(key in record for key in keys):
        parser.error(
            f"--replay-from: {str(path)!r} is not a fuzz run's gpu_fuzz.json with its draws "
            "(one written before they were recorded: --replay SEED with the --max-n / --max-d "
            "of its gpu_fuzz.md's Command line)"
        )
    for key in ("max_n", "max_d", "kernels"):
        given = getattr(args, key)
        if given is not None and given != record[key]:
            flag = "--" + key.replace("_", "-")
            parser.error(
                f"{flag} {given}, but --replay-from's run drew with {flag} {record[key]}: "
                "leave it out (a replay draws what the run drew)"
            )
        setattr(args, key, record[key])
    if args.replay is None:
        args.replay = sorted({row["seed"] for row in record["rows"] if row.get("ok") is False})
        if not args.replay:
            parser.error(
                f"--replay-from: {str(path)!r} records no failure: name seeds with --replay"
            )
    for seed in args.replay:
        if str(seed) not in record["problems"]:
            drawn = sorted(record["problems"], key=int)
            parser.error(
                f"--replay {seed}: not among --replay-from's draws (seeds {', '.join(drawn)})"
            )
        diff = replay_mismatch(seed, record["problems"][str(seed)], args.max_n, args.max_d)
        if diff:
            parser.error(
                f"--replay {seed}: redraws another problem than --replay-from recorded ({diff}): "
                "the draw has changed since that run"
            )


def replay_command(args: argparse.Namespace, seeds: Iterable[int]) -> str:
    """The command line that replays ``seeds`` as this run drew them."""
    return (
        f"python -m experiments.gpu_fuzz --device {args.device} --kernels {args.kernels} "
        f"--max-n {args.max_n} --max-d {args.max_d} --replay {' '.join(map(str, seeds))}"
    )


def failures_replay(args: argparse.Namespace, bad: list[dict[str, Any]]) -> str:
    """The line that replays the failed draws (``bad``'s seeds), as this run drew them."""
    seeds = sorted({row["seed"] for row in bad})
    return f"Replay: `{replay_command(args, seeds)}` (or `--replay-from` this gpu_fuzz.json)"


def replay(
    seeds: list[int], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Each seed's two problems again (the first, then the second: the run's call 2, a failure
    only there was not replayable before) through ``segment_local/sdpa``, whole and one config
    at a time, under each :func:`variant`: which config and which kernel a failure comes from.
    Each part gets a fresh module: a failure that needs the run's earlier calls on the same
    module (its caches) shows in the run's rows, not here."""
    rows: list[dict[str, Any]] = []
    strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="none")
    for seed in seeds:
        rng = random.Random(seed)  # drawn as ``fuzz`` draws: the first problem, then the second
        first = draw_problem(rng, args.max_n, args.max_d)
        second = second_problem(first, rng, args.max_n)
        for which, p, input_seed in (
            ("first", first, seed),
            ("second", second, seed + SECOND_INPUTS),
        ):
            configs = list(zip(p["segment_lengths"], p["dilation_rates"]))
            parts = [("all", p)] + [
                (f"({w}, {r})", p | {"segment_lengths": (w,), "dilation_rates": (r,)})
                for w, r in configs
            ]
            for part, problem in parts:
                inputs = make_inputs(problem, device, input_seed)
                ref = oracle(problem, *inputs)
                for name in ("default", "bwd_torch", "fwd_torch", "unfused"):
                    row = {"seed": seed, "problem": which, "configs": part, "variant": name}
                    row |= describe(problem)
                    with variant(name):
                        measure(row, module_for(strategy, problem), inputs, ref)
                    rows.append(row)
                    print(row, flush=True)
    return rows


def fa4_head_dims(device: torch.device, dims: list[int]) -> list[dict[str, Any]]:
    """FA4 at each head dim, ``fa4.BACKWARD_HEAD_DIM_MULTIPLE``'s gate lifted: one 2048-row
    config (n = 4096, bf16, contiguous), causal and not; the forward alone (no_grad), then
    forward+backward; errors against the oracle."""
    rows: list[dict[str, Any]] = []
    strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="none")
    gate = fa4.BACKWARD_HEAD_DIM_MULTIPLE
    fa4.BACKWARD_HEAD_DIM_MULTIPLE = 8
    try:
        for d in dims:
            for causal in (True, False):
                p = {"b": 2, "n": 4096, "h": 4, "d": d, "dtype": "bfloat16", "causal": causal}
                p |= {"segment_lengths": (2048,), "dilation_rates": (1,), "mixing": "lse"}
                p |= {"scale": None, "layout": "contiguous"}
                inputs = make_inputs(p, device, d)
                ref = oracle(p, *inputs)
                row = {"d": d, "causal": causal, "fa4_backward": fa4.backward_available(inputs[0])}
                measure(row, module_for(strategy, p), inputs, ref, forward_alone=True)
                rows.append(row)
                print(row, flush=True)
    finally:
        fa4.BACKWARD_HEAD_DIM_MULTIPLE = gate
    return rows


KERNELS: dict[
    str, dict[str, Any]
] = {  # --kernels: which CUDA kernels sdpa may call (what users without the extras get)
    "installed": {},
    "no_fa4": {"cuda_forward": "torch", "cuda_backward": "torch"},
    "plain_torch": {"cuda_forward": "torch", "cuda_backward": "torch", "in_place": False},
}


REPLAY_COLUMNS = ["seed", "problem", "configs", "variant", "dtype", "n", "h", "d", "causal"]
REPLAY_COLUMNS += ["mixing", "layout", "fwd_err", "dq_err", "dk_err", "dv_err", "error"]


COLUMNS = [
    "seed",
    "call",
    "strategy",
    "dtype",
    "b",
    "n",
    "h",
    "d",
    "segment_lengths",
    "dilation_rates",
    "causal",
    "mixing",
    "scale",
    "layout",
    "fwd_err",
    "grad_err",
    "math_fwd_err",
    "math_grad_err",
    "same_bits",
    "error",
]


def worst_gradients(rows: list[dict[str, Any]], count: int = 5) -> list[dict[str, Any]]:
    """The ``count`` rows whose gradient error is largest against math's, NaN first (sorted by
    a NaN key, the list left out the NaN row, or rows beside it, at random)."""

    def ratio(row: dict[str, Any]) -> float:
        value = row["grad_err"] / max(row["math_grad_err"], 1e-12)
        return math.inf if math.isnan(value) else value

    return sorted(rows, key=ratio, reverse=True)[:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/gpu_fuzz"),
        help="folder for gpu_fuzz.md / .json and the failures' replays (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default), or cpu for a dry run",
    )
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of drawing")
    parser.add_argument("--draws", type=int, default=None, help="stop after this many draws")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the draws' seed: a seed draws the same problems again (default: %(default)s)",
    )
    parser.add_argument(
        "--max-n",
        type=int,
        default=None,
        help=f"longest sequence drawn (default: {MAX_N}; with --replay-from, the run's)",
    )
    parser.add_argument(
        "--max-d",
        type=int,
        default=None,
        help=f"largest head dim drawn (default: {MAX_D}; with --replay-from, the run's)",
    )
    parser.add_argument("--flex", action="store_true", help="draw computer='flex' too (compiles)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="make each call from this many threads at once, on one module (default: %(default)s)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="every call under torch.use_deterministic_algorithms(True), and a module's second "
        "call on a problem held to its first call's bits too (not with --threads > 1)",
    )
    parser.add_argument(
        "--replay",
        type=int,
        nargs="+",
        default=None,
        help="instead of drawing: these seeds' problems, whole and per config, under A/B switches "
        "(redrawn at --max-n / --max-d: give the run's, or --replay-from)",
    )
    parser.add_argument(
        "--replay-from",
        type=Path,
        default=None,
        help="a fuzz run's gpu_fuzz.json: replay its failed seeds (or --replay's) at its --max-n, "
        "--max-d and --kernels, refusing a seed whose redrawn problem is not the one recorded",
    )
    parser.add_argument(
        "--kernels",
        choices=tuple(KERNELS),
        default=None,
        help="no_fa4: torch's kernels (cuDNN, placed through its frontend where installed); "
        "plain_torch: torch's kernels only (no frontend), as without the cuda/fa4 extras "
        "(default: installed; with --replay-from, the run's)",
    )
    parser.add_argument(
        "--fa4-head-dims",
        type=int,
        nargs="+",
        default=None,
        help="instead of drawing: FA4 at these head dims, the backward's gate lifted",
    )
    args = parser.parse_args(argv)
    if args.replay_from is not None:
        if args.fa4_head_dims is not None:
            parser.error("--fa4-head-dims and --replay-from: one at a time")
        replay_record(parser, args)  # (before the checks below: it sets --max-n / --max-d)
    for key, default in (("max_n", MAX_N), ("max_d", MAX_D), ("kernels", "installed")):
        if getattr(args, key) is None:
            setattr(args, key, default)
    # (--budget 0 or --draws 0 reported "0 draws, 0 calls checked, 0 failed"; --max-n 0 drew
    # n = 1 under its name; --max-d below 8 left no head dim (an IndexError at the first draw);
    # --fa4-head-dims 0 raised after the dims before it had run)
    if not args.budget > 0:  # (NaN too)
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    require_positive(
        parser, args, "max_n", "threads", *(["draws"] if args.draws is not None else [])
    )
    if args.max_d < min(HEAD_DIMS):
        parser.error(f"--max-d must be >= {min(HEAD_DIMS)}, the least head dim, got {args.max_d}")
    if args.fa4_head_dims is not None:
        require_positive(parser, args, "fa4_head_dims")
        if args.replay is not None:  # (the replay was skipped, without a word)
            parser.error("--fa4-head-dims and --replay: one at a time")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_fuzz: error: --device cuda, but CUDA is not available here")
    device = torch.device(args.device)
    make_out(parser, args.out)
    for name, value in KERNELS[args.kernels].items():
        setattr(SDPAComputer, name, value)
    if args.fa4_head_dims:
        rows = fa4_head_dims(device, args.fa4_head_dims)
        columns = ["d", "causal", "fa4_backward", "fwd_err", "dq_err", "dk_err", "dv_err", "error"]
        table = dict_rows_to_markdown(rows, columns)
        (args.out / "fa4_head_dims.md").write_text(table + "\n")
        print(table)
        return
    if args.replay is not None:
        rows = replay(args.replay, args, device)
        (args.out / "gpu_fuzz_replay.json").write_text(json.dumps(rows))
        table = dict_rows_to_markdown(rows, REPLAY_COLUMNS)
        source = "" if args.replay_from is None else f" (the draws of {args.replay_from})"
        command = f"Command: `{replay_command(args, args.replay)}`{source}"
        (args.out / "gpu_fuzz_replay.md").write_text(f"{command}\n\n{table}\n")
        print(table)
        print(command)
        return
    if args.deterministic and args.threads > 1:
        parser.error("--deterministic compares one thread's calls: not with --threads > 1")
    if args.deterministic:
        fixed_cublas_workspace()  # (the oracle's and math's matmuls)
    with deterministic_algorithms() if args.deterministic else nullcontext():
        rows, draws, problems = fuzz(args, device)
    checked = [r for r in rows if "ok" in r]
    bad = [r for r in checked if not r["ok"]]
    refused = Counter(r["refused"] for r in rows if "refused" in r)
    header = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    summary = (
        f"{draws} draws, {len(checked)} calls checked, {len(bad)} failed, "
        f"{sum(refused.values())} refused ({header}, torch {torch.__version__}, seed {args.seed}, "
        f"kernels {args.kernels}, threads {args.threads}"
        + (", deterministic)" if args.deterministic else ")")
    )
    drawn_with = {"max_n": args.max_n, "max_d": args.max_d, "kernels": args.kernels}
    record = {"summary": summary, **drawn_with, "problems": problems, "rows": rows}
    (args.out / "gpu_fuzz.json").write_text(json.dumps(record))
    replay_line = failures_replay(args, bad)
    report = [
        "# Random problems against the float64 oracle",
        "",
        f"Command: `python -m experiments.gpu_fuzz --device {args.device} --budget {args.budget} "
        f"--seed {args.seed} --max-n {args.max_n} --max-d {args.max_d} --kernels {args.kernels}"
        + ("" if args.draws is None else f" --draws {args.draws}")  # (it drew one: said 300 s)
        + ("" if args.threads == 1 else f" --threads {args.threads}")
        + (" --deterministic" if args.deterministic else "")
        + (" --flex`" if args.flex else "`"),
        "",
        summary,
        "",
        "## Failures",
        "",
        dict_rows_to_markdown(bad, COLUMNS) if bad else "none",
        "",
        *([replay_line, ""] if bad else []),
        "## Refusals (ValueError / TypeError), by message",
        "",
        "\n".join(f"- {count}x {msg}" for msg, count in refused.most_common()) or "none",
        "",
    ]
    (args.out / "gpu_fuzz.md").write_text("\n".join(report))
    print("\nworst gradient errors relative to math's:")
    print(dict_rows_to_markdown(worst_gradients([r for r in checked if "grad_err" in r]), COLUMNS))
    print("\nfailures:")
    print(dict_rows_to_markdown(bad, COLUMNS) if bad else "none")
    if bad:
        print(replay_line)
    print(summary)


if __name__ == "__main__":
    main()
