"""CUDA-graph capture of a module's forward against the float64 oracle (needs CUDA).

For each strategy: warm up at another length, capture a length the module has never seen, then
check the eager call right after the capture, the graph's replay, and the replay again after
other lengths have pushed everything the module keeps out of its caches. A pattern made while
capturing holds no values until the graph replays, and a kept tensor the graph uses goes back to
the allocator when evicted while the replays still read it: the pooled manager keeps nothing while
capturing (``docs/architecture.md``, "Memory under compile"). Prints a table and exits 1 if any
error is above the bf16 bound.

    python -m experiments.graph_capture_check [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import ringattn
from experiments import make_out, require_cuda
from experiments.ablate import rel_err
from ringattn import reference

SEGMENTS, RATES, HEADS, DIM = (64, 128, 256), (1, 2, 4), 4, 64
BOUND = 2e-2  # ‖out − ref‖ / ‖ref‖, bf16


def inputs(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(1, n, HEADS, DIM, generator=gen, device="cuda").to(torch.bfloat16)
        for _ in range(3)
    ]


def check(dilation: str, mixing: str, memory: str, causal: bool) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    module = ringattn.DilatedAttention(
        SEGMENTS,
        RATES,
        mixing=mixing,
        causal=causal,
        strategy=ringattn.Strategy(dilation=dilation, computer="sdpa", memory=memory),
        compile=False,
    )
    # more lengths than the pooled caches hold (64 entries, ~3 per length and config)
    others = [512 + 64 * i for i in range(1, 30)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            module(*inputs(others[0], gen))  # warm-up at another length, as torch's docs advise
    torch.cuda.current_stream().wait_stream(side)
    qkv = inputs(512, gen)
    ref = reference.dilated_attention(
        *(x.double() for x in qkv),
        segment_lengths=SEGMENTS,
        dilation_rates=RATES,
        mixing=mixing,
        causal=causal,
    )
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        with torch.cuda.graph(graph):
            captured = module(*qkv)
        eager = module(*qkv)
        graph.replay()
        torch.cuda.synchronize()
        row = {
            "dilation": dilation,
            "mixing": mixing,
            "memory": memory,
            "causal": causal,
            "eager_after_capture": rel_err(eager, ref),
            "replay": rel_err(captured, ref),
        }
        for n in others:  # evict what the module keeps (and reuse the allocator's blocks)
            module(*inputs(n, gen))
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        row["replay_after_eviction"] = rel_err(captured, ref)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for graph_capture_check.json")
    args = parser.parse_args(argv)
    require_cuda("graph_capture_check")
    if args.out:  # before the checks (made after them, a bad --out lost the table too)
        make_out(parser, Path(args.out))
    rows = [
        check(*combo)
        for combo in itertools.product(
            ("segment_local", "global"), ("lse", "head_groups"), ("pooled", "none"), (False, True)
        )
    ]
    columns = ("eager_after_capture", "replay", "replay_after_eviction")
    failed = [r for r in rows if not all(r[c] <= BOUND for c in columns)]
    if args.out:
        with open(os.path.join(args.out, "graph_capture_check.json"), "w") as f:
            json.dump({"torch": torch.__version__, "bound": BOUND, "rows": rows}, f, indent=1)
    print("| dilation | mixing | memory | causal | " + " | ".join(columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    for r in rows:
        cells = [r["dilation"], r["mixing"], r["memory"], str(r["causal"])]
        print("| " + " | ".join(cells + [f"{r[c]:.2e}" for c in columns]) + " |")
    print(f"{len(rows) - len(failed)}/{len(rows)} within {BOUND}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
