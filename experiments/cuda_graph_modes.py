"""Do the CUDA-graph compile modes run a block computer's core on CUDA? (needs CUDA)

    python -m experiments.cuda_graph_modes [--n 16384] [--mode reduce-overhead]
        [--kernels auto|torch] [--history] [--out DIR] [--outer [moved|built]] [--static-inputs]

Issue 5's shape (bf16, h=16, d=128; the configs whose segments fit ``--n``), each mixing, causal
or not: a module made with ``compile_mode=--mode`` called three times forward (no grad) and
three times forward+backward, each row against the eager module's output, then timed against
it (median of CUDA-event times, one call after another). ``--outer`` compiles a model around an
uncompiled module instead (``torch.compile(module.to("cuda"), mode=--mode)``; ``built``: made
under ``torch.device("cuda")``, never moved: either makes the CUDA tag the trace needs;
``functional``: a function of ``ringattn.dilated_attention`` compiled before any eager call,
whose trace makes the module and its CUDA tag). Inductor's
cudagraph trees failed the core's opaque op until h200_perf.md step 63 (step 62: its CPU module
tag, a non-static input, then a graph output; caches made in a tree's warm-up, pool tensors no
output held). ``--static-inputs`` marks q, k, v (and the leaves made from them) with
``torch._dynamo.mark_static_address``, so the cudagraph trees replay on them instead of copying
each call's inputs into their pool (the copy a model whose graph makes q, k, v never pays; step
63's guess at why the mode was slower than eager at 131K). Prints a table last; exits 1 if any
row failed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ringattn
from experiments import issue_configs, require_cuda, require_positive
from experiments.ablate import to_markdown
from ringattn import api


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    parser.add_argument(
        "--mode",
        choices=api.CUDA_GRAPH_MODES,
        default="reduce-overhead",
        help="the compile mode (default reduce-overhead)",
    )
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
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --history, also write the first failure whole to "
        "DIR/first_failure_n<N>_<kernels>.txt (the printout keeps only its end)",
    )
    parser.add_argument(
        "--outer",
        nargs="?",
        const="moved",
        choices=("moved", "built", "functional"),
        default=None,
        help="compile a model around an uncompiled module in --mode instead of the module's own "
        "compile_mode: the module moved to the GPU (moved, the default) or built there (built); "
        "functional: a function calling ringattn.dilated_attention (compile=False) instead",
    )
    parser.add_argument(
        "--fullgraph",
        action="store_true",
        help="with --outer, compile the model or function with fullgraph=True (one graph or an "
        "error, as a user who needs the whole step in one CUDA graph would)",
    )
    parser.add_argument(
        "--static-inputs",
        action="store_true",
        help="mark q, k, v static (torch._dynamo.mark_static_address): the CUDA-graph modes then "
        "read them in place instead of copying them into their pool each call",
    )
    args = parser.parse_args(argv)
    require_positive(parser, args, "n")
    if args.fullgraph and args.outer is None:
        parser.error("--fullgraph applies to a model or function compiled with --outer")
    require_cuda("cuda_graph_modes")
    if args.history:  # (names where a pool tensor that no output holds was allocated)
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraph_trees_history_recording = True
    segments, rates = issue_configs(args.n)
    rows, failed, first_failure = [], 0, ""
    for mixing, causal in itertools.product(("head_groups", "lse"), (False, True)):
        options = dict(mixing=mixing, causal=causal)
        eager = ringattn.DilatedAttention(segments, rates, **options)  # type: ignore[arg-type]
        with torch.device("cuda" if args.outer == "built" else "cpu"):
            inner = ringattn.DilatedAttention(
                segments,
                rates,
                compile=args.outer is None,
                compile_mode=args.mode if args.outer is None else "default",
                **options,  # type: ignore[arg-type]
            )
        if args.outer == "moved":
            inner = inner.to("cuda")
        compiled_as = dict(mode=args.mode, fullgraph=args.fullgraph)
        graphed = inner if args.outer is None else torch.compile(inner, **compiled_as)
        if args.outer == "functional":  # (its module made by the trace, with its CUDA tag)
            graphed = torch.compile(_functional(segments, rates, options), **compiled_as)
        for module in (eager, inner):  # (the computer's kernel choices, as bench's A/B rows)
            module.computer.cuda_forward = module.computer.cuda_backward = args.kernels
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, args.n, 16, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(3)
        )
        if args.static_inputs:
            for x in (q, k, v):
                torch._dynamo.mark_static_address(x)
        with torch.no_grad():
            ref = eager(q, k, v)
        for part in ("forward", "forward+backward"):
            verdict, err, times = "ok", float("nan"), [float("nan")] * 2
            try:
                for _ in range(3):
                    if part == "forward":
                        with torch.no_grad():
                            out = graphed(q, k, v).clone()
                    else:
                        leaves = _leaves(q, k, v, True, args.static_inputs)
                        out = graphed(*leaves)
                        out.float().square().sum().backward()
                        out = out.detach().clone()
                torch.cuda.synchronize()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                times = [_median_ms(m, part, q, k, v, args.static_inputs) for m in (graphed, eager)]
            except Exception as exc:  # the row's verdict; the next rows still run
                verdict = "".join(traceback.format_exception_only(exc)).strip().splitlines()[0]
                failed += 1
                if not first_failure:
                    first_failure = "".join(traceback.format_exception(exc))
            ms = f"{times[0]:.3f} ({times[1]:.3f})"
            rows.append((mixing, causal, part, f"{err:.3g}", ms, verdict[:160]))
    how = f", outer {args.outer}" if args.outer else ""
    how += ", static inputs" if args.static_inputs else ""
    how += ", fullgraph" if args.fullgraph else ""
    verdict = f"verdict ({args.mode}, n={args.n}, kernels {args.kernels}{how})"
    columns = ["mixing", "causal", "part", "rel err vs eager", "ms (eager ms)", verdict]
    print(to_markdown(columns, [[str(cell) for cell in row] for row in rows]))
    if args.history and first_failure:
        print(f"\nfirst failure, its end:\n{first_failure[-8000:]}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            outer = f"_outer_{args.outer}" if args.outer else ""
            path = args.out / f"first_failure_n{args.n}_{args.kernels}{outer}.txt"
            path.write_text(first_failure)
    return 1 if failed else 0


def _functional(
    segments: tuple[int, ...], rates: tuple[int, ...], options: dict[str, Any]
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A user's function of ringattn.dilated_attention with these options (closure constants,
    as Dynamo needs them), never called eagerly before its compile."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ringattn.dilated_attention(
            q, k, v, segment_lengths=segments, dilation_rates=rates, compile=False, **options
        )

    return attention


def _leaves(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: bool, static: bool
) -> list[torch.Tensor]:
    """q, k, v detached (leaves of the call's graph where ``grad``); marked static like their
    bases where ``static`` (a new tensor object carries no mark of its own)."""
    leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]
    if static:
        for x in leaves:
            torch._dynamo.mark_static_address(x)
    return leaves


def _median_ms(
    module: Callable[..., torch.Tensor],
    part: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    static: bool = False,
    calls: int = 10,
) -> float:
    """A call's median time, calls one after another (the graphed module replays by now)."""
    leaves = _leaves(q, k, v, part != "forward", static)
    times: list[float] = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.set_grad_enabled(part != "forward"):
            out = module(*leaves)
            if part != "forward":
                out.float().square().sum().backward()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[calls // 2]


if __name__ == "__main__":
    sys.exit(main())
