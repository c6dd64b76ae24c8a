"""Do the CUDA-graph compile modes run a block computer's core on CUDA? (needs CUDA)

    python -m experiments.cuda_graph_modes [--n 16384] [--mode reduce-overhead] [--unrefused]
        [--kernels auto|torch] [--history]

Issue 5's shape (bf16, h=16, d=128; the configs whose segments fit ``--n``), each mixing, causal
or not: a module made with ``compile_mode=--mode`` called three times forward (no grad) and
three times forward+backward, each row against the eager module's output. By default the module
refuses these modes on CUDA (``ringattn.api.cuda_graphs_refusal``, h200_perf.md step 62) and
each row says so; ``--unrefused`` lifts the refusal to reproduce what cudagraph trees do with the
core's opaque op (step 62: "storage data ptrs are not allocated in pool" on the second call) or,
once that is fixed, to show that the refusal can go. Prints a table last; exits 1 if any
unrefused row failed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback

import torch

import ringattn
from experiments import require_cuda, require_positive
from ringattn import api

SEGMENTS, RATES = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    parser.add_argument(
        "--mode",
        choices=api.CUDA_GRAPH_MODES,
        default="reduce-overhead",
        help="the compile mode (default reduce-overhead)",
    )
    parser.add_argument("--unrefused", action="store_true", help="lift the module's refusal")
    parser.add_argument(
        "--history",
        action="store_true",
        help="record the cudagraph pool's allocation stacks (Inductor's "
        "cudagraph_trees_history_recording) and print the first failure whole, after the table",
    )
    parser.add_argument(
        "--kernels",
        choices=("auto", "torch"),
        default="auto",
        help="the sdpa computer's CUDA kernels: auto (FlashAttention-4 where it runs) or torch's",
    )
    args = parser.parse_args(argv)
    require_positive(parser, args, "n")
    require_cuda("cuda_graph_modes")
    if args.history:  # (names where a pool tensor that no output holds was allocated)
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraph_trees_history_recording = True
    if args.unrefused:
        api.cuda_graphs_refusal = lambda *_: ""
    fits = [i for i, w in enumerate(SEGMENTS) if w <= args.n] or [0]
    segments, rates = tuple(SEGMENTS[i] for i in fits), tuple(RATES[i] for i in fits)
    rows, failed, first_failure = [], 0, ""
    for mixing, causal in itertools.product(("head_groups", "lse"), (False, True)):
        options = dict(mixing=mixing, causal=causal)
        eager = ringattn.DilatedAttention(segments, rates, **options)  # type: ignore[arg-type]
        graphed = ringattn.DilatedAttention(
            segments,
            rates,
            compile=True,
            compile_mode=args.mode,
            **options,  # type: ignore[arg-type]
        )
        for module in (eager, graphed):  # (the computer's kernel choices, as bench's A/B rows)
            module.computer.cuda_forward = module.computer.cuda_backward = args.kernels
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, args.n, 16, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(3)
        )
        with torch.no_grad():
            ref = eager(q, k, v)
        for part in ("forward", "forward+backward"):
            verdict, err = "ok", float("nan")
            try:
                for _ in range(3):
                    if part == "forward":
                        with torch.no_grad():
                            out = graphed(q, k, v).clone()
                    else:
                        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                        out = graphed(*leaves)
                        out.float().square().sum().backward()
                        out = out.detach().clone()
                torch.cuda.synchronize()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            except Exception as exc:  # the row's verdict; the next rows still run
                verdict = "".join(traceback.format_exception_only(exc)).strip().splitlines()[0]
                refused = isinstance(exc, api.UnsupportedError) and not args.unrefused
                failed += not refused
                if not refused and not first_failure:
                    first_failure = "".join(traceback.format_exception(exc))
            rows.append((mixing, causal, part, f"{err:.3g}", verdict[:160]))
    print(
        f"| mixing | causal | part | rel err vs eager | verdict ({args.mode}, n={args.n}, "
        f"kernels {args.kernels}{', unrefused' if args.unrefused else ''}) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    if args.history and first_failure:
        print(f"\nfirst failure, whole:\n{first_failure[-8000:]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
