"""Does a module-level switch flipped on a live module take effect on its next call? (GPU; CPU too)

    python -m experiments.switch_check [--n 32768] [--switches SWITCH ...]
        [--mixing head_groups|lse] [--causal yes|no|both] [--batch 1] [--out DIR]

Stop 86 put the FA4 grouped kernels' switches (``fa4_group.PERSISTENT`` / ``ALL_TILES_MAX``,
``fa4_group_bwd.ZEROING`` / ``ALL_TILES_MAX``) and ``launches.FUSE_OFFSETS`` / ``PER_ENTRY`` and
``pattern.BLOCK_SPLIT`` in the keys of what a module prepares, shown on the CPU's stand-ins.
This runs them on the GPU's kernels: per switch, a module of issue 5's configs (cut to
``--n``; ``--mixing``, default ``head_groups``; ``--causal``, default causal;
``segment_local/sdpa/pooled``, bf16) makes a forward+backward, the switch is flipped, and the
same module's second call after the flip is profiled against a new
module's second call under the flip. Columns:

* ``flip_changes``: the new module's kernels differ from the live module's before the flip (so
  the comparison can fail; False: the flip does nothing on this device);
* ``live_as_new``: the live module runs the same kernels as the new one, counted by name and
  grid on the GPU (a persistent grid and one CTA per tile share a kernel name) and by name on
  the CPU;
* ``out_err``: the live module's output against the float64 oracle; ``grad_err``: its
  gradients against the new module's (bf16's tolerance for both).

Prints a table, writes ``switch_check.{json,md}`` under ``--out``; exit 1 where a row fails.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import ringattn
from experiments import CAUSALITY, issue_configs
from experiments.ablate import rel_err
from experiments.bench import with_grads
from experiments.interop_check import check_main
from ringattn import launches, pattern, reference
from ringattn.kernels import fa4_group, fa4_group_bwd

# (owner, name, flipped value): each away from its default
FLIPS: tuple[tuple[Any, str, Any], ...] = (
    (fa4_group, "ALL_TILES_MAX", 0),
    (fa4_group, "PERSISTENT", "never"),
    (fa4_group_bwd, "ZEROING", "never"),
    (fa4_group_bwd, "ALL_TILES_MAX", 0),
    (launches, "FUSE_OFFSETS", False),
    (launches, "PER_ENTRY", False),
    (pattern, "BLOCK_SPLIT", 1),
)


def kernels(attn: torch.nn.Module, xs: list[torch.Tensor], device: torch.device) -> Counter[str]:
    """The kernels (CUDA: name and grid) or operators (CPU: name) one forward+backward runs,
    counted."""
    with torch.profiler.profile() as prof:
        with_grads(attn, *xs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    if device.type != "cuda":
        return Counter(e.name for e in prof.events())
    # (a kernel's grid is in the trace's events only, not in prof.events())
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return Counter(
        f"{e['name']} grid={e.get('args', {}).get('grid')}"
        for e in events
        if e.get("cat") == "kernel"
    )


def measure(
    owner: Any, name: str, value: Any, mixing: str, causal: bool, args: argparse.Namespace
) -> dict[str, Any]:
    device = torch.device(args.device)
    lengths, rates = issue_configs(args.n)

    def module() -> torch.nn.Module:
        strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="pooled")
        return ringattn.DilatedAttention(
            lengths, rates, causal=causal, mixing=mixing, strategy=strategy
        )

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.n, args.heads, args.dim)
    xs = [torch.randn(shape, device=device, generator=gen, dtype=torch.bfloat16) for _ in "qkvo"]
    live = module()
    with_grads(live, *xs)
    before = kernels(live, xs, device)
    kept = getattr(owner, name)
    setattr(owner, name, value)
    try:
        with_grads(live, *xs)  # the flip's first call: prepared anew (and checked) where keyed
        after = kernels(live, xs, device)
        live_out = with_grads(live, *xs)
        new = module()
        with_grads(new, *xs)
        fresh = kernels(new, xs, device)
        new_out = with_grads(new, *xs)
    finally:
        setattr(owner, name, kept)
    q, k, v, _ = (x.double() for x in xs)
    ref = reference.dilated_attention(
        q, k, v, segment_lengths=lengths, dilation_rates=rates, causal=causal, mixing=mixing
    )
    row: dict[str, Any] = {"switch": f"{switch_name(owner, name)}={value!r}"}
    row.update(mixing=mixing, causal=causal)
    row["flip_changes"] = fresh != before
    row["live_as_new"] = after == fresh
    row["kernels"] = sum(fresh.values())
    row["out_err"] = rel_err(live_out[0], ref)
    row["grad_err"] = max(rel_err(a, b) for a, b in zip(live_out[1:], new_out[1:]))
    bound = reference.TOLERANCE[torch.bfloat16]
    row["ok"] = row["live_as_new"] and row["out_err"] < bound and row["grad_err"] < bound
    print(json.dumps(row), flush=True)
    return row


def switch_name(owner: Any, name: str) -> str:
    return f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"


def main(argv: list[str] | None = None) -> int:
    names = [switch_name(owner, name) for owner, name, _ in FLIPS]

    def switches(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--switches",
            nargs="+",
            choices=names,
            default=names,
            metavar="SWITCH",
            help="the switches to flip, of: %(choices)s (default: all)",
        )
        p.add_argument(
            "--mixing",
            nargs="+",
            choices=["head_groups", "lse"],
            default=["head_groups"],
            help="the modules' mixings (default: %(default)s)",
        )
        p.add_argument(
            "--batch",
            type=int,
            default=1,
            help="batch size (default: %(default)s; launches.PER_ENTRY acts at 2 or more)",
        )
        p.add_argument(
            "--causal",
            choices=list(CAUSALITY),
            default="yes",
            help="causal modules, non-causal or both (default: %(default)s)",
        )

    def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
        if args.batch < 1:
            raise SystemExit(f"switch_check: error: --batch must be at least 1, got {args.batch}")
        return [
            measure(owner, name, value, mixing, causal, args)
            for mixing in args.mixing
            for causal in CAUSALITY[args.causal]
            for owner, name, value in FLIPS
            if switch_name(owner, name) in args.switches
        ]

    return check_main(argv, __doc__, "switch_check", 32768, rows, switches)


if __name__ == "__main__":
    raise SystemExit(main())
