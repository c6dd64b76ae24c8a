"""Where memory and time go outside the kernels: per-call peaks, backward split, CUDA graphs.

    python -m experiments.overheads                       # issue 5's shape, 32K and 128K
    python -m experiments.overheads --n 131072 --split 1 4 8 16 --trace

For each ``n``, mixing, ``ringattn.pattern.BLOCK_SPLIT`` value and A/B choice (``--in-place``: cuDNN
writes placed blocks into their rows or torch's op and a copy; ``--fill``: head_groups zeroes only
the pairs no block writes, or the whole tensor; ``--lanes``: when a disjoint plan's configs run on
concurrent CUDA streams, ``ringattn.lanes.MODE``; ``--lane-count``: how many streams,
``ringattn.lanes.LANES``; ``--fuse``: lse launches a config's offsets as runs,
``ringattn.launches.FUSE_OFFSETS``; ``--add``: lse adds gradients with the Triton kernel or torch's
``add_``; ``--compile``: the module eager or ``compile=True``; ``--backward``: ``sdpa``'s backward
through FlashAttention-4 where installed, or torch's kernels; ``--forward``: the same for the
forward; ``--replay``: FA4's launches replayed, ``ringattn.kernels.fa4.REPLAY``, or through its
Python launcher every call; ``--bwd-merge``: FA4's placed backward in parts that many times the
plan's, ``SDPAComputer.fa4_backward_merge``; ``--zero``: head_groups' FA4 forward zeroes the rows
its config leaves out, ``ringattn.kernels.fa4_zero.ENABLED``; ``--pack-lse``: the backward's LSE
gathered once per call or copied per launch, ``ringattn.core.PACK_LSE``; ``--group``: head_groups'
configs in one FA4 forward or one per config, ``ringattn.kernels.fa4_group.ENABLED``), times forward
and forward+backward of ``segment_local/sdpa`` and measures their peak memory relative to the
tensors the call cannot avoid (as ``experiments.bench`` does). Every choice must compute one
function: each row's ``vs_first_err`` is the largest relative error of its output and gradients
against those of the first choice (of its ``n`` and mixing). With ``--trace`` it also logs every
kernel call of one forward+backward: the block's shape, the bytes it allocates transiently (peak
above the level before it) and what stays allocated after it, so the largest transient is named.
``--steady`` also times 10 calls back to back (no sync between them, as in a model's steady state)
and the host's own time per call. ``--graphs`` also times the same calls replayed from CUDA graphs
(forward captured with ``torch.cuda.graph``, forward+backward through
``torch.cuda.make_graphed_callables``): what the launches and the Python work around the kernels
cost. ``--ceiling`` times the plan's kernel calls alone (each distinct block shape on contiguous
inputs, times how often the plan calls it) next to dense SDPA at the same ``n``: the fraction of
dense throughput the block kernels themselves reach, which bounds what any merge or copy schedule
around them can reach. Prints a table last; writes ``overheads.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

import ringattn
from experiments import (
    ISSUE_LENGTHS,
    ISSUE_RATES,
    add_heads,
    add_lengths,
    add_mixings,
    make_out,
    require_cuda,
    worst,
)
from experiments.ablate import dict_rows_to_markdown, median_ms, queued_host_ms, rel_err
from experiments.bench import (
    failure,
    fwd_and_fwdbwd,
    graphed_calls,
    time_and_memory,
    with_grads,
)
from experiments.fa4_probe import BACKWARD_TILES
from ringattn import core, lanes, launches, pattern
from ringattn.computers.sdpa import CUDA_BACKWARDS, CUDA_FORWARDS, SDPAComputer
from ringattn.config import MIXINGS
from ringattn.flops import dense_flops, tflops, useful_flops
from ringattn.kernels import add as add_kernel
from ringattn.kernels import cudnn_graphs, fa4, fa4_group, fa4_group_bwd, fa4_zero

# how the core adds a merged block's gradients into their rows (False: "not done", torch's add_)
ADDS = {"triton": add_kernel.add_rows_, "torch": lambda accs, parts: False}

# the gradients' buffers of a disjoint (head_groups) plan's backward: new (only the pairs no
# block writes zeroed, by the Triton kernel or the launches themselves), or zeroed whole first
FILLS = {
    "unselected": core.new_grads,
    "whole": lambda q, count, buffers: tuple(
        torch.zeros((count, *q.shape), dtype=q.dtype, device=q.device) for _ in range(buffers)
    ),
}


def default_first(default: str, choices: Iterable[str]) -> list[str]:
    """An A/B axis's choices with the library's current setting first (the default run)."""
    return [default, *(choice for choice in choices if choice != default)]


def traced_calls(fn: Callable[[], object], unit: int) -> list[dict[str, Any]]:
    """Run ``fn`` once with every SDPAComputer call logged (bytes in units of one [b,n,h,d])."""
    calls: list[dict[str, Any]] = []
    originals = {name: getattr(SDPAComputer, name) for name in ("forward", "backward")}

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def logged(self: SDPAComputer, *args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = original(self, *args, **kwargs)
            torch.cuda.synchronize()
            q = args[1] if name == "backward" else args[0]
            calls.append(
                {
                    "call": name,
                    "rows": tuple(q.shape[:3]),
                    "strides": tuple(q.stride()),
                    "transient": (torch.cuda.max_memory_allocated() - before) / unit,
                    "kept": (torch.cuda.memory_allocated() - before) / unit,
                    "level_after": torch.cuda.memory_allocated() / unit,
                }
            )
            return result

        return logged

    try:
        for name in originals:
            setattr(SDPAComputer, name, wrap(name))
        fn()
    finally:
        for name, original in originals.items():
            setattr(SDPAComputer, name, original)
    return calls


def steady_times(
    fwd: Callable[[], object],
    fwdbwd: Callable[[], object],
    device: torch.device,
    repeats: int,
    calls: int = 10,
) -> dict[str, float]:
    """Back-to-back ms per call (no sync between calls: the host runs ahead, as in a model) and the
    host's own ms per call (wall time of one call issued while the GPU is still busy, so nothing
    waits for it): where the host's time exceeds the GPU's, the call is host-bound."""
    result: dict[str, float] = {}
    for part, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        result[f"{part}_ms_b2b"] = median_ms(fn, device, 1, repeats, calls=calls)
        # one call at a time behind ~25 ms of GPU sleep: its launches only queue
        host = [queued_host_ms(fn, 1, 50_000_000) for _ in range(repeats)]
        result[f"{part}_host_ms"] = statistics.median(host)
    return result


def graph_times(
    attention: ringattn.DilatedAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Forward and forward+backward replayed from CUDA graphs (ms), or why capture failed, and
    each replay's relative error against the eager call (``graph_*_err``)."""
    result: dict[str, Any] = {}
    calls = graphed_calls(attention, q, k, v, dout)
    for part in ("fwd", "fwdbwd"):
        call = calls[part]
        if f"{part}_err" in calls:  # the replay's result against the eager call's
            result[f"graph_{part}_err"] = calls[f"{part}_err"]
        try:
            result[f"graph_{part}_ms"] = (
                median_ms(call, device, 2, repeats) if callable(call) else call
            )
        except Exception as exc:  # report, keep the run's other rows
            result[f"graph_{part}_ms"] = failure(exc)
    return result


