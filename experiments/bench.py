"""GPU benchmark: every single-device strategy against dense SDPA and a plain implementation.

    python -m experiments.bench                                   # issue 5's shape, 32K and 128K
    python -m experiments.bench --n 32768 131072 1048576 --out $OUT/bench
    python -m experiments.bench --device cpu --n 512 --lengths 64 128 --rates 1 2 --heads 4 \
        --dim 16 --computers sdpa --no-in-model   # under a minute on two cores (with the compiled
        # "(in torch.compile)" rows about twice that; flex compiles slowly on a CPU, forward only)

Times (CUDA events, warm-up, median of ``--repeats``) forward and forward+backward of

* ``dense SDPA`` — the ceiling: ``F.scaled_dot_product_attention`` over the whole sequence (its
  useful TFLOP/s is a rate, so above ``--dense-max-n`` it is measured once at that length and
  reused: the rate is flat in ``n`` while its time grows as ``n^2``);
* ``plain`` — the baseline that issue 5 describes (``head_groups`` only): gather each group's
  dilated rows into a new tensor, call SDPA, scatter the result back;
* every strategy (dilation x computer: ``sdpa`` eager and inside an enclosing ``torch.compile``,
  ``(in torch.compile)``, as a compiled model runs it; ``(compiled, <mode>)`` for the module's
  own frame in another ``--compile-modes`` mode; ``flex`` compiled), and the eager ``sdpa`` rows
  once more forced onto FlashAttention-2 (``[flash]``, A/B against cuDNN; CUDA only),

and prints one table: ms, useful TFLOP/s (``ringattn.flops``), ratio to dense SDPA in the same run
(single calls, back to back, and with ``--graphs`` replayed from CUDA graphs against dense SDPA
replayed), and peak memory relative to the tensors the call cannot avoid — forward:
``(q, k, v, out)``; forward+backward: ``(q, k, v, out)`` and their gradients (CUDA only: the
``*_mem_vs_io`` columns are NaN on a CPU). Before timing,
each variant is checked against the float64 oracle at ``--check-n`` (output, and gradients where
that length is timed with a backward): column ``check`` is ``FAIL`` beyond the dtype's bound
(``ringattn.reference.TOLERANCE``, the tests'), and the exit status is 1 where a row fails or a
variant raises (its message printed and listed under ``failed`` in ``bench.json``).
Writes ``bench.json``, ``bench.md`` and ``bench.png`` (throughput and memory vs n, log axes)
under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
import torch.nn.functional as F

import ringattn
from experiments import (
    CAUSALITY,
    ISSUE_LENGTHS,
    ISSUE_RATES,
    add_causality,
    add_heads,
    add_lengths,
    add_mixings,
    data_range,
    require_distinct,
    require_mixings,
    require_positive,
    worst,
)
from experiments.ablate import TOLERANCE, dict_rows_to_markdown, median_ms, module_memory, rel_err
from ringattn import reference
from ringattn.computers.sdpa import CUDA_FORWARDS, SDPAComputer
from ringattn.flops import dense_flops, tflops, useful_flops
from ringattn.kernels import cudnn_graphs, fa4
from ringattn.memory.base import MemoryManager
from ringattn.pattern import head_groups

if TYPE_CHECKING:
    # a timed variant: fn(q, k, v) -> out, [b, n, h, d]
    Attend: TypeAlias = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # make(mixing, causal): a variant's function for one mixing and causality
    Make: TypeAlias = Callable[[str, bool], Attend]
    # make(mixing, causal) of a strategy's module (the A/B rows set its computer's kernels)
    MakeModule: TypeAlias = Callable[[str, bool], ringattn.DilatedAttention]
    # the oracle check's problem: (mixing, causal, shape, dtype, lengths, rates, device)
    OracleKey: TypeAlias = tuple[
        str, bool, tuple[int, ...], torch.dtype, tuple[int, ...], tuple[int, ...], str
    ]

# --- the plain baseline -------------------------------------------------------------------------


def plain_head_groups(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: Sequence[int],
    rates: Sequence[int],
    causal: bool,
) -> torch.Tensor:
    """Gather, SDPA, scatter: what a first implementation of ``mixing="head_groups"`` does.

    The full segments go in one SDPA call per group, the partial tail (``w`` not dividing ``n``,
    ``w > n`` included: docs/semantics.md) in one more, so it is checked against the oracle at
    any ``--check-n``.
    """
    b, n, h, d = q.shape
    out = torch.zeros_like(q)
    for g, ((w, r), (lo, hi)) in enumerate(zip(zip(lengths, rates), head_groups(h, len(lengths)))):
        if hi == lo:
            continue
        off, full = g % r, n // w * w
        for start, stop, length in ((0, full, w), (full, n, n - full)):
            if stop - start <= off:  # no segment, or a tail no longer than the offset
                continue
            segments = (stop - start) // length
            rows = (
                start
                + torch.arange(segments, device=q.device)[:, None] * length
                + torch.arange(off, length, r, device=q.device)
            ).flatten()

            def gather(
                x: torch.Tensor,
                rows: torch.Tensor = rows,
                lo: int = lo,
                hi: int = hi,
                segments: int = segments,
            ) -> torch.Tensor:
                picked = x[:, rows, lo:hi]  # a copy: advanced indexing
                return picked.reshape(b * segments, -1, hi - lo, d).transpose(1, 2)

            o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=causal)
            out[:, rows, lo:hi] = o.transpose(1, 2).reshape(b, -1, hi - lo, d)
    return out


# --- timing and memory ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Bytes allocated at the peak of ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return float(torch.cuda.max_memory_allocated() - base)


def fwd_and_fwdbwd(
    fn: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor
) -> tuple[Callable[[], object], Callable[[], None]]:
    """The two timed calls of ``fn(q, k, v)``: forward without grad, forward+backward(dout)."""

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn(q, k, v)

    def fwdbwd() -> None:
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        # views, as a model's projections hand q, k, v (not leaves): the core's one buffer for
        # the three gradients, where leaves take three (step 78: up to 4% more at 32K)
        fn(*(x.view_as(x) for x in xs)).backward(dout)

    return fwd, fwdbwd


def failure(exc: Exception, limit: int = 160) -> str:
    """A row's text for a measurement that raised (the run keeps its other rows): its type and
    the first ``limit`` characters of its message."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}"


