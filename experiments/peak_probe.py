"""Where a first forward+backward's peak memory goes (CUDA only).

Step 70 (an H100, 80 GB): in ``gpu_session.sh long`` at 2M tokens, ``lse``'s forward+backward on
FA4's backward ran out of memory, where ``head_groups`` before it and ``lse`` on torch's kernels
fitted. This runs the steps given in a fresh process, in order, and prints for each the peak
above the inputs (in ``[b, n, h, d]`` tensors) of its first forward, and of that forward and a
first forward+backward, what stayed allocated after it (a module and its outputs gone), and
where one ran out of memory: the request and the frames of ringattn and FA4 that made it (which
found the check in ``fa4_add._first_call``). With ``--history``, PyTorch's allocator history is
recorded and the allocations alive at each peak are summed by the innermost such frame that made
them (on torch 2.11 that segfaulted in autograd's thread with FA4's backward)::

    python -m experiments.peak_probe --n 2097152 --steps lse head_groups lse --out $OUT/peak

A step is ``MIXING`` (the bench's default strategy), with ``:causal`` for causal attention and
``:torch`` for torch's kernels both ways (the bench's ``[torch kernels]`` row)."""

from __future__ import annotations

import argparse
import gc
import json
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import ringattn
from experiments import ISSUE_LENGTHS, ISSUE_RATES, make_out, require_cuda
from experiments.bench import with_computer

GIB = 1024**3
LIBRARY = ("/ringattn/", "/flash_attn/")


def site(frames: list[dict[str, Any]]) -> str:
    """The innermost frames of ringattn or FA4 that made an allocation (three at most)."""
    ours = [f for f in frames if any(part in f["filename"] for part in LIBRARY)]
    where = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:3]]
    return " < ".join(where) or "(outside the library)"


def live_at_peak(
    trace: list[dict[str, Any]], start: int
) -> tuple[int, dict[str, int], list[dict[str, Any]]]:
    """Replays the allocator's trace: the most bytes alive from event ``start`` on, those
    bytes by site, and the out-of-memory events from ``start`` on."""
    live: dict[int, tuple[int, list[dict[str, Any]]]] = {}
    total, peak, peak_at = 0, -1, start
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if index >= start and total > peak:
            peak, peak_at = total, index
    live.clear()
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    by_site: dict[str, int] = defaultdict(int)
    for size, frames in live.values():
        by_site[site(frames)] += size
    ooms = [e for e in trace[start:] if e["action"] == "oom"]
    return peak, dict(by_site), ooms


def module(step: str) -> ringattn.DilatedAttention:
    """The bench's default strategy for ``step``, on torch's kernels both ways for ``:torch``
    (its ``[torch kernels]`` row's settings)."""
    mixing, *flags = step.split(":")

    def make(mixing: str, causal: bool) -> ringattn.DilatedAttention:
        strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="pooled")
        return ringattn.DilatedAttention(
            ISSUE_LENGTHS, ISSUE_RATES, causal=causal, mixing=mixing, strategy=strategy
        )

    if "torch" in flags:
        make = with_computer(make, cuda_forward="torch", cuda_backward="torch")
    return make(mixing, "causal" in flags)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2097152, help="tokens (default: 2097152)")
    p.add_argument(
        "--steps",
        nargs="+",
        default=["lse", "head_groups", "lse"],
        help="MIXING[:causal][:torch], run in order (default: lse head_groups lse)",
    )
    p.add_argument(
        "--history",
        action="store_true",
        help="record the allocator's history, for the allocations alive at each peak by frame "
        "(on torch 2.11 with FA4's backward this segfaulted in autograd's thread)",
    )
    p.add_argument("--out", type=Path, default=Path("results/peak_probe"), help="output folder")
    args = p.parse_args(argv)
    require_cuda("peak_probe")
    make_out(p, args.out)
    if args.history:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    device = torch.device("cuda")
    q, k, v, dout = (
        torch.randn(1, args.n, 16, 128, device=device, dtype=torch.bfloat16) for _ in range(4)
    )
    unit = q.numel() * q.element_size()
    inputs = torch.cuda.memory_allocated()
    results = []
    for step in args.steps:
        start = len(torch.cuda.memory._snapshot()["device_traces"][0]) if args.history else 0
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        attention = module(step)
        error, forward_peak = "", 0
        try:
            with torch.no_grad():
                attention(q, k, v)
            torch.cuda.synchronize()
            forward_peak = torch.cuda.max_memory_allocated()
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            attention(*xs).backward(dout)
            del xs
        except torch.OutOfMemoryError as exc:
            # the first sentence and the request ("Tried to allocate 2.00 GiB"), then the frames
            # of ringattn and FA4 that asked for it
            error = ". ".join(str(exc).split(". ")[:2])
            frames = traceback.extract_tb(exc.__traceback__)
            error += " at " + " > ".join(
                f"{Path(f.filename).name}:{f.lineno} {f.name}"
                for f in frames
                if any(part in f.filename for part in LIBRARY)
            )
        torch.cuda.synchronize()
        del attention
        gc.collect()
        peak, by_site, ooms = (
            torch.cuda.max_memory_allocated(),
            dict[str, int](),
            list[dict[str, Any]](),
        )
        if args.history:
            peak, by_site, ooms = live_at_peak(
                torch.cuda.memory._snapshot()["device_traces"][0], start
            )
        row = {
            "step": step,
            "before_units": (before - inputs) / unit,
            "forward_peak_units": (forward_peak - inputs) / unit,
            "peak_units": (peak - inputs) / unit,
            "after_units": (torch.cuda.memory_allocated() - inputs) / unit,
            "oom": error,
            "oom_requests_gib": [e["size"] / GIB for e in ooms],
            "at_peak_gib": {
                name: size / GIB
                for name, size in sorted(by_site.items(), key=lambda item: -item[1])[:12]
            },
        }
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    (args.out / "peak_probe.json").write_text(json.dumps(results, indent=1))
    print("| step | held before | forward peak | peak above inputs | held after | out of memory |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['step']} | {row['before_units']:.2f} | {row['forward_peak_units']:.2f} | "
            f"{row['peak_units']:.2f} | {row['after_units']:.2f} | {row['oom'] or 'no'} |"
        )
    print(f"(in [b, n, h, d] tensors of {unit / GIB:.2f} GiB; the inputs q, k, v, dout are 4)")


if __name__ == "__main__":
    main()
