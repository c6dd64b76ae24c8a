"""Do ``torch.use_deterministic_algorithms(True)``'s runs give the same bits? (GPU; CPU runs too)

    python -m experiments.determinism_check [--n 32768] [--check-n 32768] [--repeats 5]
        [--paths fa4 cudnn cudnn_op flash] [--dtype bfloat16] [--out DIR]

For each of ``sdpa``'s kernel paths on CUDA (``fa4``: the defaults, FlashAttention-4 where it is
installed; ``cudnn``: torch's kernels, cuDNN through its frontend where that is installed;
``cudnn_op``: torch's cuDNN op, ``in_place = False``; ``flash``: FlashAttention-2; with
``--dtype float32`` on CUDA the one ``efficient`` path, torch's memory-efficient attention, which
every setting picks for float32; on a CPU the one ``cpu`` path), both mixings, causal and not,
with the mode off and on: issue 5's shape (``segment_local/sdpa``, ``pooled``) forward+backward
three times on the same inputs, and

* whether the output and the three gradients are bit-identical over the three runs (``same``),
  and how many elements of them differ from the first run's at most (``differ``);
* the median forward+backward ms (``--repeats`` after one warm-up), and with the mode on its
  ratio to the mode off (what determinism costs);
* the largest relative error of output and gradients against the float64 oracle at
  ``--check-n`` (``experiments.bench.check``; 0 skips it).

Prints a table and writes ``determinism_check.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ringattn
from experiments import (
    ISSUE_LENGTHS,
    ISSUE_RATES,
    add_device_option,
    add_heads,
    bits,
    deterministic_algorithms,
    fixed_cublas_workspace,
    make_out,
    require_device,
    require_positive,
)
from experiments.ablate import dict_rows_to_markdown, median_ms
from experiments.bench import check, with_grads
from ringattn.kernels import fa4

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# each path's SDPAComputer settings (instance attributes of the module's computer)
CUDA_PATHS: dict[str, dict[str, object]] = {
    "fa4": {},
    "cudnn": {"cuda_forward": "torch", "cuda_backward": "torch"},
    "cudnn_op": {"cuda_forward": "torch", "cuda_backward": "torch", "in_place": False},
    "flash": {"cuda_backend": "flash"},
}


def make_module(
    mixing: str, causal: bool, settings: dict[str, object], args: argparse.Namespace
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    module = ringattn.DilatedAttention(
        args.lengths,
        args.rates,
        causal=causal,
        mixing=mixing,
        strategy=ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="pooled"),
    )
    for name, value in settings.items():
        setattr(module.computer, name, value)
    return module


def differing(runs: list[list[torch.Tensor]]) -> int:
    """The most elements of one result (the output or a gradient) whose bits a later run has
    other than the first run's."""
    first = runs[0]
    return max(
        int((bits(x) != bits(y)).sum()) for run in runs[1:] for x, y in zip(first, run, strict=True)
    )


def measure(
    path: str,
    mixing: str,
    causal: bool,
    deterministic: bool,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    settings = CUDA_PATHS.get(path, {})
    row: dict[str, Any] = {
        "path": path,
        "mixing": mixing,
        "causal": causal,
        "deterministic": deterministic,
    }
    try:
        with deterministic_algorithms(deterministic):
            module = make_module(mixing, causal, settings, args)
            gen = torch.Generator(device=device).manual_seed(0)
            shape = (1, args.n, args.heads, args.dim)
            q, k, v, dout = (
                torch.randn(shape, device=device, dtype=args.dtype, generator=gen) for _ in range(4)
            )
            runs = [with_grads(module, q, k, v, dout) for _ in range(3)]
            row["differ"] = differing(runs)
            row["same"] = row["differ"] == 0
            del runs
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]

            def step() -> None:
                module(*leaves).backward(dout)

            row["fwdbwd_ms"] = median_ms(step, device, 1, args.repeats)
            if args.check_n:
                row["oracle_err"] = check(module, mixing, causal, args, device)
    except Exception as exc:  # (a failing row is reported; the others still run)
        row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32768, help="sequence length (default: %(default)s)")
    p.add_argument(
        "--lengths", type=int, nargs="+", default=list(ISSUE_LENGTHS), help="segment lengths"
    )
    p.add_argument("--rates", type=int, nargs="+", default=list(ISSUE_RATES), help="dilation rates")
    add_heads(p)
    p.add_argument(
        "--check-n", type=int, default=32768, help="the oracle check's n (0: none; %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed calls per row (default: %(default)s)"
    )
    p.add_argument(
        "--paths",
        nargs="+",
        choices=list(CUDA_PATHS),
        default=None,
        help="CUDA kernel paths (default: all)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="bfloat16 (the default on CUDA), float16 or float32 (the default on a CPU)",
    )
    add_device_option(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/determinism_check"),
        help="folder for determinism_check.{json,md} (default: %(default)s)",
    )
    args = p.parse_args(argv)
    require_positive(p, args, "n", "lengths", "rates", "heads", "dim", "repeats")
    if args.check_n < 0:
        p.error(f"--check-n must be >= 0, got {args.check_n}")
    require_device(p, args)
    make_out(p, args.out)  # (before any row: a folder it cannot make lost the run's rows)
    fixed_cublas_workspace()  # (before any CUDA work)
    device = torch.device(args.device)
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    args.dtype = DTYPES[args.dtype or default_dtype]
    args.batch, args.lengths, args.rates = 1, tuple(args.lengths), tuple(args.rates)
    # (batch, lengths, rates, dtype: what bench.check reads)
    if device.type == "cuda" and args.dtype == torch.float32:
        paths = ["efficient"]  # (FA4, cuDNN and FlashAttention-2 take no float32)
    elif device.type == "cuda":
        paths = list(args.paths or CUDA_PATHS)
        probe = torch.empty(1, 2, 1, args.dim, device=device, dtype=args.dtype)
        if "fa4" in paths and not fa4.available(probe):
            print("fa4: FlashAttention-4 is not available here; that path is left out")
            paths.remove("fa4")
    else:
        paths = ["cpu"]
    rows = [
        measure(path, mixing, causal, deterministic, args, device)
        for path in paths
        for mixing in ("head_groups", "lse")
        for causal in (False, True)
        for deterministic in (False, True)
    ]
    for off, on in zip(rows[::2], rows[1::2], strict=True):
        if "fwdbwd_ms" in off and "fwdbwd_ms" in on:
            on["cost"] = round(on["fwdbwd_ms"] / off["fwdbwd_ms"], 3)
    command = [
        "python",
        "-m",
        "experiments.determinism_check",
        *(sys.argv[1:] if argv is None else argv),
    ]
    meta = {
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(args.dtype),
        "n": args.n,
        "command": command,
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    (args.out / "determinism_check.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    columns = ["path", "mixing", "causal", "deterministic", "same", "differ", "fwdbwd_ms", "cost"]
    table = dict_rows_to_markdown(rows, [*columns, "oracle_err", "error"])
    (args.out / "determinism_check.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(table)
    failed = [r for r in rows if r["deterministic"] and not r.get("same")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