def graphed_calls(
    fn: Attend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    warmup: int = 2,
    backward: bool = True,
) -> dict[str, Callable[[], object] | str | float]:
    """:func:`fwd_and_fwdbwd`'s two calls replayed from CUDA graphs, as ``{"fwd": ..., "fwdbwd":
    ...}``: the forward captured with ``torch.cuda.graph`` after ``warmup`` calls on a side stream,
    forward+backward through ``torch.cuda.make_graphed_callables``; where a capture failed, why.
    Each replay is also held to the eager call (``"fwd_err"``, ``"fwdbwd_err"``: the relative
    error of the replayed output, and of its gradients, against an eager call's): a graph that
    timed fast but skipped or misordered work shows there. ``backward=False``: the forward only
    (capturing the backward runs it, which the longest lengths cannot hold)."""
    calls: dict[str, Callable[[], object] | str | float] = {}
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # first calls (kernel guards, communicators) before capture
                fn(q, k, v)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out_static = fn(q, k, v)
        graph.replay()
        with torch.no_grad():
            calls["fwd_err"] = rel_err(out_static, fn(q, k, v))
        calls["fwd"] = graph.replay
    except Exception as exc:
        calls["fwd"] = failure(exc)
    if not backward:
        return calls
    try:
        xs = tuple(x.detach().requires_grad_() for x in (q, k, v))
        # (torch types the result Module | Callable[..., object]: it is fn, graphed)
        graphed: Attend = torch.cuda.make_graphed_callables(fn, xs)  # type: ignore[assignment]
        replayed, eager = with_grads(graphed, q, k, v, dout), with_grads(fn, q, k, v, dout)
        calls["fwdbwd_err"] = worst(rel_err(x, ref) for x, ref in zip(replayed, eager, strict=True))
        calls["fwdbwd"] = fwd_and_fwdbwd(graphed, q, k, v, dout)[1]
    except Exception as exc:
        calls["fwdbwd"] = failure(exc)
    return calls


def with_grads(
    fn: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor
) -> list[torch.Tensor]:
    """``fn(q, k, v)``'s output and its inputs' gradients for ``dout``."""
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    out.backward(dout)
    # (the backward above set each x.grad, Tensor | None to mypy)
    return [out.detach(), *(x.grad for x in xs)]  # type: ignore[list-item]


def replayed(
    fn: Attend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    backward: bool,
) -> dict[str, float | str]:
    """``--graphs``: ``fn``'s calls replayed from CUDA graphs (:func:`graphed_calls`), timed as
    the eager rows are (median of ``--repeats`` after ``--warmup``, ``--settle``): ``fwd_ms_graph``
    (``fwdbwd_ms_graph``) and the replay's error against an eager call (``*_graph_err``), or why
    the capture failed (``*_graph_failure``). The forward replays on the captured q, k, v; the
    forward+backward copies ``dout`` into its graph's buffer, as a model's replay would."""
    calls = graphed_calls(fn, q, k, v, dout, backward=backward)
    stats: dict[str, float | str] = {}
    for part in ("fwd", "fwdbwd") if backward else ("fwd",):
        call = calls.get(part)
        if callable(call):
            ms = median_ms(call, device, args.warmup, args.repeats, settle_s=args.settle)
            stats[f"{part}_ms_graph"] = ms
            if isinstance(err := calls.get(f"{part}_err"), float):
                stats[f"{part}_graph_err"] = err
        else:
            stats[f"{part}_graph_failure"] = str(call)
    del calls, call  # the graphs' memory pools, before the next row's capture and peaks
    gc.collect()
    return stats


