"""Sequence-parallel check + benchmark, launched with torchrun (NCCL on GPUs, gloo on CPUs):

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 -m experiments.distributed_bench

1. Correctness: every (communicator × dilation × computer) combination, causal or not, both
   mixings, outputs and gradients of the sharded run against the float64 oracle of the full
   sequence (computed on every rank); ``ok``: both within ``ringattn.reference.TOLERANCE``
   for the dtype (gradients relative to max(‖ref‖, 0.1·‖grad_out‖)).
2. Speed (``--part speed``): ring vs all_gather, both shard layouts: forward and
   forward+backward time, peak memory per GPU and bytes sent per rank.
3. Weak scaling (``--part weak``, issue 5): per-GPU useful TFLOP/s of issue 5's dilated shape at
   ``p·N`` tokens on ``p`` GPUs over one GPU alone at ``N`` (rank 0, same run), for each
   ``--weak-n``; the largest segments span ranks at the smaller N. ``--graphs`` also times
   every row replayed from CUDA graphs (NCCL's exchanges captured), where host time is gone.
4. Dense causal vs PyTorch's context parallel (``--part cp``, issue 5): one config ``w = n, r = 1``,
   ring / all_gather with ``layout="zigzag"`` (and ring contiguous) against
   ``torch.distributed.tensor.experimental.context_parallel`` (the same head-tail sharding) with
   each rotate method, side by side; ``agrees``: each output within twice the dtype's bound
   of ringattn's ring zigzag output (``rel_diff_vs_ring_zigzag``), shard for shard.
``--part`` takes several (``--part check cp weak``: one launch, one rendezvous);
rank 0 writes ``distributed_<parts joined by _>.md`` / ``.json`` under ``--out`` and prints the
tables. The exit status is 1 where a row of the check part failed or a ``cp`` output
disagrees, else 0.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import ringattn
from experiments import CAUSALITY, ISSUE_LENGTHS, ISSUE_RATES, make_out, require_torchrun
from experiments.ablate import dict_rows_to_markdown, rel_err
from experiments.bench import failure, fwd_and_fwdbwd, graphed_calls
from ringattn import distributed, lanes, launches, reference
from ringattn.config import MIXINGS
from ringattn.flops import tflops, useful_flops
from ringattn.kernels import fa4

# batch, heads, head dim of the timed parts (issue 5's; --heads/--head-dim shrink them for a CPU
# trial of the script)
BHD = [1, 16, 128]


def log(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def max_over_ranks(values: Tensor) -> Tensor:
    """Elementwise max of a 1-D float tensor over the ranks, a NaN on any rank kept: the MAX
    all-reduce drops a NaN against a number (gloo kept rank 0's alone), so a check whose error
    was NaN on another rank passed there."""
    nan = values.isnan()
    both = torch.cat([values.masked_fill(nan, -math.inf), nan.to(values.dtype)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[: len(values)].masked_fill(both[len(values) :] > 0, math.nan)


# per layout: shard-local, local, spans all ranks (zigzag: local segments fit a chunk n/(2p))
CHECK_CONFIGS = {
    "contiguous": ((64, 256, -1), (1, 2, 4)),
    "zigzag": ((64, 128, -1), (1, 2, 4)),
}


def correctness(device: torch.device) -> list[dict[str, Any]]:
    p = dist.get_world_size()
    b, n, d = 2, 256 * p, 64
    rows = []
    # 5 heads: offsets with unequal heads; then 8 heads under lse, where the spanning r = 4
    # config's offsets go as runs (ringattn.launches), its exchanges included
    cases = [
        (*case, 5, ("sdpa", "math"))
        for case in itertools.product(
            CHECK_CONFIGS, (torch.float32, torch.bfloat16), (False, True), ("lse", "head_groups")
        )
    ] + [
        (*case, "lse", 8, ("sdpa",))
        for case in itertools.product(CHECK_CONFIGS, (torch.float32, torch.bfloat16), (False, True))
    ]
    for layout, dtype, causal, mixing, h, computers in cases:
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in range(4)]
        lengths, rates = CHECK_CONFIGS[layout]
        lengths_n = tuple(n if w < 0 else w for w in lengths)
        q, k, v, grad = (x.to(dtype).to(device) for x in full)
        opts: dict[str, Any] = dict(
            segment_lengths=lengths_n, dilation_rates=rates, causal=causal, mixing=mixing
        )
        ref_in = [x.double().requires_grad_() for x in (q, k, v)]
        ref = reference.dilated_attention(*ref_in, **opts)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.double())

        def shard(x: Tensor, layout: str = layout) -> Tensor:
            return distributed.shard(x, layout=layout)

        strategies = itertools.product(
            ("ring", "all_gather"), ("segment_local", "global"), computers
        )
        for communicator, dilation, computer in strategies:
            strategy = ringattn.Strategy(
                dilation=dilation, computer=computer, communicator=communicator
            )
            module = ringattn.DilatedAttention(
                lengths_n,
                rates,
                causal=causal,
                mixing=mixing,
                strategy=strategy,
                compile=False,
                layout=layout,
            )
            xs = [shard(x).requires_grad_() for x in (q, k, v)]
            out = module(*xs)
            grads = torch.autograd.grad(out, xs, shard(grad))
            floor = 0.1 * float(shard(grad).double().norm())
            errs = [rel_err(out, shard(ref))] + [
                rel_err(g, shard(r), floor) for g, r in zip(grads, ref_grads)
            ]
            worst = max_over_ranks(torch.tensor(errs, device=device))
            rows.append(
                {
                    "strategy": strategy.label,
                    "layout": layout,
                    "dtype": str(dtype)[6:],
                    "causal": causal,
                    "mixing": mixing,
                    "heads": h,
                    "out_err": float(worst[0]),
                    "grad_err": float(worst[1:].max()),
                    "ok": within_bounds(worst, dtype),
                }
            )
    return rows


# timed calls per measurement (--repeats)
REPEATS = [5]


def bench_ms(
    fn: Callable[[], object], device: torch.device, warmup: int = 2, sync: bool = True
) -> float:
    """Median ms of single calls, each started on an idle GPU (and, ``sync``, after a barrier):
    a host-bound call measures its host time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(REPEATS[0]):
        if sync:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def steady_ms(fn: Callable[[], object], device: torch.device, sync: bool = True) -> float:
    """ms per call of ``--repeats`` calls issued back to back (as layers and steps issue them):
    the host issues the next call while the GPU runs this one, so this is max(host, GPU)."""
    if sync:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS[0]):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / REPEATS[0]


