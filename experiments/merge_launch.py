"""The LSE merge kernel's warps per program, timed through the whole `lse` forward on a GPU.

    python -m experiments.merge_launch --n 131072 1048576 --warps 4 2 1 8

Each choice sets ``ringattn.kernels.merge.WARPS``. (Commit 9354aed's version of this script and of
the kernel also swept rows per program, ``--launch RxW``: no better than one;
``docs/benchmarks/h200_bench/step18_merge_launch.md``.) For each n (issue 5's shape, ``lse``,
``segment_local/sdpa`` eager) the choices are timed in turns (``--rounds`` of them, so drift hits
every choice alike), forward median ms, plus the merge kernel's own GPU time per forward from
torch.profiler. Prints a table last; writes ``merge_launch.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import ringattn
from experiments import ISSUE_LENGTHS, ISSUE_RATES, add_lengths, require_cuda
from experiments.ablate import dict_rows_to_markdown, median_ms
from ringattn.kernels import merge as merge_kernel


def merge_ms(fn: Callable[[], object], calls: int = 3) -> float:
    """GPU ms per call spent in the merge kernel."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total: float = sum(e.device_time_total for e in prof.key_averages() if "_merge_rows" in e.key)
    return total / 1e3 / calls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lengths(p, [131072, 1048576])
    p.add_argument(
        "--warps",
        type=int,
        nargs="+",
        default=[4, 2, 1, 8],
        help="warps per program, each a choice timed (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="turns through the choices, so drift hits each alike (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed calls per turn, median reported (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "merge_launch",
        help="folder for merge_launch.md / .json (default: %(default)s)",
    )
    args = p.parse_args(argv)
    require_cuda(p.prog)
    device, default = torch.device("cuda"), merge_kernel.WARPS
    choices = args.warps
    rows = []
    try:
        for n in args.n:
            q, k, v = (
                torch.randn(1, n, 16, 128, device=device, dtype=torch.bfloat16) for _ in range(3)
            )
            strategy = ringattn.Strategy(computer="sdpa")
            attention = ringattn.DilatedAttention(
                ISSUE_LENGTHS, ISSUE_RATES, mixing="lse", strategy=strategy
            )

            def fwd(
                attention: ringattn.DilatedAttention = attention,
                q: torch.Tensor = q,
                k: torch.Tensor = k,
                v: torch.Tensor = v,
            ) -> None:
                with torch.no_grad():
                    attention(q, k, v)

            times: dict[int, list[float]] = {c: [] for c in choices}
            merges: dict[int, float] = {}
            for _ in range(args.rounds):
                for choice in choices:
                    merge_kernel.WARPS = choice
                    fwd()  # compiles this variant outside the timing
                    times[choice].append(median_ms(fwd, device, 1, args.repeats))
            for choice in choices:
                merge_kernel.WARPS = choice
                merges[choice] = merge_ms(fwd)
            base = statistics.median(times[choices[0]])
            for choice in choices:
                fwd_ms = statistics.median(times[choice])
                rows.append(
                    {
                        "n": n,
                        "warps": choice,
                        "fwd_ms": fwd_ms,
                        "fwd_ms_runs": [round(t, 3) for t in times[choice]],
                        "merge_ms": merges[choice],
                        "fwd_vs_first": fwd_ms / base,
                    }
                )
                print("row", json.dumps(rows[-1]), flush=True)
            del q, k, v, attention
            torch.cuda.empty_cache()
    finally:
        merge_kernel.WARPS = default
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_launch.json").write_text(json.dumps({"rows": rows}))
    table = dict_rows_to_markdown(rows, list(rows[0]))
    (args.out / "merge_launch.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
