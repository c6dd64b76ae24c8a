"""Which of FA4's recorded launches are kept as replays (needs CUDA and FlashAttention-4).

Runs issue 5's shape (bf16, h=16, d=128, its five configs) at one length, each mixing, causal or
not, forward and forward+backward, twice; then counts the recordings ``ringattn.kernels.fa4``
kept and the ones it refused (a refused signature calls FA4's Python launcher every time: right,
but host-bound at short lengths), with ``replay.last_refusal``. Prints a table; exits 1 if any
recording was refused.

    python -m experiments.replay_check [--n 16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
from pathlib import Path

import torch

import ringattn
from experiments import ISSUE_LENGTHS, ISSUE_RATES, make_out, require_cuda, require_positive
from ringattn.kernels import fa4, fa4_merge, replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    parser.add_argument("--out", default=None, help="directory for replay_check.json")
    args = parser.parse_args(argv)
    require_positive(parser, args, "n")  # (torch's error, after CUDA started)
    require_cuda("replay_check")
    if args.out:  # before the calls (made after them, a bad --out lost the table too)
        make_out(parser, Path(args.out))
    if not fa4.available(torch.empty(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)):
        print("replay_check: FlashAttention-4 is not available here", file=sys.stderr)
        return 2
    layouts: collections.Counter[tuple[str, str]] = collections.Counter()
    refused_layouts: list[str] = []
    layout_ok = fa4_merge.layout_ok

    def counted_layout_ok(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor | None,
    ) -> bool:
        ok = layout_ok(q, k, v, out, lse)
        tensors = (q, k, v, out, lse)
        caller = sys._getframe(1).f_globals.get("__name__", "?").rsplit(".", 1)[-1]
        layouts[(caller, "accepted" if ok else "refused")] += 1
        if not ok and len(refused_layouts) < 20:
            shapes = [None if t is None else (tuple(t.shape), t.stride()) for t in tensors]
            refused_layouts.append(f"{caller}: {shapes}")
        return ok

    fa4_merge.layout_ok = counted_layout_ok  # callers look it up at call time
    gen = torch.Generator(device="cuda").manual_seed(0)
    for mixing, causal in itertools.product(("lse", "head_groups"), (False, True)):
        attention = ringattn.DilatedAttention(
            ISSUE_LENGTHS, ISSUE_RATES, mixing=mixing, causal=causal
        )
        for _ in range(2):
            q, k, v = (
                torch.randn(1, args.n, 16, 128, generator=gen, device="cuda")
                .to(torch.bfloat16)
                .requires_grad_()
                for _ in range(3)
            )
            attention(q, k, v).sum().backward()
            with torch.no_grad():
                attention(q, k, v)
    torch.cuda.synchronize()
    fa4_merge.layout_ok = layout_ok
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for (kind, _), recorded in fa4._REPLAYS.items():
        counts[(kind, "kept" if recorded is not None else "refused")] += 1
    rows = sorted(counts.items())
    refused = sum(c for (_, verdict), c in rows if verdict == "refused")
    if args.out:
        with open(os.path.join(args.out, "replay_check.json"), "w") as f:
            json.dump(
                {
                    "n": args.n,
                    "counts": {f"{k} {v}": c for (k, v), c in rows},
                    "last_refusal": replay.last_refusal,
                    "layouts": {f"{k} {v}": c for (k, v), c in sorted(layouts.items())},
                    "refused_layouts": refused_layouts,
                },
                f,
                indent=1,
            )
    print("| kind | verdict | signatures |\n|---|---|---|")
    for (kind, verdict), count in rows:
        print(f"| {kind} | {verdict} | {count} |")
    print("\n| layout_ok's caller | verdict | calls |\n|---|---|---|")
    for (caller, verdict), count in sorted(layouts.items()):
        print(f"| {caller} | {verdict} | {count} |")
    print("\n".join(refused_layouts))
    layouts_refused = sum(c for (_, verdict), c in layouts.items() if verdict == "refused")
    print(
        f"refused: {refused}; last refusal: {replay.last_refusal!r}; "
        f"layouts refused: {layouts_refused} of {sum(layouts.values())}"
    )
    return 1 if refused or layouts_refused or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
