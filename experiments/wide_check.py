"""Do the GPU's kernels address tensors of more than 2^31 elements through a transposed q? (GPU)

    python -m experiments.wide_check [--n 1048576] [--heads 16] [--dim 128] [--need-backward]
        [--out DIR]

Stop 80 found the Triton kernels forming ``head * stride`` in int32: with q, k, v given as
``[b, h, n, d]`` tensors transposed to ``[b, n, h, d]`` (a head's stride ``n * d``), heads from
``2^31 / (n * d)`` on were read and written before their tensor (now int64, tested under the
Triton interpreter). FA4's and the grouped kernels' CuTe strides are 64-bit by CUTLASS's
documentation, unchecked on a GPU until this.

Per mixing, a module of issue 5's configs (cut to ``--n``; or ``--segments`` / ``--rates``;
``segment_local/sdpa``, bf16) runs a forward+backward on such inputs (b = 1; at 1M tokens and 32
heads, 2^32 elements, 8 GiB a tensor), and its last ``max(segment_lengths)`` rows, every head,
are checked against the float64 oracle run on those rows alone: every config's segments lie
whole inside them, so the oracle of the slice is the slice of the oracle, and so are the
gradients where ``dout`` is zero outside it. Columns:

* ``elements``: b·n·h·d; ``past_int32``: whether offsets pass 2^31 - 1 (else the row cannot fail
  for it: at n = 1M and d = 128 that takes 32 heads, as ``gpu_session.sh wide`` runs);
* ``last_head_offset``: the last head's first element, from the storage's start;
* ``out_err``, ``grad_err`` (the worst of dq, dk, dv) against the oracle; ``backward``: "ran",
  or "out of memory", which fails the row only with ``--need-backward``.

Prints a table, writes ``wide_check.{json,md}`` under ``--out``; exit 1 where a row fails.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import ringattn
from experiments import issue_configs, worst
from experiments.ablate import rel_err
from experiments.interop_check import check_main
from ringattn import reference


def measure(mixing: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    lengths, rates = issue_configs(args.n)
    if args.segments:
        lengths, rates = tuple(args.segments), tuple(args.rates)
    window = max(lengths)  # (the last rows: every config's segments lie whole inside them)
    attn = ringattn.DilatedAttention(
        lengths,
        rates,
        mixing=mixing,
        # (no pool: the oracle below needs the memory a pool would keep after the call)
        strategy=ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="none"),
    )
    gen = torch.Generator(device=device).manual_seed(0)
    heads_first = (1, args.heads, args.n, args.dim)
    # [b, h, n, d] storage seen as [b, n, h, d]: a head's stride is n * d
    q, k, v = (
        torch.randn(heads_first, device=device, dtype=torch.bfloat16, generator=gen)
        .transpose(1, 2)
        .requires_grad_()
        for _ in "qkv"
    )
    row: dict[str, Any] = {"mixing": mixing, "elements": q.numel()}
    row["past_int32"] = q.numel() - 1 > torch.iinfo(torch.int32).max  # (else it cannot fail)
    row["last_head_offset"] = (args.heads - 1) * q.stride(2)
    tail = slice(args.n - window, args.n)
    out = attn(q, k, v)
    out_tail = out.detach()[:, tail].double()
    dout = torch.zeros_like(out)
    dout[:, tail].normal_(generator=gen)
    try:
        grads_tail = [g[:, tail].double() for g in torch.autograd.grad(out, (q, k, v), dout)]
        row["backward"] = "ran"
    except torch.OutOfMemoryError:
        grads_tail, row["backward"] = [], "out of memory"
    dout_tail = dout[:, tail].double()
    del out, dout
    inputs = [x.detach()[:, tail].double().requires_grad_() for x in (q, k, v)]
    want = reference.dilated_attention(
        *inputs, segment_lengths=lengths, dilation_rates=rates, mixing=mixing
    )
    row["out_err"] = rel_err(out_tail, want)
    row["grad_err"] = float("nan")
    if grads_tail:
        want_grads = torch.autograd.grad(want, inputs, dout_tail)
        row["grad_err"] = worst(rel_err(g, w) for g, w in zip(grads_tail, want_grads))
    bound = reference.TOLERANCE[torch.bfloat16]
    grad_ok = row["grad_err"] < bound if grads_tail else not args.need_backward
    row["ok"] = row["out_err"] < bound and grad_ok
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--segments",
            type=int,
            nargs="+",
            help="segment lengths, each dividing the longest (default: issue 5's, cut to --n)",
        )
        p.add_argument("--rates", type=int, nargs="+", help="dilation rates, with --segments")
        p.add_argument(
            "--need-backward",
            action="store_true",
            help="fail a row whose backward ran out of memory (default: only report it)",
        )

    def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
        if (args.segments is None) != (args.rates is None):
            raise SystemExit("wide_check: error: --segments and --rates go together")
        if args.segments and any(max(args.segments) % w for w in args.segments):
            # (else a segment would cross into the checked rows from before them)
            raise SystemExit("wide_check: error: every --segments length must divide the longest")
        return [measure(mixing, args) for mixing in ("lse", "head_groups")]

    return check_main(argv, __doc__, "wide_check", 1 << 20, rows, options)


if __name__ == "__main__":
    raise SystemExit(main())
