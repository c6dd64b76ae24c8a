"""Kernel-level profile of the dilated core on one GPU (torch.profiler, CUDA time per kernel).

    python -m experiments.profile_core                       # 131K, both mixings, fwd+bwd
    python -m experiments.profile_core --forward --compile   # no-grad forward, eager vs compiled

Prints torch.profiler's table per (mixing, variant), sorted by CUDA time: which kernels the core
launches, how often, and how long (docs/benchmarks/h200_perf.md quotes it: the compiled frame's
identical GPU work, the r = 1 block's gradient copies).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import ringattn
from experiments.bench import ISSUE_LENGTHS, ISSUE_RATES, fwd_and_fwdbwd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--mixing", nargs="+", default=["lse", "head_groups"])
    p.add_argument("--forward", action="store_true", help="no-grad forward instead of fwd+bwd")
    p.add_argument("--compile", action="store_true", help="also profile compile=True")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args(argv)
    q, k, v, dout = (
        torch.randn(1, args.n, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    for mixing in args.mixing:
        for compiled in (False, True) if args.compile else (False,):
            module = ringattn.DilatedAttention(
                ISSUE_LENGTHS, ISSUE_RATES, mixing=mixing, compile=compiled
            )
            fwd, fwdbwd = fwd_and_fwdbwd(module, q, k, v, dout)
            call = fwd if args.forward else fwdbwd
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    call()
                torch.cuda.synchronize()
            what = "forward" if args.forward else "forward+backward"
            print(f"=== n={args.n} {mixing} {what} x{args.calls}, compile={compiled}")
            print(
                prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70
                )
            )


if __name__ == "__main__":
    main()
