"""What single-call timing costs a short call: dense SDPA's forward timed as the bench times a row.

    python -m experiments.timing_floor [--n 4096 8192 16384 32768 65536] [--out DIR]

The bench's single-call timing (``ablate.median_ms`` with one call: sync, start event, call, end
event) counts the host's latency before the first kernel and whatever a rested GPU does before it
runs at speed; back to back, those overlap the previous call. Issue 5's module at 131K is a ~1 ms
call, its dense SDPA baseline a 130-230 ms one. This times dense SDPA itself (issue 5's b=1, h=16,
d=128, bf16; causal or not) at lengths whose calls last from ~0.1 ms to tens of ms, both ways, so
the loss a call of a given duration takes from single-call timing alone reads off a kernel with
no host work of the module's: ``single_vs_b2b`` below 1 at ~1 ms is the timing's floor, not the
module's. Prints a table last; writes ``timing_floor.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments import make_out, require_cuda, require_positive
from experiments.ablate import dict_rows_to_markdown, median_ms
from ringattn.flops import dense_flops, tflops


def dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[4096, 8192, 16384, 32768, 65536],
        help="sequence lengths (default 4096 8192 16384 32768 65536)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timings per median (default 20)")
    parser.add_argument(
        "--b2b-calls", type=int, default=20, help="calls per back-to-back timing (default 20)"
    )
    parser.add_argument("--out", default=None, help="directory for timing_floor.json")
    args = parser.parse_args(argv)
    require_positive(parser, args, "n", "repeats", "b2b_calls")
    require_cuda("timing_floor")
    if args.out:
        make_out(parser, Path(args.out))
    device = torch.device("cuda")
    rows = []
    for causal in (False, True):
        for n in args.n:
            q, k, v = (
                torch.randn(1, 16, n, 128, device=device, dtype=torch.bfloat16) for _ in range(3)
            )

            forward = partial(dense_forward, q, k, v, causal)
            flops = dense_flops(1, n, 16, 128, causal)
            single = median_ms(forward, device, 3, args.repeats)
            b2b = median_ms(forward, device, 3, args.repeats, args.b2b_calls)
            rows.append(
                {
                    "n": n,
                    "causal": causal,
                    "single_ms": single,
                    "b2b_ms": b2b,
                    "single_tflops": tflops(flops, single),
                    "b2b_tflops": tflops(flops, b2b),
                    "single_vs_b2b": b2b / single,
                }
            )
    if args.out:
        with open(Path(args.out) / "timing_floor.json", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(dict_rows_to_markdown(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
