"""Host time of the per-call agreement check of a sequence-parallel module (``distributed.agree``:
one all-reduce of two integers on a CPU gloo group), against the module's own eager call.

    torchrun --nproc_per_node 2 -m experiments.rank_check_cost [--calls 2000]

Prints, on rank 0, µs per ``agree`` and per eager call of a small ring ``DilatedAttention`` on
this machine's CPU (gloo): the check's share of a call whose host time it adds to.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.distributed as dist

import ringattn
from experiments import require_torchrun
from experiments.ablate import median_ms
from ringattn import distributed


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """µs per call of ``calls`` calls of ``fn`` after ``calls // 10`` (at least 10) warm-up calls,
    whose collectives also line the ranks up."""
    return median_ms(fn, torch.device("cpu"), max(calls // 10, 10), repeats=1, calls=calls) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="launch: torchrun --nproc_per_node 2 -m experiments.rank_check_cost",
    )
    parser.add_argument(
        "--calls", type=int, default=2000, help="calls timed per arm (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.calls < 4:  # (a ZeroDivisionError on every rank, after the process group started)
        parser.error(f"--calls must be >= 4 (the module's arm times calls // 4), got {args.calls}")
    require_torchrun("rank_check_cost")
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    assert group is not None  # (initialized above)
    module = ringattn.DilatedAttention(
        (64,), (1,), strategy=ringattn.Strategy(communicator="ring"), compile=False
    )
    x = torch.randn(1, 64, 2, 16)
    with torch.no_grad():
        rows = {
            "agree (all-reduce of the digest)": per_call_us(
                lambda: distributed.agree(group, 12345), args.calls
            ),
            "ring DilatedAttention call, n=128 over 2 ranks": per_call_us(
                lambda: module(x, x, x), args.calls // 4
            ),
        }
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} ranks, {torch.get_num_threads()} threads per rank")
        print("| what | µs per call |\n|---|---|")
        for name, us in rows.items():
            print(f"| {name} | {us:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
