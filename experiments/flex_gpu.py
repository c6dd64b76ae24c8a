"""GPU check + benchmark for the flex and sdpa computers (issues 2 and 3), one command:

    python -m experiments.flex_gpu --out "$OUT"

1. Correctness: every single-device strategy, forward and backward, against the float64 oracle on
   the GPU (fp32 and bf16, both mixings, causal and not), eager and (flex) compiled.
2. Speed: forward and forward+backward time and useful TFLOP/s of flex (both layouts) and sdpa
   (both layouts) vs dense SDPA on the same input, measured side by side in one run (CUDA events,
   warm-up, median of repeats), plus the fraction of tiles each flex block mask visits.
Writes ``flex_gpu.md`` and ``flex_gpu.json`` under ``--out`` and prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import ringattn
from experiments import add_lengths, make_out, require_cuda, require_positive, worst
from experiments.ablate import dict_rows_to_markdown, median_ms, rel_err
from experiments.bench import failure
from ringattn import masks, reference
from ringattn.computers.flex import FlexComputer
from ringattn.computers.sdpa import CUDA_FORWARDS, SDPAComputer
from ringattn.flops import dense_flops, tflops, useful_flops
from ringattn.memory.none import NoReuse
from ringattn.pattern import make_plan

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# (heads, segment_lengths, dilation_rates, mixings, n): at n = 1000 every config has a tail; 6
# heads spread offsets unevenly; 8 heads under lse launch offsets as runs
# (ringattn.pattern.OffsetRun): r = 8's full segments and its tail, and r = 4's w > n tail; at
# n = 1024 (full segments, b = 2: every part one view) head_groups' configs go as one FA4 launch
# (ringattn.kernels.fa4_group)
CHECK_PROBLEMS = (
    (6, (128, 256, 512), (1, 2, 4), ("lse", "head_groups"), 1000),
    (8, (128, 256, 2048), (1, 8, 4), ("lse",), 1000),
    (6, (128, 256, 512), (1, 2, 4), ("head_groups",), 1024),
)


def correctness(device: torch.device) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for h, lengths, rates, mixings, n in CHECK_PROBLEMS:
        rows += _correctness(device, h, lengths, rates, mixings, n)
    return rows


def _correctness(
    device: torch.device,
    h: int,
    lengths: Sequence[int],
    rates: Sequence[int],
    mixings: Sequence[str],
    n: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    b, d = 2, 64
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = [
        torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).to(device) for _ in range(3)
    ]
    grad = torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).to(device)
    for mixing in mixings:
        for causal in (False, True):
            opts: dict[str, Any] = dict(
                segment_lengths=lengths, dilation_rates=rates, causal=causal, mixing=mixing
            )
            for dtype in (torch.float32, torch.bfloat16):
                inputs = [x.to(dtype) for x in base]
                ref_in = [x.double().requires_grad_() for x in inputs]
                ref = reference.dilated_attention(*ref_in, **opts)
                ref_grads = torch.autograd.grad(ref, ref_in, grad)
                # memory none/pooled differ only in caching; compiled flex (the real kernels) once
                # per causal setting to bound compile time
                for strategy in ringattn.Strategy.single_device(memory="pooled"):
                    compile_too = (
                        strategy.computer == "flex" and mixing == "lse" and dtype == torch.bfloat16
                    )
                    compiles = (False, True) if compile_too else (False,)
                    for compiled in compiles:
                        module = ringattn.DilatedAttention(
                            lengths,
                            rates,
                            causal=causal,
                            mixing=mixing,
                            strategy=strategy,
                            compile=compiled,
                        )
                        try:
                            # twice: the second call runs what the first one cached (FA4's
                            # replayed launches, pooled buffers, compiled graphs)
                            fwd = bwd = 0.0
                            for _ in range(2):
                                xs = [x.detach().clone().requires_grad_() for x in inputs]
                                out = module(*xs)
                                grads = torch.autograd.grad(out, xs, grad.to(dtype))
                                fwd = worst([fwd, rel_err(out, ref)])
                                grad_errs = (rel_err(g, r) for g, r in zip(grads, ref_grads))
                                bwd = worst([bwd, *grad_errs])
                            error = ""
                        except Exception as exc:  # report, keep going
                            fwd = bwd = float("nan")
                            error = failure(exc)
                        rows.append(
                            {
                                "strategy": strategy.label,
                                "compile": compiled,
                                "n": n,
                                "heads": h,
                                "mixing": mixing,
                                "causal": causal,
                                "dtype": str(dtype).replace("torch.", ""),
                                "fwd_err": fwd,
                                "grad_err": bwd,
                                "ok": fwd <= TOL[dtype] and bwd <= 10 * TOL[dtype],
                                "error": error,
                            }
                        )
                        print("check", rows[-1], flush=True)
    return rows


def bench_ms(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    return median_ms(fn, torch.device("cuda"), warmup, repeats)


def block_fractions(
    n: int, lengths: Sequence[int], rates: Sequence[int], causal: bool
) -> dict[str, float]:
    plan = make_plan(n, 16, tuple(zip(lengths, rates)), "lse")
    computer = FlexComputer()
    dev = torch.device("cuda")
    out: dict[str, float] = {}
    single = computer.prepare(plan, causal, "segment_local", dev, NoReuse())
    out["single_kernel"] = masks.computed_fraction(single[0])
    per_config = computer.prepare(plan, causal, "global", dev, NoReuse())
    for (w, r), (_, _, bm) in zip(plan.configs, per_config):
        out[f"global w={w} r={r}"] = masks.computed_fraction(bm)
        out[f"ideal w={w} r={r}"] = (w / n) / r / r * (0.5 if causal else 1.0)
    return out


def speed(
    n: int,
    lengths: Sequence[int],
    rates: Sequence[int],
    mixing: str,
    causal: bool,
    strategies: Sequence[tuple[ringattn.Strategy, bool]],
) -> list[dict[str, Any]]:
    b, h, d = 1, 16, 128
    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(3))
    grad = torch.randn_like(q)
    rows: list[dict[str, Any]] = []

    def record(
        name: str, fwd_ms: float, fb_ms: float, flops_f: float, flops_fb: float, peak: float
    ) -> None:
        rows.append(
            {
                "n": n,
                "mixing": mixing,
                "causal": causal,
                "variant": name,
                "fwd_ms": fwd_ms,
                "fwdbwd_ms": fb_ms,
                "fwd_tflops": tflops(flops_f, fwd_ms),
                "fwdbwd_tflops": tflops(flops_fb, fb_ms),
                "peak_gib": peak,
            }
        )
        print("speed", rows[-1], flush=True)

    def dense_fwd() -> None:
        with torch.no_grad():
            q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
            F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal)

    def dense_fb() -> None:
        q_t, k_t, v_t = (x.detach().requires_grad_().transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal)
        out.backward(grad.transpose(1, 2))

    torch.cuda.reset_peak_memory_stats()
    record(
        "dense SDPA",
        bench_ms(dense_fwd),
        bench_ms(dense_fb),
        dense_flops(b, n, h, d, causal),
        dense_flops(b, n, h, d, causal, backward=True),
        torch.cuda.max_memory_allocated() / 2**30,
    )
    uf = useful_flops(b, n, h, d, lengths, rates, causal, mixing)
    ufb = useful_flops(b, n, h, d, lengths, rates, causal, mixing, backward=True)
    for strategy, compiled in strategies:
        module = ringattn.DilatedAttention(
            lengths, rates, causal=causal, mixing=mixing, strategy=strategy, compile=compiled
        )

        def fwd(module: ringattn.DilatedAttention = module) -> None:
            with torch.no_grad():
                module(q, k, v)

        def fb(module: ringattn.DilatedAttention = module) -> None:
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            module(*xs).backward(grad)

        name = f"{strategy.dilation}/{strategy.computer}{' (compiled)' if compiled else ''}"
        try:
            t0 = time.time()
            fwd()
            fb()
            print(f"warm-up/compile {name}: {time.time() - t0:.1f}s", flush=True)
            torch.cuda.reset_peak_memory_stats()
            f_ms = bench_ms(fwd)
            fb_ms = bench_ms(fb)
            record(name, f_ms, fb_ms, uf, ufb, torch.cuda.max_memory_allocated() / 2**30)
        except Exception as exc:
            print(f"speed {name} failed: {failure(exc, 300)}", flush=True)
    dense = rows[0]
    for row in rows:
        row["fwd_vs_dense"] = row["fwd_tflops"] / dense["fwd_tflops"]
        row["fwdbwd_vs_dense"] = row["fwdbwd_tflops"] / dense["fwdbwd_tflops"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/flex_gpu"),
        help="folder for the part's .md / .json (default: %(default)s)",
    )
    add_lengths(parser, [32768])
    parser.add_argument(
        "--part",
        choices=["check", "speed", "all"],
        default="all",
        help="check: every single-device strategy against the float64 oracle; speed: flex and "
        "sdpa against dense SDPA; all (default)",
    )
    parser.add_argument(
        "--mixing",
        nargs="+",
        choices=["lse", "head_groups"],
        default=["lse"],
        help="the speed part's mixings, each its own rows (default: %(default)s)",
    )
    parser.add_argument(
        "--sdpa-forward",
        choices=CUDA_FORWARDS,
        default=SDPAComputer.cuda_forward,
        help="SDPAComputer.cuda_forward of every sdpa row (auto: FA4's forward where it runs)",
    )
    args = parser.parse_args(argv)
    require_positive(parser, args, "n")  # (torch's error in the speed part, after the check)
    require_cuda(parser.prog)
    make_out(parser, args.out)
    SDPAComputer.cuda_forward = args.sdpa_forward
    device = torch.device("cuda")
    header = f"{torch.cuda.get_device_name()} | torch {torch.__version__}"
    check = correctness(device) if args.part in ("check", "all") else []
    lengths, rates = (2048, 4096, 8192), (1, 2, 4)
    strategies = [
        (ringattn.Strategy(dilation="segment_local", computer="sdpa"), False),
        (ringattn.Strategy(dilation="global", computer="sdpa"), False),
        (ringattn.Strategy(dilation="global", computer="flex"), True),
        (ringattn.Strategy(dilation="segment_local", computer="flex"), True),
    ]
    speed_rows, fractions = [], {}
    for n in args.n if args.part in ("speed", "all") else []:
        for causal in (False, True):
            for mixing in args.mixing:
                speed_rows += speed(n, lengths, rates, mixing, causal, strategies)
            fractions[f"n={n} causal={causal}"] = block_fractions(n, lengths, rates, causal)
    # the command as given (it said `--n 32768` of every --part check run, and left out
    # --part and --sdpa-forward)
    given = " ".join(sys.argv[1:] if argv is None else argv)
    report = [
        f"# flex / sdpa on {header}",
        "",
        f"Command: `python -m experiments.flex_gpu {given}`",
        "",
        f"Speed: bf16, b=1, h=16, d=128, segment_lengths={lengths}, dilation_rates={rates}, "
        f"mixing={', '.join(args.mixing)}. Useful TFLOP/s counts only the pairs the definition "
        "computes (ringattn.flops); dense SDPA counts all (causal: lower triangle).",
        "",
        dict_rows_to_markdown(
            speed_rows,
            [
                "n",
                "mixing",
                "causal",
                "variant",
                "fwd_ms",
                "fwd_tflops",
                "fwd_vs_dense",
                "fwdbwd_ms",
                "fwdbwd_tflops",
                "fwdbwd_vs_dense",
                "peak_gib",
            ],
        ),
        "",
        "## Fraction of tiles visited by the flex block masks (`lse`, h=16, block 128)",
        "",
        "```",
        json.dumps(fractions, indent=1),
        "```",
        "",
    ]
    if check:
        bad = [r for r in check if not r["ok"]]
        report += [
            f"## Correctness vs the float64 oracle: {len(check) - len(bad)}/{len(check)} ok",
            "",
            dict_rows_to_markdown(
                check,
                [
                    "strategy",
                    "compile",
                    "n",
                    "heads",
                    "mixing",
                    "causal",
                    "dtype",
                    "fwd_err",
                    "grad_err",
                    "ok",
                    "error",
                ],
            ),
            "",
        ]
    text = "\n".join(report)
    (args.out / f"flex_gpu_{args.part}.md").write_text(text)
    (args.out / f"flex_gpu_{args.part}.json").write_text(
        json.dumps(
            {"device": header, "speed": speed_rows, "fractions": fractions, "check": check},
            indent=1,
        )
    )
    print(text)


if __name__ == "__main__":
    main()