def kernel_times(shape: tuple[int, ...], causal: bool, scale: float) -> tuple[float, float]:
    """Forward and forward+backward ms of one SDPAComputer call on contiguous ``shape`` inputs."""
    device, computer = torch.device("cuda"), SDPAComputer()
    q, k, v, dout = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(4))

    def fwd() -> tuple[torch.Tensor, torch.Tensor]:
        return computer.forward(q, k, v, causal, scale)

    def fwdbwd() -> None:
        out, lse = fwd()
        computer.backward(dout, q, k, v, out, lse, causal, scale)

    return median_ms(fwd, device, 2, 5), median_ms(fwdbwd, device, 2, 5)


def kernel_ceiling(n: int, mixing: str, causal: bool, args: argparse.Namespace) -> dict[str, Any]:
    """The plan's block kernels alone vs dense SDPA at ``n``: ms and fraction of dense TFLOP/s.

    Also per distinct call (``ceiling_calls``: which shapes lose the time) and for the plan's
    blocks of one length stacked into one call (``stacked_*``): what a single grouped launch of
    the same blocks would reach, against the plan's many small ones (few row tiles per call leave
    SMs idle, causal ones the more so since their tiles are uneven)."""
    b, h, d = 1, args.heads, args.dim
    configs = tuple(zip(ISSUE_LENGTHS, ISSUE_RATES))
    plan = pattern.make_plan(n, h, configs, mixing)
    calls = Counter(
        (b * part.segments, part.length, part.job.num_heads, d)
        for parts in plan.parts
        for part in parts
    )
    dense_fwd_ms, dense_fwdbwd_ms = kernel_times((b, n, h, d), causal, d**-0.5)
    dense = dense_flops(b, n, h, d, causal)

    def vs_dense(shape: tuple[int, int, int, int], ms: float, backward: bool = False) -> float:
        """A call's rate (its own dense FLOPs) over dense SDPA's at ``n``, same direction(s)."""
        return (dense_flops(*shape, causal) / ms) / (
            dense / (dense_fwdbwd_ms if backward else dense_fwd_ms)
        )

    fwd_ms = fwdbwd_ms = 0.0
    per_call, heads_by_length = [], Counter[int]()
    for shape, count in calls.items():
        f_ms, fb_ms = kernel_times(shape, causal, d**-0.5)
        fwd_ms, fwdbwd_ms = fwd_ms + count * f_ms, fwdbwd_ms + count * fb_ms
        heads_by_length[shape[1]] += count * shape[0] * shape[2]
        per_call.append(
            {
                "shape": list(shape),
                "count": count,
                "fwd_ms": f_ms,
                "fwd_vs_dense": vs_dense(shape, f_ms),
                "fwdbwd_vs_dense": vs_dense(shape, fb_ms, backward=True),
            }
        )
    stacked_fwd_ms = stacked_fwdbwd_ms = 0.0
    for length, block_heads in heads_by_length.items():
        f_ms, fb_ms = kernel_times((-(-block_heads // h), length, h, d), causal, d**-0.5)
        stacked_fwd_ms, stacked_fwdbwd_ms = stacked_fwd_ms + f_ms, stacked_fwdbwd_ms + fb_ms
    flops = useful_flops(b, n, h, d, ISSUE_LENGTHS, ISSUE_RATES, causal, mixing)
    print("ceiling calls", json.dumps(per_call), flush=True)
    return {
        "kernel_calls": sum(calls.values()),
        "kernels_fwd_ms": fwd_ms,
        "kernels_fwdbwd_ms": fwdbwd_ms,
        "stacked_fwd_ms": stacked_fwd_ms,
        "stacked_fwdbwd_ms": stacked_fwdbwd_ms,
        "dense_fwd_ms": dense_fwd_ms,
        "dense_fwdbwd_ms": dense_fwdbwd_ms,
        # fraction of dense SDPA's TFLOP/s that the block kernels reach by themselves
        "kernels_fwd_vs_dense": (flops / fwd_ms) / (dense / dense_fwd_ms),
        "kernels_fwdbwd_vs_dense": (flops / fwdbwd_ms) / (dense / dense_fwdbwd_ms),
        "stacked_fwd_vs_dense": (flops / stacked_fwd_ms) / (dense / dense_fwd_ms),
        "stacked_fwdbwd_vs_dense": (flops / stacked_fwdbwd_ms) / (dense / dense_fwdbwd_ms),
        "ceiling_calls": per_call,
    }


def probe(
    n: int, args: argparse.Namespace, traces: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    device, b, h, d = torch.device("cuda"), 1, args.heads, args.dim
    q, k, v, dout = (torch.randn(b, n, h, d, device=device, dtype=torch.bfloat16) for _ in range(4))
    unit = q.numel() * q.element_size()
    rows = []
    for mixing in args.mixing:
        flops_f = useful_flops(b, n, h, d, ISSUE_LENGTHS, ISSUE_RATES, args.causal, mixing)
        flops_fb = useful_flops(
            b, n, h, d, ISSUE_LENGTHS, ISSUE_RATES, args.causal, mixing, backward=True
        )
        choices = list(
            itertools.product(
                args.split,
                args.in_place,
                args.fill,
                args.lanes,
                args.lane_count,
                args.fuse,
                args.add,
                args.compile,
                args.backward,
                args.forward,
                args.replay,
                args.bwd_merge,
                args.zero,
                args.pack_lse,
                args.group,
                args.group_bwd,
                args.group_bwd_zero,
                args.group_bwd_max,
                args.group_persistent,
                args.group_max,
                args.bwd_tiles,
            )
        )
        first_results = None  # every choice must compute what the first one did
        for choice in choices:
            (
                split,
                in_place,
                fill,
                lane_mode,
                lane_count,
                fuse,
                add,
                compiled,
                backward,
                forward,
                replay,
                bwd_merge,
                zero,
                pack_lse,
                group,
                group_bwd,
                group_bwd_zero,
                group_bwd_max,
                group_persistent,
                group_max,
                bwd_tiles,
            ) = choice
            pattern.BLOCK_SPLIT = split  # (a module made before would follow it too)
            SDPAComputer.in_place = in_place == "yes"
            core.new_grads = FILLS[fill]
            lanes.MODE = lane_mode
            lanes.LANES = int(lane_count)
            launches.FUSE_OFFSETS = fuse == "yes"
            add_kernel.add_rows_ = ADDS[add]
            SDPAComputer.cuda_backward = backward
            SDPAComputer.cuda_forward = forward
            fa4.REPLAY = replay == "yes"
            SDPAComputer.fa4_backward_merge = int(bwd_merge)
            fa4_zero.ENABLED = zero == "yes"
            core.PACK_LSE = pack_lse == "yes"
            fa4_group.ENABLED = group == "yes"
            fa4_group_bwd.ENABLED = group_bwd == "yes"
            fa4_group_bwd.ZEROING = group_bwd_zero
            fa4_group_bwd.ALL_TILES_MAX = int(group_bwd_max)
            fa4_group.PERSISTENT = group_persistent
            fa4_group.ALL_TILES_MAX = int(group_max)
            fa4.BACKWARD_CONFIG.clear()
            if bwd_tiles != "fa4":  # (issue 5's head dim; both causalities)
                fa4.BACKWARD_CONFIG.update(
                    {(args.dim, c): BACKWARD_TILES[bwd_tiles] for c in (False, True)}
                )
            attention = ringattn.DilatedAttention(
                ISSUE_LENGTHS,
                ISSUE_RATES,
                causal=args.causal,
                mixing=mixing,
                strategy=ringattn.Strategy(computer="sdpa"),
                compile=compiled == "yes",
            )

            fwd, fwdbwd = fwd_and_fwdbwd(attention, q, k, v, dout)
            stats = time_and_memory(
                fwd, fwdbwd, unit, device, 2, args.repeats, memory=attention.memory
            )
            rows.append(
                {
                    "n": n,
                    "mixing": mixing,
                    "causal": args.causal,
                    "block_split": split,
                    "in_place": SDPAComputer.in_place and cudnn_graphs.cudnn is not None,
                    "fill": fill,
                    "lanes": lane_mode,
                    "lane_count": int(lane_count),
                    "fuse": fuse,
                    "add": add,
                    "compile": compiled,
                    "backward": "fa4" if backward == "auto" and fa4.available(q) else "torch",
                    "forward": forward if fa4.available(q) else "torch",
                    "replay": replay,
                    "bwd_merge": int(bwd_merge),
                    "zero": zero,
                    "pack_lse": pack_lse,
                    "group": group,
                    "group_bwd": group_bwd,
                    "group_bwd_zero": group_bwd_zero,
                    "group_bwd_max": int(group_bwd_max),
                    "group_persistent": group_persistent,
                    "group_max": int(group_max),
                    "bwd_tiles": bwd_tiles,
                    **stats,
                    "fwd_tflops": tflops(flops_f, stats["fwd_ms"]),
                    "fwdbwd_tflops": tflops(flops_fb, stats["fwdbwd_ms"]),
                }
            )
            results = with_grads(attention, q, k, v, dout)
            first_results = first_results or results
            rows[-1]["vs_first_err"] = worst(
                float(rel_err(got, want)) for got, want in zip(results, first_results, strict=True)
            )
            del results
            if args.trace:
                key = f"n={n} {mixing} split={split} in_place={in_place} fill={fill}"
                key += f" lanes={lane_mode}x{lane_count} fuse={fuse} add={add} compile={compiled}"
                key += f" backward={backward} forward={forward} replay={replay}"
                traces[key] = traced_calls(fwd, unit) + traced_calls(fwdbwd, unit)
                for call in ("forward", "backward"):
                    top = sorted(
                        (c for c in traces[key] if c["call"] == call), key=lambda c: -c["transient"]
                    )[:3]
                    print("trace", key, json.dumps(top), flush=True)
            last = choice == choices[-1]
            if args.steady:
                rows[-1].update(steady_times(fwd, fwdbwd, device, args.repeats))
            if args.graphs:
                rows[-1].update(graph_times(attention, q, k, v, dout, device, args.repeats))
            if args.ceiling and last:
                del attention, fwd, fwdbwd
                torch.cuda.empty_cache()
                ceiling = kernel_ceiling(n, mixing, args.causal, args)
                rows[-1].update(ceiling)
                for part in ("fwd", "fwdbwd"):  # same useful FLOPs: the ratio of times scales it
                    rows[-1][f"{part}_vs_dense"] = (
                        ceiling[f"kernels_{part}_vs_dense"]
                        * ceiling[f"kernels_{part}_ms"]
                        / stats[f"{part}_ms"]
                    )
            print("row", json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lengths(p, [32768, 131072])
    add_mixings(p, ["lse", "head_groups"])
    p.add_argument("--causal", action="store_true", help="causal attention (default: not)")
    p.add_argument(
        "--split",
        type=int,
        nargs="+",
        default=[1, 8],
        help="ringattn.pattern.BLOCK_SPLIT values, each a row (default: %(default)s)",
    )
    # the A/B axes: each takes one or more of its choices, the first listed is the default
    axes = {
        "--in-place": (
            ["yes", "no"],
            "placed blocks written in place through the cuDNN frontend (where installed), or "
            "through torch's cuDNN op and a copy",
        ),
        "--fill": (
            list(FILLS),
            "head_groups: the gradients' buffers new (only the pairs no block writes zeroed), or "
            "zeroed whole first (torch.zeros; the unselected pairs are then zeroed again)",
        ),
        "--lanes": (
            [lanes.MODE, *(m for m in lanes.MODES if m != lanes.MODE)],
            "when the configs of a disjoint (head_groups) plan run on concurrent CUDA streams",
        ),
        "--lane-count": (
            [str(lanes.LANES), *(c for c in ("2", "3", "4") if c != str(lanes.LANES))],
            "how many streams those lanes are (ringattn.lanes.LANES)",
        ),
        "--fuse": (
            ["yes", "no"] if launches.FUSE_OFFSETS else ["no", "yes"],
            "lse: a config's offsets launched as runs (ringattn.launches.FUSE_OFFSETS), or one "
            "launch per block",
        ),
        "--add": (
            list(ADDS),
            "lse backward: gradients added into their rows by the Triton kernel "
            "(ringattn.kernels.add, where it runs) or torch's add_",
        ),
        "--compile": (
            ["no", "yes"],
            "the module eager, or DilatedAttention(compile=True) (with --steady: whether a gap "
            "between them is GPU work or host time)",
        ),
        "--backward": (
            list(CUDA_BACKWARDS),
            "sdpa's backward through FlashAttention-4 where it runs (ringattn.kernels.fa4), or "
            "torch's kernels (SDPAComputer.cuda_backward)",
        ),
        "--replay": (
            ["yes", "no"],
            "FA4's calls replayed from each block signature's first (ringattn.kernels.fa4.REPLAY), "
            "or through FA4's Python launcher every time",
        ),
        "--bwd-merge": (
            [str(SDPAComputer.fa4_backward_merge), "1"],
            "FA4's placed backward in parts this many times the plan's "
            "(SDPAComputer.fa4_backward_merge; 1: the plan's parts)",
        ),
        "--zero": (
            ["yes", "no"],
            "head_groups: FA4's forward zeroes the rows its config leaves out in its epilogue "
            "(ringattn.kernels.fa4_zero.ENABLED), or leaves them to the core's fill",
        ),
        "--pack-lse": (
            ["yes", "no"],
            "the backward's placed launches read their LSE from one buffer gathered per call "
            "(ringattn.core.PACK_LSE), or FA4's backward copies each launch's",
        ),
        "--group": (
            ["yes", "no"],
            "head_groups: the configs' blocks of one segment length in one FA4 forward "
            "(ringattn.kernels.fa4_group.ENABLED), or one launch per config",
        ),
        "--group-bwd": (
            ["yes", "no"],
            "head_groups: the configs' backward in one FA4 launch "
            "(ringattn.kernels.fa4_group_bwd.ENABLED), or one per config",
        ),
        "--group-bwd-zero": (
            default_first(fa4_group_bwd.ZEROING, fa4_group_bwd.ZEROINGS),
            "head_groups: where the grouped backward writes its configs' unselected rows' zeros "
            "(ringattn.kernels.fa4_group_bwd.ZEROING), else the gradients' fill does",
        ),
        "--group-bwd-max": (
            [str(fa4_group_bwd.ALL_TILES_MAX), "8192", "65536"],
            "head_groups: the most query tiles the grouped backward takes "
            "(ringattn.kernels.fa4_group_bwd.ALL_TILES_MAX; issue 5's configs: 1744 at 32K, "
            "3488 at 65K, 6976 at 131K)",
        ),
        "--group-persistent": (
            default_first(fa4_group.PERSISTENT, fa4_group.PERSISTENCE),
            "head_groups: which plans of more than --group-max tiles take the grouped forward on "
            "a persistent grid of one CTA per SM (ringattn.kernels.fa4_group.PERSISTENT); the "
            "others go config by config",
        ),
        "--group-max": (
            [str(fa4_group.ALL_TILES_MAX), "65536", "0"],
            "head_groups: the most query tiles the grouped forward on one CTA per tile takes "
            "(ringattn.kernels.fa4_group.ALL_TILES_MAX; issue 5's configs: 1744 at 32K, "
            "6976 at 131K, 55808 at 1M)",
        ),
        "--bwd-tiles": (
            ["fa4", *BACKWARD_TILES],
            "FA4's SM90 backward tiles (ringattn.kernels.fa4.BACKWARD_CONFIG, causal or not at "
            "--dim): FA4's own, or one of fa4_probe --part bwd_sweep's",
        ),
        "--forward": (
            list(CUDA_FORWARDS),
            "sdpa's forward through FlashAttention-4 where it runs (auto), or torch's kernels "
            "(SDPAComputer.cuda_forward)",
        ),
    }
    for flag, (choices, help_text) in axes.items():
        p.add_argument(flag, nargs="+", default=choices[:1], choices=choices, help=help_text)
    p.add_argument(
        "--trace",
        action="store_true",
        help="also log every kernel call of one forward+backward with its transient and kept bytes",
    )
    p.add_argument(
        "--graphs", action="store_true", help="also time the calls replayed from CUDA graphs"
    )
    p.add_argument("--steady", action="store_true", help="also time back to back, and host time")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also time the plan's kernel calls alone on contiguous inputs, next to dense SDPA",
    )
    add_heads(p)
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed calls per number, median reported (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "overheads",
        help="folder for overheads.md / .json (default: %(default)s)",
    )
    args = p.parse_args(argv)
    # (--repeats 0: a StatisticsError after the warm-up; --split 0 or -1 ran as 1, labelled 0;
    # an unknown --mixing: the library's ValueError; each on the GPU, after CUDA started)
    for name in ("n", "split", "heads", "dim", "repeats"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{name} must be >= 1, got {values}")
    if bad := sorted(set(args.mixing) - set(MIXINGS)):
        p.error(f"--mixing must be among {MIXINGS}, got {bad}")
    require_cuda(p.prog)
    make_out(p, args.out)  # before the GPU work
    rows: list[dict[str, Any]] = []
    traces: dict[str, list[dict[str, Any]]] = {}
    default_split, default_in_place, default_lanes, default_lane_count, default_fuse = (
        pattern.BLOCK_SPLIT,
        SDPAComputer.in_place,
        lanes.MODE,
        lanes.LANES,
        launches.FUSE_OFFSETS,
    )
    default_merge = SDPAComputer.fa4_backward_merge
    default_group_bwd = fa4_group_bwd.ZEROING, fa4_group_bwd.ALL_TILES_MAX
    default_group = fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX
    default_bwd_tiles = dict(fa4.BACKWARD_CONFIG)
    try:
        for n in args.n:
            rows += probe(n, args, traces)
            torch.cuda.empty_cache()
    finally:
        pattern.BLOCK_SPLIT = default_split
        SDPAComputer.in_place = default_in_place
        core.new_grads = FILLS["unselected"]
        lanes.MODE = default_lanes
        lanes.LANES = default_lane_count
        launches.FUSE_OFFSETS = default_fuse
        add_kernel.add_rows_ = ADDS["triton"]
        SDPAComputer.cuda_backward = CUDA_BACKWARDS[0]
        SDPAComputer.cuda_forward = CUDA_FORWARDS[0]
        fa4.REPLAY = True
        fa4_zero.ENABLED = True
        core.PACK_LSE = True
        fa4_group.ENABLED = True
        fa4_group_bwd.ENABLED = True
        fa4_group_bwd.ZEROING, fa4_group_bwd.ALL_TILES_MAX = default_group_bwd
        fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX = default_group
        fa4.BACKWARD_CONFIG.clear()
        fa4.BACKWARD_CONFIG.update(default_bwd_tiles)
        SDPAComputer.fa4_backward_merge = default_merge
    (args.out / "overheads.json").write_text(json.dumps({"rows": rows, "traces": traces}))
    columns = [c for c in dict.fromkeys(c for row in rows for c in row) if c != "ceiling_calls"]
    table = dict_rows_to_markdown(rows, columns)
    calls = [
        {"n": row["n"], "mixing": row["mixing"], "causal": row["causal"], **call}
        for row in rows
        for call in row.get("ceiling_calls", ())
    ]
    if calls:  # the ceiling's per-call breakdown: which block shapes lose the time
        table += "\n\n" + dict_rows_to_markdown(calls, list(calls[0]))
    (args.out / "overheads.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
