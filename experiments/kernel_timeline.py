"""Kernel timeline of one call of the dilated core on a GPU: each kernel in order, its grid, its
GPU time and the idle gap before it.

    python -m experiments.kernel_timeline --n 131072 --mixing head_groups [--causal {no,yes,both}]
        [--out DIR] [--lanes never forward] [--host]

``experiments.profile_core`` sums the time per kernel *name*; every FA4 block call shares one
name, so it cannot say which config's call is slow. This lists the kernels of the last of
``--calls`` forward calls issued back to back (eager, no grad, issue 5's configs; with
``--backward`` forward+backward calls, and a per-kernel-name summary): per launch the
grid (how many CTAs: a call of few CTAs leaves SMs idle), the µs, and the µs of GPU idle before
it (host-bound stretches; from the latest end of the kernels before it, so negative where it
started while one still ran; with ``--host``, also how long before its start the host's launch
call began: near 0 after a gap, the GPU waited for the host); then the GPU's busy time over all
calls against their span, whose difference is the idle time between calls. Writes
``kernel_timeline.md`` under ``--out`` (and with ``--host`` each timeline's Chrome trace).
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import ringattn
from experiments import (
    CAUSALITY,
    ISSUE_LENGTHS,
    ISSUE_RATES,
    add_causality,
    add_heads,
    add_lengths,
    add_mixings,
    make_out,
    require_cuda,
    require_mixings,
    require_positive,
)
from ringattn import lanes

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_and_span(kernels: list[dict[str, Any]]) -> tuple[list[float | None], float, float]:
    """For kernels sorted by start (``ts``, ``dur`` in µs): each one's gap before it (its start
    less the latest end of the kernels before it, None for the first: negative where it started
    while an earlier one still ran), their summed time, and their span from the first start to
    the latest end (concurrent kernels may end before one that started earlier)."""
    gaps: list[float | None] = []
    busy_until = None
    for e in kernels:
        gaps.append(None if busy_until is None else e["ts"] - busy_until)
        end = e["ts"] + e["dur"]
        busy_until = end if busy_until is None else max(busy_until, end)
    busy = sum(e["dur"] for e in kernels)
    return gaps, busy, (busy_until - kernels[0]["ts"]) if kernels else 0.0


def issue_leads(kernels: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[float | None]:
    """Per kernel, the µs from the start of the host call that launched it to its start on the
    GPU (None where the launch is not in ``events``): near 0 after an idle gap, the GPU waited for
    the host to issue it."""
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") in ("cuda_runtime", "cuda_driver")  # (Triton launches via the driver)
        and e.get("name", "").startswith(("cudaLaunch", "cuLaunch"))
        and "correlation" in e.get("args", {})
    }
    leads: list[float | None] = []
    for kernel in kernels:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        leads.append(None if launch is None else kernel["ts"] - launch["ts"])
    return leads


def timeline(
    n: int,
    mixing: str,
    causal: bool,
    calls: int,
    heads: int,
    dim: int,
    backward: bool = False,
    host: bool = False,
    trace_to: Path | None = None,
) -> list[str]:
    q, k, v = (
        torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16).requires_grad_(backward)
        for _ in range(3)
    )
    dout = torch.randn_like(q)
    module = ringattn.DilatedAttention(ISSUE_LENGTHS, ISSUE_RATES, causal=causal, mixing=mixing)

    def call() -> None:
        if backward:  # autograd.grad: no accumulation into .grad (an add per call)
            torch.autograd.grad(module(q, k, v), (q, k, v), dout)
        else:
            with torch.no_grad():
                module(q, k, v)

    for _ in range(3):  # warm: replays recorded, launches prepared
        call()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA, *([ProfilerActivity.CPU] if host else [])]
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:  # the Chrome trace carries each launch's grid
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        trace_text = trace.read_text()
        events = json.loads(trace_text)["traceEvents"]
        if trace_to is not None:
            trace_to.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(trace_to, "wt") as f:
                f.write(trace_text)
    kernels = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES),
        key=lambda e: e["ts"],
    )
    last = kernels[-(len(kernels) // calls) :]  # every call launches the same kernels
    rows = [
        f"## n={n} {mixing} causal={causal} lanes={lanes.MODE}: the last of {calls} "
        f"{'forwards+backwards' if backward else 'forwards'} back to back",
        "",
        "| # | kernel | grid (CTAs) | µs | gap before µs | launched µs before |",
        "|---|---|---|---|---|---|",
    ]
    gaps, busy, span = busy_and_span(last)
    leads = issue_leads(last, events) if host else [None] * len(last)
    for i, (e, gap, lead) in enumerate(zip(last, gaps, leads, strict=True)):
        grid = e.get("args", {}).get("grid")
        ctas = f"{grid} ({grid[0] * grid[1] * grid[2]})" if grid else ""
        gap_text = "" if gap is None else f"{gap:.1f}"
        lead_text = "" if lead is None else f"{lead:.1f}"
        rows.append(
            f"| {i} | {e['name'][:60]} | {ctas} | {e['dur']:.1f} | {gap_text} | {lead_text} |"
        )
    per_name: dict[str, list[float]] = {}
    for e in last:
        per_name.setdefault(e["name"][:60], []).append(e["dur"])
    rows += ["", "| kernel | launches | µs | share of busy |", "|---|---|---|---|"]
    for name, durations in sorted(per_name.items(), key=lambda item: -sum(item[1])):
        rows.append(
            f"| {name} | {len(durations)} | {sum(durations):.0f} | {sum(durations) / busy:.1%} |"
        )
    _, all_busy, all_span = busy_and_span(kernels)
    rows += [
        "",
        f"GPU busy {busy:.0f} of {span:.0f} µs over this call's {len(last)} kernels; "
        f"{all_busy:.0f} of {all_span:.0f} µs from the first call's first kernel to the last's "
        f"last ({all_span / calls:.0f} µs per call, idle gaps between calls included)",
        "",
    ]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lengths(p, [131072])
    add_mixings(p, ["head_groups", "lse"])
    add_causality(p)
    p.add_argument(
        "--calls", type=int, default=3, help="calls recorded per row (default: %(default)s)"
    )
    p.add_argument("--backward", action="store_true", help="time forward+backward calls")
    add_heads(p)
    p.add_argument(
        "--lanes",
        nargs="+",
        choices=lanes.MODES,
        default=[lanes.MODE],
        help="ringattn.lanes.MODE for each timeline in turn (concurrent kernels overlap: their "
        "gaps go negative)",
    )
    p.add_argument(
        "--host",
        action="store_true",
        help="also record the host's calls: each kernel's lead from its launch call to its start "
        "(near 0 after a gap: the GPU waited for the host), and each timeline's Chrome trace "
        "(trace_*.json.gz under --out)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "kernel_timeline",
        help="folder for kernel_timeline.md (and --host's traces) (default: %(default)s)",
    )
    args = p.parse_args(argv)
    # (--calls 0: a ZeroDivisionError after the profile; the others failed in torch or the
    # library, on the GPU, after the timelines before them had run)
    require_positive(p, args, "n", "calls", "heads", "dim")
    require_mixings(p, args.mixing)
    require_cuda(p.prog)
    make_out(p, args.out)  # before the timelines (made at the end, a bad --out lost them all)
    causals = CAUSALITY[args.causal]
    text = [f"# Kernel timeline, {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    for n in args.n:
        for mixing in args.mixing:
            for causal in causals:
                for turn, mode in enumerate(args.lanes):
                    lanes.MODE = mode
                    stem = f"trace_{n}_{mixing}_{'causal' if causal else 'noncausal'}_{mode}"
                    if args.lanes.count(mode) > 1:  # (each turn's trace, not the last alone)
                        stem += f"_turn{turn}"
                    text += timeline(
                        n,
                        mixing,
                        causal,
                        args.calls,
                        args.heads,
                        args.dim,
                        args.backward,
                        args.host,
                        args.out / f"{stem}.json.gz" if args.host else None,
                    )
                    print("\n".join(text[-8:]), flush=True)
    (args.out / "kernel_timeline.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