def speed(
    device: torch.device, n: int, causal: bool, layouts: tuple[str, ...] = ("contiguous",)
) -> list[dict[str, Any]]:
    p = dist.get_world_size()
    b, h, d = BHD
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths, rates = (2048, 8192, n), (1, 2, 4)  # the last config spans every rank
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    m = n // p
    q, k, v, grad = (
        torch.randn(b, m, h, d, device=device, dtype=dtype, generator=gen) for _ in range(4)
    )
    flops_f = useful_flops(b, n, h, d, lengths, rates, causal, "lse") / p
    flops_fb = useful_flops(b, n, h, d, lengths, rates, causal, "lse", backward=True) / p
    rows: list[dict[str, Any]] = []
    for communicator, layout in itertools.product(("ring", "all_gather"), layouts):
        module = ringattn.DilatedAttention(
            lengths,
            rates,
            causal=causal,
            compile=False,
            strategy=ringattn.Strategy(communicator=communicator, computer="sdpa"),
            layout=layout,
        )

        try:
            f_ms, fb_ms, peak = timed(module, q, k, v, grad, device)
        except ValueError as exc:  # a layout that cannot shard this config (every rank agrees)
            rows.append({"n": n, "causal": causal, "communicator": communicator})
            rows[-1].update(layout=layout, error=str(exc))
            log("speed", rows[-1])
            continue
        module.communicator.bytes_sent = 0
        with torch.no_grad():
            module(q, k, v)  # one forward: what this rank sends for it
        row = {
            "n": n,
            "ranks": p,
            "causal": causal,
            "communicator": communicator,
            "layout": layout,
            **throughput(f_ms, fb_ms, flops_f, flops_fb),
            "peak_extra_gib": peak,
            "fwd_MiB_sent_per_rank": module.communicator.bytes_sent / 2**20,
        }
        rows.append(row)
        log("speed", row)
    return rows


def throughput(f_ms: float, fb_ms: float, flops_f: float, flops_fb: float) -> dict[str, float]:
    """Times and useful TFLOP/s per GPU (``flops_*``: this GPU's share of the useful FLOPs)."""
    return {
        "fwd_ms": f_ms,
        "fwdbwd_ms": fb_ms,
        "fwd_tflops_per_gpu": tflops(flops_f, f_ms),
        "fwdbwd_tflops_per_gpu": tflops(flops_fb, fb_ms),
    }