def add_rates(stats: dict[str, Any], flops: dict[str, float]) -> None:
    """Useful TFLOP/s from ``stats``' times, for each part of ``flops`` (``fwd``, ``fwdbwd``: the
    useful FLOPs of one call): ``{part}_tflops`` (None where the part was not timed), and
    ``{part}_tflops_graph`` where ``--graphs`` replayed it."""
    for part, useful in flops.items():
        ms = stats.get(f"{part}_ms")
        stats[f"{part}_tflops"] = tflops(useful, ms) if ms else None
        if ms_graph := stats.get(f"{part}_ms_graph"):
            stats[f"{part}_tflops_graph"] = tflops(useful, ms_graph)


def add_ratios(
    row: dict[str, Any], useful_f: float, useful_fb: float, dense: dict[str, Any]
) -> None:
    """``row``'s fractions of dense SDPA's useful TFLOP/s in the same run. ``dense``: its stats,
    with :func:`add_rates`' rates. Back to back is set against dense SDPA's single call (one
    kernel: no host latency to hide); replayed (``--graphs``) against dense SDPA replayed."""
    row["fwd_vs_dense"] = row["fwd_tflops"] / dense["fwd_tflops"]
    fb = row["fwdbwd_tflops"]
    row["fwdbwd_vs_dense"] = fb / dense["fwdbwd_tflops"] if fb is not None else None
    for part, useful in (("fwd", useful_f), ("fwdbwd", useful_fb)):
        if row.get(f"{part}_ms_b2b"):
            rate = tflops(useful, row[f"{part}_ms_b2b"])
            row[f"{part}_vs_dense_b2b"] = rate / dense[f"{part}_tflops"]
        if row.get(f"{part}_tflops_graph") and dense.get(f"{part}_tflops_graph"):
            row[f"{part}_vs_dense_graph"] = (
                row[f"{part}_tflops_graph"] / dense[f"{part}_tflops_graph"]
            )


def time_and_memory(
    fwd: Callable[[], object],
    fwdbwd: Callable[[], object],
    unit: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    backward: bool = True,
    b2b_calls: int = 0,
    settle_s: float = 0.0,
    memory: MemoryManager | None = None,
) -> dict[str, Any]:
    """Median ms and peak memory of ``fwd`` (and ``fwdbwd``), relative to the tensors the call
    cannot avoid: ``(q, k, v, out)``, and their gradients with the backward. ``unit``: bytes of one
    ``[b, n, h, d]`` tensor. ``b2b_calls > 0`` also times that many calls issued back to back
    (``_ms_b2b``: the host prepares a call while the GPU runs the previous one, as a model issues
    its layers), where single calls also count the host's latency before the first kernel.
    ``settle_s > 0``: each timing starts after that many seconds of its own call back to back
    (:func:`experiments.ablate.settle`), so it runs at the clocks its own sustained load sets.
    ``memory``: the module's memory manager, emptied before the warm-up calls; what it keeps after
    them (``held_bytes``: pooled buffers and patterns, which a call's peak does not show) counts
    in the peaks, the forward's after the forward's warm-up alone. ``*_first_mem_vs_io``: the
    same of the first calls (a signature's first call checks FA4's swapped kernels, records
    replays and fills caches: step 70 found lse's first 2M forward+backward out of memory on an
    80 GB H100, where every later call fitted at 1.07x)."""

    def timed(fn: Callable[[], object], warmup: int, calls: int = 1) -> float:
        return median_ms(fn, device, warmup, repeats, calls, settle_s)

    def held() -> int:
        return memory.held_bytes() if memory is not None else 0

    if memory is not None:
        memory.clear()
    t0 = time.time()

    def first(
        fn: Callable[[], object],
    ) -> float:  # compile / autotune / warm caches outside the timing
        if device.type != "cuda":
            fn()
        return peak_extra_bytes(fn, device)  # (NaN off CUDA, where it does not call fn)

    fwd_first = first(fwd)
    held_fwd = held()
    # (what the forward left held counts in it, as in the later peaks)
    fb_first = first(fwdbwd) + held_fwd if backward else 0.0
    setup_s = time.time() - t0
    # q, k, v (and dout) exist before the call; the rest is what the call adds, and keeps
    fwd_extra = peak_extra_bytes(fwd, device) + held_fwd
    stats = {
        "fwd_ms": timed(fwd, warmup),
        "fwdbwd_ms": None,
        "fwd_mem_vs_io": (3 * unit + fwd_extra) / (4 * unit),
        "fwdbwd_mem_vs_io": None,
        "fwd_first_mem_vs_io": (3 * unit + fwd_first) / (4 * unit),
        "fwdbwd_first_mem_vs_io": None,
        "setup_s": setup_s,
    }
    if backward:
        fb_extra = peak_extra_bytes(fwdbwd, device) + held()
        stats["fwdbwd_ms"] = timed(fwdbwd, warmup)
        stats["fwdbwd_mem_vs_io"] = (4 * unit + fb_extra) / (8 * unit)
        stats["fwdbwd_first_mem_vs_io"] = (4 * unit + fb_first) / (8 * unit)
    if b2b_calls:
        stats["fwd_ms_b2b"] = timed(fwd, 0, b2b_calls)
        if backward:
            stats["fwdbwd_ms_b2b"] = timed(fwdbwd, 0, b2b_calls)
    return stats


