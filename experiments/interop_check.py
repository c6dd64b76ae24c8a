"""Do torch's autocast, FlopCounterMode and profiler see a call as documented? (GPU; CPU too)

    python -m experiments.interop_check [--n 16384] [--out DIR]

Stop 80's reviews changed what three of torch's tools see, on the CPU; this runs the same on
the GPU's kernels (FA4 where installed), issue 5's configs cut to ``--n``, both mixings, causal
and not, ``segment_local/sdpa/pooled``:

* ``autocast``: float32 q, k, v under ``torch.autocast(device, bfloat16)`` (q float32 and k, v
  bf16 too, as an autocast projection hands them): the output's dtype (bf16) and its error
  against the float64 oracle, and the same bits as the call on inputs cast beforehand;
* ``flops``: ``torch.utils.flop_counter.FlopCounterMode`` around a forward+backward counts
  ``ringattn.flops.useful_flops`` (x3.5), and the counted call gives the uncounted one's output
  bits and its gradients within float32's tolerance (the GPU's backward sums in no fixed order);
* ``profiler``: ``torch.profiler`` shows ``ringattn::dilated_forward`` / ``dilated_backward``.

Prints a table, writes ``interop_check.{json,md}`` under ``--out``; exit 1 where a row fails.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import ringattn
from experiments import (
    add_device_option,
    add_heads,
    issue_configs,
    make_out,
    require_device,
    require_positive,
    same_bits,
)
from experiments.ablate import dict_rows_to_markdown, rel_err
from experiments.bench import with_grads
from ringattn import reference
from ringattn.flops import useful_flops


def measure(mixing: str, causal: bool, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    lengths, rates = issue_configs(args.n)
    attn = ringattn.DilatedAttention(
        lengths,
        rates,
        causal=causal,
        mixing=mixing,
        strategy=ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="pooled"),
    )
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.n, args.heads, args.dim)
    q, k, v, dout = (torch.randn(shape, device=device, generator=gen) for _ in range(4))
    low = torch.bfloat16
    row: dict[str, Any] = {"mixing": mixing, "causal": causal}
    with torch.autocast(device.type, dtype=low):
        mixed = with_grads(attn, q, k.to(low), v.to(low), dout.to(low))
        autocast = with_grads(attn, q, k, v, dout.to(low))
    cast = with_grads(attn, q.to(low), k.to(low), v.to(low), dout.to(low))
    ref = reference.dilated_attention(
        q.double(),
        k.double(),
        v.double(),
        segment_lengths=lengths,
        dilation_rates=rates,
        causal=causal,
        mixing=mixing,
    )
    row["autocast_dtype"] = str(autocast[0].dtype).removeprefix("torch.")
    row["autocast_err"] = rel_err(autocast[0], ref)
    row["autocast_same"] = same_bits(autocast[:1], cast[:1]) and same_bits(mixed[:1], cast[:1])
    row["grad_dtypes_kept"] = all(g.dtype == torch.float32 for g in autocast[1:])
    plain = with_grads(attn, q, k, v, dout)
    with FlopCounterMode(display=False) as counter:
        counted = with_grads(attn, q, k, v, dout)
    want = useful_flops(1, args.n, args.heads, args.dim, lengths, rates, causal, mixing, True)
    row["flops_vs_useful"] = counter.get_total_flops() / want
    # the output bit for bit; the gradients within float32's tolerance of the uncounted call's,
    # since the GPU's backward kernels accumulate dq / dk / dv in no fixed order (a counted call
    # and an uncounted one differed in their gradients' last bits, on an H100, step 87)
    row["counted_same"] = same_bits(counted[:1], plain[:1])
    row["counted_grad_err"] = max(rel_err(c, p) for c, p in zip(counted[1:], plain[1:]))
    with torch.profiler.profile() as prof:
        with_grads(attn, q, k, v, dout)
    names = {event.name for event in prof.events()}
    row["profiler_names"] = all(
        f"ringattn::dilated_{part}" in names for part in ("forward", "backward")
    )
    row["ok"] = (
        row["autocast_dtype"] == "bfloat16"
        and row["autocast_err"] < 2e-2
        and row["autocast_same"]
        and row["grad_dtypes_kept"]
        and row["flops_vs_useful"] == 1.0
        and row["counted_same"]
        and row["counted_grad_err"] <= reference.TOLERANCE[torch.float32]
        and row["profiler_names"]
    )
    print(json.dumps(row), flush=True)
    return row


def check_main(
    argv: list[str] | None,
    doc: str,
    name: str,
    default_n: int,
    measure_rows: Callable[[argparse.Namespace], list[dict[str, Any]]],
    more_options: Callable[[argparse.ArgumentParser], None] = lambda p: None,
) -> int:
    """A GPU check's command line (``--n --heads --dim --device --out``, and ``more_options``):
    its rows, each with ``ok``, printed and written to ``NAME.{json,md}`` under ``--out``; 1
    where a row fails."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument(
        "--n", type=int, default=default_n, help="sequence length (default: %(default)s)"
    )
    add_heads(p)
    add_device_option(p)
    more_options(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path(f"results/{name}"),
        help=f"folder for {name}.{{json,md}} (default: %(default)s)",
    )
    args = p.parse_args(argv)
    require_positive(p, args, "n", "heads", "dim")
    require_device(p, args)
    make_out(p, args.out)
    rows = measure_rows(args)
    meta = {"torch": torch.__version__, "device": args.device, "n": args.n}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    table = dict_rows_to_markdown(rows, list(rows[0]))
    (args.out / f"{name}.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(table)
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
        return [measure(m, c, args) for m in ("head_groups", "lse") for c in (False, True)]

    return check_main(argv, __doc__, "interop_check", 16384, rows)


if __name__ == "__main__":
    raise SystemExit(main())