def timed(
    fn: Callable[..., Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad: Tensor,
    device: torch.device,
    collective: bool = True,
) -> tuple[float, float, float]:
    """Forward ms, forward+backward ms (median of ``--repeats``) and peak GiB above what was
    allocated before of ``fn(q, k, v)``; ``collective``: the slowest rank's times and the largest
    peak. The back-to-back times (``steady_ms``) of the last call go to ``LAST_STEADY``."""

    fwd, fb = fwd_and_fwdbwd(fn, q, k, v, grad)
    fwd()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    f_ms = bench_ms(fwd, device, sync=collective)
    fb_ms = bench_ms(fb, device, sync=collective)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")
    f_b2b, fb_b2b = steady_ms(fwd, device, sync=collective), steady_ms(fb, device, sync=collective)
    if not collective:
        LAST_STEADY[:] = [f_b2b, fb_b2b]
        return f_ms, fb_ms, peak
    stats = max_over_ranks(torch.tensor([f_ms, fb_ms, peak, f_b2b, fb_b2b], device=device))
    LAST_STEADY[:] = [float(stats[3]), float(stats[4])]
    return float(stats[0]), float(stats[1]), float(stats[2])


LAST_STEADY = [float("nan"), float("nan")]

# --profile DIR: weak() writes torch.profiler tables of rank 0's forward calls there
PROFILE: list[Path] = []


def profile_forward(
    fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, name: str, collective: bool = True
) -> None:
    """``--repeats`` forward calls back to back; rank 0 records them: CPU and CUDA time per op,
    and a Chrome trace (the timeline shows what a call waits for). ``collective``: every rank
    makes the calls (they exchange), else rank 0 alone."""
    if not PROFILE or (not collective and dist.get_rank() != 0):
        return
    from torch.profiler import ProfilerActivity, profile

    def calls() -> None:
        with torch.no_grad():
            for _ in range(REPEATS[0]):
                fn(q, k, v)
        torch.cuda.synchronize()

    if dist.get_rank() != 0:
        calls()
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        calls()
    averages = prof.key_averages()
    text = [f"# {name}: {REPEATS[0]} forward calls back to back (rank 0)", ""]
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        text += [f"## by {key}", averages.table(sort_by=key, row_limit=25), ""]
    PROFILE[0].mkdir(parents=True, exist_ok=True)
    (PROFILE[0] / f"profile_{name}.txt").write_text("\n".join(text))
    prof.export_chrome_trace(str(PROFILE[0] / f"trace_{name}.json"))


# --graphs: weak() also times each row's calls replayed from CUDA graphs (CUDA only), these
GRAPHS = [False]
GRAPH_TIMES = ("graph_fwd_ms", "graph_fwd_ms_b2b", "graph_fwdbwd_ms", "graph_fwdbwd_ms_b2b")
# each replay's relative error against the eager call (the largest over ranks)
GRAPH_ERRORS = ("graph_fwd_err", "graph_fwdbwd_err")


def graph_times(
    fn: Callable[..., Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad: Tensor,
    device: torch.device,
    collective: bool = True,
) -> dict[str, Any]:
    """``fn``'s forward and forward+backward replayed from CUDA graphs
    (``experiments.bench.graphed_calls``), NCCL's exchanges captured with the kernels: the time a
    call takes once the host's launches and Python work are gone (as in a model captured whole).
    Single replays (median) and back to back, slowest rank; a capture that fails gives its error
    instead (every rank fails alike: the ranks run the same code on the same shapes). Also each
    replay's relative error against the eager call (``GRAPH_ERRORS``, the largest over ranks): the
    captured exchanges and streams compute what the eager call does."""
    result: dict[str, Any] = {}
    calls = graphed_calls(fn, q, k, v, grad, warmup=3)
    for part in ("fwd", "fwdbwd"):
        call, key = calls[part], f"graph_{part}_ms"
        if f"{part}_err" in calls:  # the replay's result against the eager call's
            result[f"graph_{part}_err"] = calls[f"{part}_err"]
        try:
            if not callable(call):
                result[key] = call
                continue
            result[key] = bench_ms(call, device, sync=collective)
            result[f"{key}_b2b"] = steady_ms(call, device, sync=collective)
        except Exception as exc:  # report, keep the run's other rows
            result[key] = failure(exc)
    # NCCL's teardown waits until every graph that captured its exchanges is destroyed
    # (pytorch/pytorch#115388: destroy_process_group hangs); make_graphed_callables' graphs sit
    # in reference cycles, so only the collector frees them
    del calls, call
    gc.collect()
    torch.cuda.synchronize()
    if collective:  # the slowest rank's, as timed() reports (-1: this rank has no time)
        keys = (*GRAPH_TIMES, *GRAPH_ERRORS)
        times = [result.get(key) for key in keys]
        stats = [t if isinstance(t, float) else -1.0 for t in times]
        stats = max_over_ranks(torch.tensor(stats, device=device)).tolist()
        result.update((key, t) for key, t in zip(keys, stats, strict=True) if not t < 0)
    return result


ISSUE5_CONFIG = (ISSUE_LENGTHS, ISSUE_RATES)


def weak(device: torch.device, n_per_gpu: int, causal: bool, mixing: str) -> list[dict[str, Any]]:
    """Per-GPU useful TFLOP/s at p·N on p GPUs (ring, contiguous) over 1 GPU at N (local)."""
    p, rank = dist.get_world_size(), dist.get_rank()
    b, h, d = BHD
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths, rates = ISSUE5_CONFIG
    gen = torch.Generator(device=device).manual_seed(rank)
    q, k, v, grad = (
        torch.randn(b, n_per_gpu, h, d, device=device, dtype=dtype, generator=gen) for _ in range(4)
    )
    opts: dict[str, Any] = dict(causal=causal, mixing=mixing, compile=False)
    rows: list[dict[str, Any]] = []
    work = []  # each row's useful FLOPs per GPU, forward and forward+backward
    for gpus, communicator in ((1, "local"), (p, "ring"), (p, "all_gather")):
        n = n_per_gpu * gpus
        flops_f = useful_flops(b, n, h, d, lengths, rates, causal, mixing) / gpus
        flops_fb = useful_flops(b, n, h, d, lengths, rates, causal, mixing, backward=True) / gpus
        work.append({"fwd": flops_f, "fwdbwd": flops_fb})
        graphs: dict[str, Any] = {}
        if gpus == 1:  # one GPU alone at N: rank 0 measures, the others wait
            f_ms = fb_ms = peak = float("nan")
            LAST_STEADY[:] = [float("nan")] * 2
            if rank == 0:
                module = ringattn.DilatedAttention(lengths, rates, **opts)
                f_ms, fb_ms, peak = timed(module, q, k, v, grad, device, collective=False)
                name = f"weak_{n_per_gpu}_{mixing}_{causal}_local"
                profile_forward(module, q, k, v, name, collective=False)
                if GRAPHS[0]:
                    graphs = graph_times(module, q, k, v, grad, device, collective=False)
            dist.barrier()
        else:
            strategy = ringattn.Strategy(communicator=communicator, computer="sdpa")
            module = ringattn.DilatedAttention(lengths, rates, strategy=strategy, **opts)
            f_ms, fb_ms, peak = timed(module, q, k, v, grad, device)
            saved = list(LAST_STEADY)
            profile_forward(module, q, k, v, f"weak_{n_per_gpu}_{mixing}_{causal}_{communicator}")
            LAST_STEADY[:] = saved
            graphs = graph_times(module, q, k, v, grad, device) if GRAPHS[0] else {}
        row: dict[str, Any] = {
            "n_per_gpu": n_per_gpu,
            "gpus": gpus,
            "n": n,
            "causal": causal,
            "mixing": mixing,
            "communicator": communicator,
            **throughput(f_ms, fb_ms, flops_f, flops_fb),
            "fwd_ms_b2b": LAST_STEADY[0],
            "fwdbwd_ms_b2b": LAST_STEADY[1],
            "peak_extra_gib": peak,
            **graphs,
        }
        rows.append(row)
    if rank == 0:  # the baseline's numbers exist on rank 0 only
        base = rows[0]
        for row, flops in zip(rows, work, strict=True):
            # per-GPU useful TFLOP/s over the baseline's. A time ratio alone is that only where
            # the per-GPU work at p·N equals N's; where issue 5's longest segments exceed N it
            # does not (16K per GPU: 1.6% more at p·N, 1K: twice), so the time ratios (b2b,
            # graphs) are scaled by the work ratio, as the TFLOP/s of the single calls are
            ratio = {part: flops[part] / work[0][part] for part in ("fwd", "fwdbwd")}
            row["fwd_efficiency"] = row["fwd_tflops_per_gpu"] / base["fwd_tflops_per_gpu"]
            row["fwdbwd_efficiency"] = row["fwdbwd_tflops_per_gpu"] / base["fwdbwd_tflops_per_gpu"]
            for part in ("fwd", "fwdbwd"):
                key = f"{part}_ms_b2b"
                row[f"{part}_efficiency_b2b"] = ratio[part] * base[key] / row[key]
            for key in GRAPH_TIMES:  # graph_{fwd,fwdbwd}_ms[_b2b]
                if isinstance(base.get(key), float) and isinstance(row.get(key), float):
                    part = key.split("_")[1]
                    row[key.replace("_ms", "_efficiency")] = ratio[part] * base[key] / row[key]
            log("weak", row)
    return rows


def cp_compare(device: torch.device, n: int) -> list[dict[str, Any]]:
    """Dense causal (w = n, r = 1): ringattn's sequence parallelism vs PyTorch's context parallel.

    Both see the same full problem (same seed on every rank). PyTorch's context manager shards
    its buffers head-tail, which is ``layout="zigzag"``, so the two outputs are compared shard for
    shard before timing. PyTorch is timed inside one ``context_parallel`` block (its sharding and
    restoring copies are not timed); memory is the peak above what was allocated before timing.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import _attention as cp_attention
    from torch.distributed.tensor.experimental import context_parallel

    p = dist.get_world_size()
    b, h, d = BHD
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flops_f = useful_flops(b, n, h, d, (n,), (1,), True, "lse") / p
    flops_fb = useful_flops(b, n, h, d, (n,), (1,), True, "lse", backward=True) / p
    gen = torch.Generator(device=device).manual_seed(0)  # the same full problem on every rank
    full = [torch.randn(b, n, h, d, device=device, dtype=dtype, generator=gen) for _ in range(4)]
    rows: list[dict[str, Any]] = []
    outputs: dict[str, Tensor] = {}

    def record(
        name: str,
        fn: Callable[..., Tensor],
        inputs: list[Tensor],
        to_bnhd: Callable[[Tensor], Tensor] = lambda out: out,
    ) -> None:
        row: dict[str, Any] = {"n": n, "ranks": p, "impl": name}
        try:
            with torch.no_grad():
                outputs[name] = to_bnhd(fn(*inputs[:3])).float()
            q, k, v, grad = inputs
            f_ms, fb_ms, peak = timed(fn, q, k, v, grad, device)
            row.update(throughput(f_ms, fb_ms, flops_f, flops_fb), peak_extra_gib=peak)
        except Exception as exc:  # recorded in the table, the run goes on
            row["error"] = failure(exc, 200)
        rows.append(row)
        log("cp", row)

    ours = [("ring", "zigzag", "auto"), ("all_gather", "zigzag", "auto")]
    if fa4.installed():  # A/B: on torch's kernels, as PyTorch's own runs
        ours.append(("ring", "zigzag", "torch"))
    for communicator, layout, backward in (*ours, ("ring", "contiguous", "auto")):
        strategy = ringattn.Strategy(communicator=communicator, computer="sdpa")
        module = ringattn.DilatedAttention(
            (n,), (1,), causal=True, compile=False, strategy=strategy, layout=layout
        )
        module.computer.cuda_backward = backward
        module.computer.cuda_forward = "auto" if backward == "auto" else "torch"
        shards = [distributed.shard(x, layout=layout) for x in full]
        suffix = " [torch kernels]" if backward == "torch" else ""
        record(f"ringattn {communicator} {layout}{suffix}", module, shards)
        del shards
    mesh = init_device_mesh(device.type, (p,))

    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    for rotate in ("allgather", "alltoall"):
        name = f"torch context_parallel {rotate}"
        cp_attention.set_rotate_method(rotate)
        buffers = [x.transpose(1, 2).contiguous() for x in full]  # [b, h, n, d]
        try:
            # sharded in place (head-tail) on entry, restored on exit
            with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
                record(name, sdpa, buffers, lambda out: out.transpose(1, 2))
        except Exception as exc:  # recorded in the table, the run goes on
            rows.append({"n": n, "ranks": p, "impl": name, "error": f"{type(exc).__name__}: {exc}"})
        del buffers
    compare_outputs(rows, outputs, dtype, device)
    return rows


def compare_outputs(
    rows: list[dict[str, Any]], outputs: dict[str, Tensor], dtype: torch.dtype, device: torch.device
) -> None:
    """Each cp row's ``rel_diff_vs_ring_zigzag`` (its output against ringattn's ring zigzag
    output, largest over ranks) and ``agrees``: within twice the dtype's bound (each within the
    bound of the exact output). A ringattn row that failed, or any when the ring zigzag row did,
    does not agree (they passed, nothing compared)."""
    first = outputs.get("ringattn ring zigzag")
    for row in rows:
        out = outputs.get(row["impl"])
        if row["impl"].startswith("ringattn") and (first is None or "error" in row):
            row["agrees"] = False
        if first is not None and out is not None and "contiguous" not in row["impl"]:
            err = torch.tensor([float((out - first).norm() / first.norm())], device=device)
            row["rel_diff_vs_ring_zigzag"] = float(max_over_ranks(err)[0])
            row["agrees"] = row["rel_diff_vs_ring_zigzag"] <= 2 * reference.TOLERANCE[dtype]


def within_bounds(errors: Tensor, dtype: torch.dtype) -> bool:
    """Whether every error (output, gradients; NaN fails) is within the dtype's bound of the
    tests (gradients were allowed 10x here: 0.2 in bf16)."""
    return bool(errors.max() <= reference.TOLERANCE[dtype])


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    return [title, "", dict_rows_to_markdown(rows, columns), ""] if rows else []


def write_report(
    out: Path,
    label: str,
    check: list[dict[str, Any]],
    speed_rows: list[dict[str, Any]],
    weak_rows: list[dict[str, Any]],
    cp_rows: list[dict[str, Any]],
) -> None:
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "CPU"
    p = dist.get_world_size()
    dtype_name = "bf16" if cuda else "float32"
    text = [f"# Sequence parallelism on {p} × {name}, torch {torch.__version__}", ""]
    text += table(
        f"## Speed: {dtype_name}, b, h, d = {tuple(BHD)}, segment_lengths=(2048, 8192, n), "
        "dilation_rates=(1, 2, 4), mixing=lse, computer=sdpa, eager. Times: slowest rank, "
        f"median of {REPEATS[0]}. Bytes: this rank's sends in one forward.",
        speed_rows,
        [
            "n",
            "causal",
            "communicator",
            "layout",
            "fwd_ms",
            "fwdbwd_ms",
            "fwd_tflops_per_gpu",
            "fwdbwd_tflops_per_gpu",
            "peak_extra_gib",
            "fwd_MiB_sent_per_rank",
            "error",  # (a row that failed was blank cells, its reason in the console alone)
        ],
    )
    text += table(
        f"## Weak scaling (issue 5): {dtype_name}, b, h, d = {tuple(BHD)}, "
        f"segment_lengths={ISSUE5_CONFIG[0]}, "
        f"dilation_rates={ISSUE5_CONFIG[1]}; {p} GPUs at p·N vs 1 GPU at N (same run). "
        "Efficiency: per-GPU useful TFLOP/s over the 1-GPU row's (target >= 0.90). "
        "Times: slowest rank; `_ms` median of single calls each started on an idle GPU "
        "(a host-bound call measures its host time), `_b2b` per call of calls issued back "
        "to back (the host runs ahead of the GPU, as in a model).",
        weak_rows,
        [
            "n_per_gpu",
            "gpus",
            "n",
            "causal",
            "mixing",
            "communicator",
            "offset_runs",
            "spanning_lanes",
            "fwd_ms",
            "fwdbwd_ms",
            "fwd_tflops_per_gpu",
            "fwdbwd_tflops_per_gpu",
            "fwd_efficiency",
            "fwdbwd_efficiency",
            "fwd_ms_b2b",
            "fwdbwd_ms_b2b",
            "fwd_efficiency_b2b",
            "fwdbwd_efficiency_b2b",
            "peak_extra_gib",
            *(
                [
                    "graph_fwd_ms",
                    "graph_fwd_efficiency",
                    "graph_fwd_efficiency_b2b",
                    "graph_fwdbwd_ms",
                    "graph_fwdbwd_efficiency",
                    "graph_fwdbwd_efficiency_b2b",
                    *GRAPH_ERRORS,
                ]
                if any("graph_fwd_ms" in row for row in weak_rows)
                else []
            ),
        ],
    )
    text += table(
        f"## Dense causal attention (w = n, r = 1), {dtype_name}, b, h, d = {tuple(BHD)}: "
        "ringattn vs "
        "PyTorch's context parallel (same head-tail shards; rel_diff: outputs vs ringattn "
        "ring zigzag)",
        cp_rows,
        [
            "n",
            "impl",
            "fwd_ms",
            "fwdbwd_ms",
            "fwd_tflops_per_gpu",
            "fwdbwd_tflops_per_gpu",
            "peak_extra_gib",
            "rel_diff_vs_ring_zigzag",
            "agrees",
            "error",
        ],
    )
    if check:
        ok = sum(r["ok"] for r in check)
        text += table(
            f"## Correctness vs the float64 oracle: {ok}/{len(check)} ok",
            check,
            [
                "strategy",
                "layout",
                "dtype",
                "causal",
                "mixing",
                "heads",
                "out_err",
                "grad_err",
                "ok",
            ],
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distributed_{label}.md").write_text("\n".join(text))
    results = {"speed": speed_rows, "weak": weak_rows, "cp": cp_rows, "check": check}
    (out / f"distributed_{label}.json").write_text(json.dumps(results, indent=1))


def size_error(parts: set[str], args: argparse.Namespace, p: int) -> str | None:
    """Why a length of a part that runs cannot be sharded over ``p`` ranks (the library's own
    checks, before any part runs), or None. Speed's zigzag rows that cannot shard stay error rows
    of its table."""
    for n in args.seq_lens if "speed" in parts else ():
        if n % p:  # (its ranks held n // p rows each: fewer tokens than the row said)
            return f"--seq-lens: {n} must be divisible by the {p} ranks"
        try:  # the n-long config's rate must divide it
            ringattn.DilatedConfig((2048, 8192, n), (1, 2, 4))
        except ValueError as exc:
            return f"--seq-lens {n}: {exc}"
    for n in args.weak_n if "weak" in parts else ():
        try:
            distributed.spans_for(tuple(zip(*ISSUE5_CONFIG)), n, p)
        except ValueError as exc:
            return f"--weak-n {n} on {p} ranks: {exc}"
    for n in args.cp_n if "cp" in parts else ():
        if n % (2 * p):
            return f"--cp-n: {n} must be divisible by 2p = {2 * p} (layout zigzag)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 1 where a row of the check part failed (its verdict was in the table
    alone: a failed check exited 0, like a passed one, so no script or CI job could tell)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="launch: NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=P -m "
        "experiments.distributed_bench [options] (CPUs: gloo; GPUs: NCCL, one per process)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/distributed"),
        help="where rank 0 writes distributed_<parts>.md / .json (default: %(default)s)",
    )
    parser.add_argument(
        "--part",
        nargs="+",
        choices=["check", "speed", "weak", "cp", "all"],
        default=["all"],
        help="check: every strategy's sharded outputs and gradients against the float64 oracle; "
        "speed: ring vs all_gather per layout; weak: issue 5's weak scaling; cp: dense causal "
        "against PyTorch's context parallel (several in one launch; default: all)",
    )
    parser.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=[65536, 262144],
        help="speed: total tokens (all ranks) per row (default: %(default)s)",
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["contiguous", "zigzag"],
        help=f"speed: shard layouts, among {distributed.LAYOUTS} (default: %(default)s)",
    )
    parser.add_argument(
        "--weak-n",
        type=int,
        nargs="+",
        default=[16384, 65536, 262144],
        help="weak: tokens per GPU, N (P GPUs at P*N against one at N; default: %(default)s)",
    )
    parser.add_argument(
        "--cp-n",
        type=int,
        nargs="+",
        default=[131072, 262144, 524288],
        help="cp: total tokens of the dense causal rows (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=REPEATS[0], help="timed calls per number (median)"
    )
    parser.add_argument("--profile", type=Path, help="weak: write profiler tables here (CUDA)")
    parser.add_argument(
        "--causal",
        choices=["yes", "no", "both"],
        default="both",
        help="weak: causal rows, non-causal rows or both (default: %(default)s)",
    )
    parser.add_argument(
        "--mixing",
        nargs="+",
        default=list(MIXINGS),
        help=f"weak: mixings, among {MIXINGS} (default: all)",
    )
    parser.add_argument(
        "--offset-runs",
        nargs="+",
        choices=["yes", "no"],
        default=["yes"],
        help="weak: lse launches (and exchanges) a config's offsets as runs, "
        "ringattn.launches.FUSE_OFFSETS (the A/B: yes no)",
    )
    parser.add_argument(
        "--spanning-lanes",
        nargs="+",
        choices=["yes", "no"],
        default=["yes" if lanes.SPANNING else "no"],
        help="weak: blocks whose segments span ranks on concurrent streams too wherever lanes "
        "are on (under graph capture, so with --graphs), ringattn.lanes.SPANNING (the A/B: no yes)",
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="weak: also time each row replayed from CUDA graphs (CUDA; NCCL's exchanges "
        "captured with the kernels)",
    )
    parser.add_argument(
        "--heads",
        type=int,
        default=BHD[1],
        help="heads h of the timed parts' rows (the check's are its own; default: %(default)s)",
    )
    parser.add_argument(
        "--head-dim",
        type=int,
        default=BHD[2],
        help="head dim d of the timed parts' rows (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if len(set(args.part)) < len(args.part) or ("all" in args.part and len(args.part) > 1):
        # (ran as every part, once each, but wrote distributed_all_check.md / check_check.md)
        parser.error(f"--part: each part once, and 'all' alone; got {' '.join(args.part)}")
    if min(args.repeats, args.heads, args.head_dim) < 1:
        parser.error("--repeats, --heads and --head-dim must be >= 1")
    if min([*args.seq_lens, *args.weak_n, *args.cp_n]) < 1:
        parser.error("--seq-lens, --weak-n and --cp-n must be >= 1")
    if bad := sorted(set(args.layouts) - set(distributed.LAYOUTS)):
        parser.error(f"--layouts must be among {distributed.LAYOUTS}, got {bad}")
    if bad := sorted(set(args.mixing) - set(MIXINGS)):
        parser.error(f"--mixing must be among {MIXINGS}, got {bad}")
    BHD[1:] = [args.heads, args.head_dim]
    REPEATS[0] = args.repeats
    PROFILE[:] = [args.profile] if args.profile and torch.cuda.is_available() else []
    GRAPHS[0] = args.graphs and torch.cuda.is_available()
    require_torchrun("distributed_bench")
    parts = {"check", "speed", "weak", "cp"} if "all" in args.part else set(args.part)
    if error := size_error(parts, args, int(os.environ.get("WORLD_SIZE", "1"))):
        parser.error(error)  # (a traceback on every rank after the parts before it had run)
    if os.environ.get("RANK", "0") == "0":  # the writer, before the first part
        make_out(parser, args.out)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    label = "_".join(args.part)  # the output files' suffix: distributed_{label}.md/.json
    check: list[dict[str, Any]] = []
    speed_rows: list[dict[str, Any]] = []
    weak_rows: list[dict[str, Any]] = []
    cp_rows: list[dict[str, Any]] = []

    def report() -> None:  # after each part, so a run cut short still leaves what finished
        if dist.get_rank() == 0:
            write_report(args.out, label, check, speed_rows, weak_rows, cp_rows)

    if "check" in parts:
        check += correctness(device)
        report()
    if "speed" in parts:
        for n, causal in itertools.product(args.seq_lens, (False, True)):
            speed_rows += speed(device, n, causal, tuple(args.layouts))
        report()
    if "weak" in parts:
        causals = CAUSALITY[args.causal]
        fuse_default, spanning_default = launches.FUSE_OFFSETS, lanes.SPANNING
        try:
            for runs, spanning, n, causal, mixing in itertools.product(
                args.offset_runs, args.spanning_lanes, args.weak_n, causals, args.mixing
            ):
                launches.FUSE_OFFSETS = runs == "yes"
                lanes.SPANNING = spanning == "yes"
                rows = weak(device, n, causal, mixing)
                weak_rows += [
                    {**row, "offset_runs": runs, "spanning_lanes": spanning} for row in rows
                ]
                report()
        finally:
            launches.FUSE_OFFSETS, lanes.SPANNING = fuse_default, spanning_default
    if "cp" in parts:
        for n in args.cp_n:
            cp_rows += cp_compare(device, n)
            report()
    if dist.get_rank() == 0:
        print((args.out / f"distributed_{label}.md").read_text(), flush=True)
    # every rank reaches teardown together, none while a peer still works (rank 0 above writes
    # files); CI once saw a launch abort at exit (SIGABRT in gloo's teardown, cause not pinned)
    gc.collect()  # no CUDA graph that captured NCCL's exchanges may outlive the group (above)
    dist.barrier()
    dist.destroy_process_group()
    agreed = all(row.get("agrees", True) for row in cp_rows)
    return 0 if agreed and all(row["ok"] for row in check) else 1


if __name__ == "__main__":
    sys.exit(main())