# --- the variants ---------------------------------------------------------------------------------


def in_model(make: MakeModule, eager_first: bool = True) -> Make:
    """``make`` wrapped so its module runs inside ``torch.compile(fullgraph=True)``; with
    ``eager_first``, after one eager call per shape (else the trace registers the core's ops)."""

    def make_in_model(mixing: str, causal: bool) -> Attend:
        module = make(mixing, causal)
        compiled: Attend = torch.compile(module, fullgraph=True)
        registered: set[torch.Size] = set()

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if eager_first and q.shape not in registered:
                with torch.no_grad():
                    module(q, k, v)
                registered.add(q.shape)
            return compiled(q, k, v)

        fn.memory = module.memory  # type: ignore[attr-defined]  # (ablate.module_memory)
        return fn

    return make_in_model


def with_computer(
    make: MakeModule, **settings: str
) -> Callable[..., ringattn.DilatedAttention]:  # (peak_probe.module rebinds its def make to it)
    """``make`` whose modules' computer has ``settings`` (kernel choices of the A/B rows)."""

    def make_with(mixing: str, causal: bool) -> ringattn.DilatedAttention:
        module = make(mixing, causal)
        for name, value in settings.items():
            setattr(module.computer, name, value)
        return module

    return make_with


def _opens_a_frame(args: argparse.Namespace, strategy: ringattn.Strategy, mode: str) -> bool:
    """Whether ``DilatedAttention(compile=True, compile_mode=mode)`` of ``strategy`` compiles a
    frame of its own (the module's ``compiled_frame``)."""
    module = ringattn.DilatedAttention(
        args.lengths, args.rates, strategy=strategy, compile=True, compile_mode=mode
    )
    return module.compiled_frame


def variants(args: argparse.Namespace) -> list[tuple[str, Make]]:
    """``(name, make)`` where ``make(mixing, causal)`` returns ``fn(q, k, v) -> out``."""
    out: list[tuple[str, Make]] = []
    for strategy in ringattn.Strategy.single_device(memory=args.memory):
        if strategy.computer not in args.computers or strategy.dilation not in args.dilations:
            continue
        runs = [(False, "default")] if args.eager and strategy.computer != "flex" else []
        if args.compile:
            runs += [(True, mode) for mode in args.compile_modes]
        for compiled, mode in runs:
            name = f"{strategy.dilation}/{strategy.computer}"
            if compiled:
                name += " (compiled)" if mode == "default" else f" (compiled, {mode})"

            def make(
                mixing: str,
                causal: bool,
                strategy: ringattn.Strategy = strategy,
                compiled: bool = compiled,
                mode: str = mode,
            ) -> ringattn.DilatedAttention:
                return ringattn.DilatedAttention(
                    args.lengths,
                    args.rates,
                    causal=causal,
                    mixing=mixing,
                    strategy=strategy,
                    compile=compiled,
                    compile_mode=mode,
                )

            # (a block computer compiled in the default mode opens no frame of its own: that
            # row repeated the eager one; its compiled row is the enclosing torch.compile's)
            if not compiled or _opens_a_frame(args, strategy, mode):
                out.append((name, make))
            if compiled and mode == "default" and strategy.computer != "flex" and args.in_model:
                # how a compiled model runs it: the module inside a torch.compile frame (here a
                # frame around one layer, so its host time is not shared with anything else)
                out.append(
                    (f"{strategy.dilation}/{strategy.computer} (in torch.compile)", in_model(make))
                )
                if args.traced_first:  # a model compiled before any eager call
                    name = f"{strategy.dilation}/{strategy.computer} (traced first)"
                    out.append((name, in_model(make, eager_first=False)))
            flash_ab = args.flash_row and args.device.startswith("cuda")  # (a CPU has one kernel)
            if strategy.computer == "sdpa" and not compiled and flash_ab:
                # A/B: the same strategy on FlashAttention-2 instead of cuDNN
                out.append((name + " [flash]", with_computer(make, cuda_backend="flash")))
            if strategy.computer == "sdpa" and not compiled and args.torch_row and fa4.installed():
                # A/B where FlashAttention-4 is installed: both directions on torch's kernels,
                # and (--sdpa-forward's own A/B) the forward alone
                both = with_computer(make, cuda_backward="torch", cuda_forward="torch")
                out.append((name + " [torch kernels]", both))
                if SDPAComputer.cuda_forward != "torch":
                    forward = with_computer(make, cuda_forward="torch")
                    out.append((name + " [torch fwd]", forward))
    return out


