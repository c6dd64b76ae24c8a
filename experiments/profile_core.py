"""Kernel-level profile of the dilated core on one GPU (torch.profiler, CUDA time per kernel).

    python -m experiments.profile_core                       # 131K, both mixings, fwd+bwd
    python -m experiments.profile_core --forward --compile   # no-grad forward, eager vs compiled
    python -m experiments.profile_core --host --n 32768      # where the host's time per call goes
    python -m experiments.profile_core --host --n 32768 --host-trace DIR  # and its timeline
    python -m experiments.profile_core --forward --causal    # which causal kernels take the time

Prints torch.profiler's table per (mixing, variant), sorted by CUDA time: which kernels the core
launches, how often, and how long (docs/benchmarks/h200_perf.md quotes it: the compiled frame's
identical GPU work, the r = 1 block's gradient copies). ``--host`` instead profiles the host side
with cProfile: the calls are issued while the GPU is still busy with a sleep kernel, so nothing on
the host waits for the GPU, and the table (sorted by own time) is the host's cost per call: of
the forward and of forward+backward, or with ``--forward`` of the forward alone.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import ringattn
from experiments import (
    ISSUE_LENGTHS,
    ISSUE_RATES,
    add_mixings,
    make_out,
    require_cuda,
    require_mixings,
    require_positive,
)
from experiments.ablate import queued_host_ms
from experiments.bench import fwd_and_fwdbwd
from ringattn import lanes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=131072, help="sequence length (default: %(default)s)")
    add_mixings(p, ["lse", "head_groups"])
    p.add_argument(
        "--forward",
        action="store_true",
        help="no-grad forward instead of fwd+bwd (with --host: the forward alone, not both)",
    )
    p.add_argument("--compile", action="store_true", help="also profile compile=True")
    p.add_argument("--causal", action="store_true", help="causal attention (default: not)")
    p.add_argument(
        "--calls", type=int, default=5, help="calls profiled per variant (default: %(default)s)"
    )
    p.add_argument(
        "--rows", type=int, default=16, help="rows of each profiler table (default: %(default)s)"
    )
    p.add_argument("--host", action="store_true", help="cProfile the host instead")
    p.add_argument(
        "--dump", default=None, help="with --host: also write each profile (pstats) to DIR/*.prof"
    )
    p.add_argument(
        "--host-trace",
        default=None,
        help="with --host: also write a torch.profiler trace (CPU ops and Python calls on every "
        "thread, the autograd engine's included) of the calls to DIR/*.json.gz",
    )
    p.add_argument(
        "--lanes", choices=lanes.MODES, default=lanes.MODE, help="ringattn.lanes.MODE for the run"
    )
    args = p.parse_args(argv)
    # (--calls 0: a ZeroDivisionError in --host's ms per call; the others failed in torch or the
    # library after the profiles before them had run)
    require_positive(p, args, "n", "calls", "rows")
    require_mixings(p, args.mixing)
    for flag, folder in (("--dump", args.dump), ("--host-trace", args.host_trace)):
        if folder and not args.host:  # (ignored without it: no file, and no word why)
            p.error(f"{flag} writes the host's profiles: only with --host")
    require_cuda(p.prog)
    for flag, folder in (("--dump", args.dump), ("--host-trace", args.host_trace)):
        if folder:  # before the profiles (made after the first, a bad one lost the rest)
            make_out(p, Path(folder), flag)
    lanes.MODE = args.lanes
    q, k, v, dout = (
        torch.randn(1, args.n, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    for mixing in args.mixing:
        for compiled in (False, True) if args.compile else (False,):
            module = ringattn.DilatedAttention(
                ISSUE_LENGTHS, ISSUE_RATES, mixing=mixing, causal=args.causal, compile=compiled
            )
            fwd, fwdbwd = fwd_and_fwdbwd(module, q, k, v, dout)
            if args.host:  # (it profiled both under --forward too: gpu_session.sh passed it)
                pairs = [("forward", fwd), ("forward+backward", fwdbwd)]
                for what, call in pairs[:1] if args.forward else pairs:
                    # (causal and compile in both: the titles of a causal and a non-causal run
                    # read alike, and under --compile the compiled profile's dump and trace
                    # overwrote the eager one's)
                    title = (
                        f"n={args.n} {mixing} causal={args.causal} {what} lanes={args.lanes}"
                        f" compile={compiled}"
                    )
                    causality = "causal" if args.causal else "noncausal"
                    mode = "compiled" if compiled else "eager"
                    stem = f"{mixing}_{causality}_{what.replace('+', '_')}_{mode}"
                    dump = os.path.join(args.dump, f"{stem}.prof") if args.dump else None
                    host_profile(call, title, args.calls, args.rows, dump)
                    if args.host_trace:
                        trace = os.path.join(args.host_trace, f"{stem}.json.gz")
                        host_trace(call, args.calls, trace)
                continue
            call = fwd if args.forward else fwdbwd
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    call()
                torch.cuda.synchronize()
            what = "forward" if args.forward else "forward+backward"
            print(
                f"=== n={args.n} {mixing} causal={args.causal} {what}"
                f" x{args.calls}, compile={compiled}"
            )
            print(
                prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70
                )
            )


def host_profile(
    call: Callable[[], object], title: str, calls: int, rows: int, dump: str | None = None
) -> None:
    """cProfile of ``calls`` calls issued behind a sleeping GPU: the host's own time per call."""
    for _ in range(3):
        call()
    plain_ms = queued_host_ms(call, calls)
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time: every launch below only queues
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    host_ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    print(
        f"=== {title}: host {plain_ms:.3f} ms per call ({host_ms:.3f} under cProfile)", flush=True
    )
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)
    if dump:  # the whole profile, for pstats' other views (callers, cumulative)
        os.makedirs(os.path.dirname(dump) or ".", exist_ok=True)
        profiler.dump_stats(dump)


def host_trace(call: Callable[[], object], calls: int, path: str) -> None:
    """A torch.profiler trace of ``calls`` calls issued behind a sleeping GPU (so the host never
    waits for it): every thread's CPU ops and Python calls with their start and end, which
    cProfile (the calling thread only, no timeline) cannot show; e.g. how long the backward's
    thread takes to start and what it waits for."""
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(calls):
            call()
    torch.cuda.synchronize()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)
    print(f"=== host trace: {path}", flush=True)


if __name__ == "__main__":
    main()