_ORACLE: dict[OracleKey, list[torch.Tensor]] = {}


def check(
    make: Attend,
    mixing: str,
    causal: bool,
    args: argparse.Namespace,
    device: torch.device,
    backward: bool = True,
) -> float:
    """Largest relative error of output and gradients (``backward``; else of the output alone)
    against the float64 oracle.

    The oracle (a Python loop over heads and segments) runs once per problem.
    """
    n = args.check_n
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, n, args.heads, args.dim)
    q, k, v, dout = (
        torch.randn(shape, device=device, dtype=args.dtype, generator=gen) for _ in range(4)
    )
    # (the whole problem: main() called twice in one process, with another --check-n or
    # shape, compared the second run with the first's oracle)
    key = (mixing, causal, shape, args.dtype, args.lengths, args.rates, str(device))
    if key not in _ORACLE:
        refs = [x.double().requires_grad_() for x in (q, k, v)]
        ref = reference.dilated_attention(
            *refs,
            segment_lengths=args.lengths,
            dilation_rates=args.rates,
            causal=causal,
            mixing=mixing,
        )
        ref.backward(dout.double())
        # (the backward above set each x.grad, Tensor | None to mypy)
        _ORACLE[key] = [ref.detach()] + [x.grad for x in refs]  # type: ignore[misc]
    if not backward:
        with torch.no_grad():
            return rel_err(make(q, k, v), _ORACLE[key][0])
    mine = with_grads(make, q, k, v, dout)
    return worst(rel_err(x, r) for x, r in zip(mine, _ORACLE[key]))


def bench_case(
    n: int,
    mixing: str,
    causal: bool,
    args: argparse.Namespace,
    device: torch.device,
    dense_cache: dict[tuple[int, bool], dict[str, Any]],
    failures: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one (n, mixing, causal); a variant that raises has no row, and its message
    goes to ``failures`` (a list) where given."""
    b, h, d = args.batch, args.heads, args.dim
    q, k, v, dout = (torch.randn(b, n, h, d, device=device, dtype=args.dtype) for _ in range(4))
    unit = q.numel() * q.element_size()  # bytes of one [b, n, h, d] tensor
    rows: list[dict[str, Any]] = []

    def measure(
        name: str, fn: Attend, useful_f: float, useful_fb: float, error: float | None
    ) -> None:
        fwd, fwdbwd = fwd_and_fwdbwd(fn, q, k, v, dout)
        stats = time_and_memory(
            fwd,
            fwdbwd,
            unit,
            device,
            args.warmup,
            args.repeats,
            n < args.fwd_only_from,
            args.b2b_calls,
            args.settle,
            module_memory(fn),
        )
        if args.graphs:
            stats |= replayed(fn, q, k, v, dout, args, device, n < args.fwd_only_from)
        add_rates(stats, {"fwd": useful_f, "fwdbwd": useful_fb})
        rows.append(
            {
                "n": n,
                "mixing": mixing,
                "causal": causal,
                "variant": name,
                "oracle_err": error,
                # (NaN is a FAIL too)
                "check": "n/a" if error is None else _verdict(error, args.dtype),
                **stats,
            }
        )
        print("row", json.dumps(rows[-1]), flush=True)

    # the ceiling: dense SDPA, at min(n, dense_max_n) (its TFLOP/s does not depend on n)
    dense_n = min(n, args.dense_max_n)
    key = (dense_n, causal)
    if key not in dense_cache:
        qd, kd, vd = (x[:, :dense_n].transpose(1, 2) for x in (q, k, v))
        dd = dout[:, :dense_n].transpose(1, 2)

        def dense_fwd() -> None:
            with torch.no_grad():
                F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)

        def dense_fb() -> None:
            qg, kg, vg = (x.detach().requires_grad_() for x in (qd, kd, vd))
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(dd)

        # timed as the module's rows are (--settle)
        f_ms, fb_ms = (
            median_ms(fn, device, args.warmup, args.repeats, settle_s=args.settle)
            for fn in (dense_fwd, dense_fb)
        )
        flops = {
            "fwd": dense_flops(b, dense_n, h, d, causal),
            "fwdbwd": dense_flops(b, dense_n, h, d, causal, backward=True),
        }
        dense_cache[key] = {"fwd_ms": f_ms, "fwdbwd_ms": fb_ms}
        if args.graphs:

            def dense_bnhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)

            qf, kf, vf, df = (x[:, :dense_n] for x in (q, k, v, dout))
            dense_cache[key] |= replayed(dense_bnhd, qf, kf, vf, df, args, device, backward=True)
        add_rates(dense_cache[key], flops)
    dense = dense_cache[key]
    rows.append(
        {
            "n": n,
            "mixing": mixing,
            "causal": causal,
            "variant": "dense SDPA" + ("" if dense_n == n else f" (rate at n={dense_n})"),
            "oracle_err": None,
            "check": "n/a",
            "fwd_ms": None,
            "fwdbwd_ms": None,
        }
        # its times only where measured at this n (its rates hold at any n: the row's name
        # says where they were measured)
        | {name: value for name, value in dense.items() if dense_n == n or "_ms" not in name}
        | {
            "fwd_mem_vs_io": None,
            "fwdbwd_mem_vs_io": None,
            "fwd_first_mem_vs_io": None,
            "fwdbwd_first_mem_vs_io": None,
            "setup_s": 0.0,
        }
    )

    useful_f = useful_flops(b, n, h, d, args.lengths, args.rates, causal, mixing)
    useful_fb = useful_flops(b, n, h, d, args.lengths, args.rates, causal, mixing, backward=True)
    cases: list[tuple[str, Attend]] = []
    if mixing == "head_groups":
        cases.append(
            (
                "plain (gather/SDPA/scatter)",
                lambda q, k, v: plain_head_groups(q, k, v, args.lengths, args.rates, causal),
            )
        )
    for name, make in variants(args):
        cases.append((name, make(mixing, causal)))
    # (the check's gradients where this n is timed with a backward, so not where the timing is
    # forward only: flex has none on the CPU, and --fwd-only-from did not get its row past the
    # check)
    backward = n < args.fwd_only_from
    for name, fn in cases:
        try:
            error = check(fn, mixing, causal, args, device, backward) if args.check_n else None
            measure(name, fn, useful_f, useful_fb, error)
        except Exception as exc:  # one failing variant must not lose the run's other rows
            message = f"FAILED {name} n={n} {mixing} causal={causal}: {failure(exc, 400)}"
            print(message, flush=True)
            if failures is not None:
                failures.append(message)
        finally:
            torch._dynamo.reset()  # compiled variants of other shapes need not stay resident
    for row in rows:
        add_ratios(row, useful_f, useful_fb, dense)
    return rows


# --- output ---------------------------------------------------------------------------------------


def _positive(x: object) -> bool:
    return isinstance(x, float) and x > 0 and x != float("inf")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["mixing"], r["causal"]) for r in rows})
    names = list(dict.fromkeys(r["variant"].split(" (rate")[0] for r in rows))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per variant
    fig, axes = plt.subplots(len(groups), 3, figsize=(16, 4 * len(groups)), squeeze=False)
    for (mixing, causal), ax_row in zip(groups, axes):
        sel = [r for r in rows if r["mixing"] == mixing and r["causal"] == causal]
        for variant in dict.fromkeys(r["variant"].split(" (rate")[0] for r in sel):
            pts = sorted((r["n"], r) for r in sel if r["variant"].split(" (rate")[0] == variant)
            ns = [p[0] for p in pts]
            style = (
                {"ls": "--", "color": "k", "marker": "x"}  # (a marker: one n draws no line)
                if variant.startswith("dense")
                else {"marker": "o", "color": colors[variant]}
            )
            for ax, key in zip(ax_row, ("fwd_tflops", "fwdbwd_tflops", "fwdbwd_mem_vs_io")):
                xy = [(x, p[1][key]) for x, p in zip(ns, pts) if _positive(p[1][key])]
                if xy:
                    ax.plot(*zip(*xy), label=variant, **style)
        titles = (
            "forward TFLOP/s (useful)",
            "forward+backward TFLOP/s",
            "fwd+bwd peak / (q,k,v,out,grads)",
        )
        for ax, title in zip(ax_row, titles):
            if ax.lines:  # (no memory numbers off CUDA)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            ax.set_xlabel("sequence length n")
            ax.set_title(f"{title}\nmixing={mixing} causal={causal}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        memory = ax_row[2]
        if memory.lines:  # a ratio near 1: linear, with issue 5's bound for reference
            top = data_range(memory)[1]
            memory.set_yscale("linear")
            memory.axhline(1.2, ls=":", color="grey", label="bound 1.2")
            memory.set_ylim(0.9, max(1.3, 1.05 * top))
        ax_row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="where to run (default: cuda)")
    add_lengths(p, [32768, 131072])
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(ISSUE_LENGTHS),
        help="segment lengths (default: issue 5's, %(default)s)",
    )
    p.add_argument(
        "--rates",
        type=int,
        nargs="+",
        default=list(ISSUE_RATES),
        help="dilation rates, one per length (default: issue 5's, %(default)s)",
    )
    add_mixings(p, ["head_groups", "lse"])
    add_causality(p)
    add_heads(p)
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="batch size b of every row, the oracle check's and dense SDPA's too (default: 1, "
        "issue 5's)",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="inputs' dtype (default: bfloat16)",
    )
    p.add_argument(
        "--computers",
        nargs="+",
        default=["sdpa", "flex"],
        help="AttentionComputer registry names timed (default: sdpa flex)",
    )
    p.add_argument(
        "--dilations",
        nargs="+",
        default=["segment_local", "global"],
        help="DilationProcessor registry names timed (default: segment_local global)",
    )
    p.add_argument(
        "--memory", default="pooled", help="MemoryManager registry name (default: pooled)"
    )
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the compiled rows"
    )
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the eager rows")
    p.add_argument(
        "--compile-modes",
        nargs="+",
        default=["default"],
        choices=ringattn.api.COMPILE_MODES,
        help="torch.compile modes of the compiled rows (reduce-overhead: CUDA graphs, which copy "
        "each call's q, k, v into their pool: h200_perf.md step 63)",
    )
    p.add_argument(
        "--no-flash-row",
        dest="flash_row",
        action="store_false",
        help="skip the eager sdpa rows forced onto FlashAttention-2 (A/B against cuDNN)",
    )
    p.add_argument(
        "--sdpa-forward",
        choices=CUDA_FORWARDS,
        default=SDPAComputer.cuda_forward,
        help="SDPAComputer.cuda_forward of the sdpa rows (auto: FlashAttention-4 where installed)",
    )
    p.add_argument(
        "--no-torch-row",
        dest="torch_row",
        action="store_false",
        help="skip the eager sdpa rows that run on torch's kernels instead of FlashAttention-4's "
        "(A/B; only where flash-attn-4 is installed)",
    )
    p.add_argument(
        "--no-in-model",
        dest="in_model",
        action="store_false",
        help="skip the rows that run the compiled module inside a torch.compile frame",
    )
    p.add_argument(
        "--traced-first",
        action="store_true",
        help="also the module compiled before any eager call (its trace registers the core's ops)",
    )
    p.add_argument(
        "--dense-max-n",
        type=int,
        default=131072,
        help="dense SDPA, the baseline, runs at min(n, this) tokens: its TFLOP/s no longer "
        "depends on n there, and its time grows as n^2 (default: %(default)s)",
    )
    p.add_argument(
        "--fwd-only-from",
        type=int,
        default=1 << 62,
        help="from this n on, time the forward only (4M tokens: its backward does not fit)",
    )
    p.add_argument(
        "--check-n",
        type=int,
        default=None,
        help="oracle check length (0: skip; default: the largest --n, at most 32768)",
    )
    p.add_argument(
        "--b2b-calls",
        type=int,
        default=5,
        help="also time this many calls issued back to back (0: only single calls)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds of each call back to back before each of its timings, dense SDPA's too: "
        "every row timed at the clocks its own sustained load sets, not after whatever ran "
        "before it (0: the warm-up calls only)",
    )
    p.add_argument(
        "--graphs",
        action="store_true",
        help="also time every row, dense SDPA's too, replayed from CUDA graphs (torch.cuda.graph; "
        "make_graphed_callables for forward+backward), each replay held to an eager call: "
        "columns *_vs_dense_graph, against dense SDPA replayed in the same run (CUDA only)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row (default: 2)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed calls per row, median reported (default: 5)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "bench",
        help="folder for bench.md / .json and the plots (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.settle < 0:
        p.error(f"--settle must be >= 0 seconds, got {args.settle}")
    if args.check_n is None:  # (a CPU run at small n checks at its own n, not at 32K)
        args.check_n = min(max(args.n), 32768)
    if args.check_n < 0:
        p.error(f"--check-n must be >= 0, got {args.check_n}")
    require_positive(p, args, "n", "heads", "dim", "batch", "repeats", "dense_max_n")
    require_distinct(p, args, "n", "mixing", "computers", "dilations", "compile_modes")
    # (--b2b-calls -1 gave negative ratios; --warmup -1 ran as 0)
    for name in ("warmup", "b2b_calls"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    # (an unknown computer or dilation timed no strategy, silently; an unknown memory raised a
    # traceback from the registry)
    for flag, kind, names in (
        ("--computers", "computer", args.computers),
        ("--dilations", "dilation", args.dilations),
        ("--memory", "memory", [args.memory]),
    ):
        if unknown := [name for name in names if name not in ringattn.registry.names(kind)]:
            registered = ", ".join(ringattn.registry.names(kind))
            p.error(f"{flag}: unknown {kind} {', '.join(unknown)}; registered: {registered}")
    require_mixings(p, args.mixing)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        p.error(f"--device: {exc}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if args.graphs and device.type != "cuda":
        p.error("--graphs replays CUDA graphs: it needs --device cuda")
    args.lengths, args.rates = tuple(args.lengths), tuple(args.rates)
    args.dtype = getattr(torch, args.dtype)
    try:  # the library's own validation, as a one-line error
        ringattn.DilatedConfig(args.lengths, args.rates)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    if not variants(args):  # (it timed the baselines alone and exited 0)
        offs = {
            "--no-eager": args.eager,
            "--no-compile": args.compile,
            "--no-in-model": args.in_model,
        }
        flags = [flag for flag, on in offs.items() if not on]
        p.error(
            f"no strategy to time with --computers {' '.join(args.computers)} and "
            f"{' '.join(flags) or 'these flags'}: flex runs compiled only, and a block "
            "computer compiled in the default mode only inside torch.compile (--in-model)"
        )
    return args


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _verdict(error: float, dtype: torch.dtype) -> str:
    """``pass`` where ``error`` is within ``dtype``'s bound (ablate's, the suite's), else
    ``FAIL`` (NaN too)."""
    return "pass" if error <= TOLERANCE[dtype] else "FAIL"


def main(argv: list[str] | None = None) -> int:
    """The run; its exit status: 0, or 1 where a variant failed its oracle check or raised."""
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: --device cuda needs CUDA, not available here")
    try:  # before the timings (made after them, a bad --out lost the whole run's rows)
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"bench.py: error: --out: cannot make {str(args.out)!r}: {exc.strerror}"
        raise SystemExit(message) from None
    SDPAComputer.cuda_forward = args.sdpa_forward
    device = torch.device(args.device)
    causals = CAUSALITY[args.causal]
    rows: list[dict[str, Any]] = []
    dense_cache: dict[tuple[int, bool], dict[str, Any]] = {}
    failures: list[str] = []
    for n in args.n:
        for mixing in args.mixing:
            for causal in causals:
                rows += bench_case(n, mixing, causal, args, device, dense_cache, failures)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        # placed blocks written in place (SDPAComputer.in_place) need NVIDIA's cuDNN frontend
        "cudnn_frontend": getattr(cudnn_graphs.cudnn, "__version__", None),
        # sdpa's backward through FlashAttention-4 (SDPAComputer.cuda_backward) needs flash-attn-4
        "flash_attn_4": _version("flash-attn-4") if fa4.installed() else None,
        "sdpa_backward": SDPAComputer.cuda_backward,
        "sdpa_forward": SDPAComputer.cuda_forward,
        "settle_s": args.settle,
        "graphs": args.graphs,
        "command": "python -m experiments.bench "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": {"b": args.batch, "h": args.heads, "d": args.dim, "dtype": str(args.dtype)},
        "configs": {"segment_lengths": args.lengths, "dilation_rates": args.rates},
    }
    report = {"meta": meta, "rows": rows, "failed": failures}
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    columns = [
        "n",
        "mixing",
        "causal",
        "variant",
        "oracle_err",
        "check",
        "fwd_ms",
        "fwd_tflops",
        "fwd_vs_dense",
        "fwdbwd_ms",
        "fwdbwd_tflops",
        "fwdbwd_vs_dense",
        "fwd_vs_dense_b2b",
        "fwdbwd_vs_dense_b2b",
        *(["fwd_vs_dense_graph", "fwdbwd_vs_dense_graph"] if args.graphs else []),
        "fwd_mem_vs_io",
        "fwdbwd_mem_vs_io",
        "fwd_first_mem_vs_io",
        "fwdbwd_first_mem_vs_io",
    ]
    table = dict_rows_to_markdown(rows, columns)
    (args.out / "bench.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    plot(rows, args.out / "bench.png")
    print(table)
    wrong = [row for row in rows if row["check"] == "FAIL"]
    for row in wrong:
        print(
            f"FAIL (oracle_err {row['oracle_err']:.3g} above {TOLERANCE[args.dtype]:g}): "
            f"{row['variant']} n={row['n']} {row['mixing']} causal={row['causal']}"
        )
    for message in failures:
        print(message)
    return 1 if wrong or failures else 0


if __name__ == "__main__":
    sys.exit(main())
