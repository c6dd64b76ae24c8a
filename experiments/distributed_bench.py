"""Sequence-parallel check + benchmark, launched with torchrun (NCCL on GPUs, gloo on CPUs):

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 -m experiments.distributed_bench

1. Correctness: every (communicator × dilation × computer) combination, causal or not, both
   mixings, outputs and gradients of the sharded run against the float64 oracle of the full
   sequence (computed on every rank).
2. Speed: ring vs all_gather (and each rank alone on its shard with shard-local configs, for
   reference): forward and forward+backward time, peak memory per GPU and bytes sent per rank.
Rank 0 writes ``distributed.md`` / ``distributed.json`` under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ringattn
from experiments.ablate import dict_rows_to_markdown
from ringattn import distributed, reference
from ringattn.flops import useful_flops


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def rel(x, ref, floor=0.0) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm()) / max(float(ref.norm()), floor, 1e-300)


def correctness(device) -> list[dict]:
    p = dist.get_world_size()
    b, n, h, d = 2, 256 * p, 5, 64
    lengths, rates = (64, 256, 256 * p), (1, 2, 4)  # shard-local, local, spans all ranks
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in range(4)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, grad = (x.to(dtype).to(device) for x in full)
        for causal in (False, True):
            for mixing in ("lse", "head_groups"):
                opts = dict(
                    segment_lengths=lengths, dilation_rates=rates, causal=causal, mixing=mixing
                )
                ref_in = [x.double().requires_grad_() for x in (q, k, v)]
                ref = reference.dilated_attention(*ref_in, **opts)
                ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
                for communicator in ("ring", "all_gather"):
                    for dilation in ("segment_local", "global"):
                        for computer in ("sdpa", "math"):
                            strategy = ringattn.Strategy(
                                dilation=dilation, computer=computer, communicator=communicator
                            )
                            module = ringattn.DilatedAttention(
                                lengths,
                                rates,
                                causal=causal,
                                mixing=mixing,
                                strategy=strategy,
                                compile=False,
                            )
                            xs = [distributed.shard(x).requires_grad_() for x in (q, k, v)]
                            out = module(*xs)
                            grads = torch.autograd.grad(out, xs, distributed.shard(grad))
                            floor = 0.1 * float(distributed.shard(grad).double().norm())
                            errs = [rel(out, distributed.shard(ref))] + [
                                rel(g, distributed.shard(r), floor)
                                for g, r in zip(grads, ref_grads)
                            ]
                            worst = torch.tensor(errs, device=device)
                            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                            tol = 1e-5 if dtype == torch.float32 else 2e-2
                            rows.append(
                                {
                                    "strategy": strategy.label,
                                    "dtype": str(dtype)[6:],
                                    "causal": causal,
                                    "mixing": mixing,
                                    "out_err": float(worst[0]),
                                    "grad_err": float(worst[1:].max()),
                                    "ok": bool(worst[0] <= tol and worst[1:].max() <= 10 * tol),
                                }
                            )
    return rows


def bench_ms(fn, device, warmup=2, repeats=5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def speed(device, n: int, causal: bool) -> list[dict]:
    p = dist.get_world_size()
    b, h, d = 1, 16, 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths, rates = (2048, 8192, n), (1, 2, 4)  # the last config spans every rank
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    m = n // p
    q, k, v, grad = (
        torch.randn(b, m, h, d, device=device, dtype=dtype, generator=gen) for _ in range(4)
    )
    flops_f = useful_flops(b, n, h, d, lengths, rates, causal, "lse") / p
    flops_fb = useful_flops(b, n, h, d, lengths, rates, causal, "lse", backward=True) / p
    rows = []
    for communicator in ("ring", "all_gather"):
        module = ringattn.DilatedAttention(
            lengths,
            rates,
            causal=causal,
            compile=False,
            strategy=ringattn.Strategy(communicator=communicator, computer="sdpa"),
        )

        def fwd(module=module):
            with torch.no_grad():
                module(q, k, v)

        def fb(module=module):
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            module(*xs).backward(grad)

        fwd()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        module.communicator.bytes_sent = 0
        f_ms = bench_ms(fwd, device)
        sent_f = module.communicator.bytes_sent / 7  # 2 warm-up + 5 timed calls
        fb_ms = bench_ms(fb, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        row = {
            "n": n,
            "ranks": p,
            "causal": causal,
            "communicator": communicator,
            "fwd_ms": f_ms,
            "fwdbwd_ms": fb_ms,
            "fwd_tflops_per_gpu": flops_f / f_ms / 1e9,
            "fwdbwd_tflops_per_gpu": flops_fb / fb_ms / 1e9,
            "peak_gib": peak,
            "fwd_MiB_sent_per_rank": sent_f / 2**20,
        }
        stats = torch.tensor([f_ms, fb_ms, peak], device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # slowest rank, largest memory
        row.update(fwd_ms=float(stats[0]), fwdbwd_ms=float(stats[1]), peak_gib=float(stats[2]))
        rows.append(row)
        log("speed", row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/distributed"))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--part", choices=["check", "speed", "all"], default="all")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("distributed_bench: error: launch with torchrun --nproc_per_node=P")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    check = correctness(device) if args.part in ("check", "all") else []
    speed_rows = []
    if args.part in ("speed", "all"):
        for n in args.seq_lens:
            for causal in (False, True):
                speed_rows += speed(device, n, causal)
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU"
        text = [
            f"# Sequence parallelism on {dist.get_world_size()} × {name}, torch "
            f"{torch.__version__}",
            "",
        ]
        if speed_rows:
            text += [
                "bf16, b=1, h=16, d=128, segment_lengths=(2048, 8192, n), dilation_rates="
                "(1, 2, 4), mixing=lse, computer=sdpa, eager. Times: slowest rank, median of 5."
                " Bytes: this rank's sends in one forward.",
                "",
                dict_rows_to_markdown(
                    speed_rows,
                    [
                        "n",
                        "causal",
                        "communicator",
                        "fwd_ms",
                        "fwdbwd_ms",
                        "fwd_tflops_per_gpu",
                        "fwdbwd_tflops_per_gpu",
                        "peak_gib",
                        "fwd_MiB_sent_per_rank",
                    ],
                ),
                "",
            ]
        if check:
            ok = sum(r["ok"] for r in check)
            text += [
                f"## Correctness vs the float64 oracle: {ok}/{len(check)} ok",
                "",
                dict_rows_to_markdown(
                    check, ["strategy", "dtype", "causal", "mixing", "out_err", "grad_err", "ok"]
                ),
                "",
            ]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"distributed_{args.part}.md").write_text("\n".join(text))
        (args.out / f"distributed_{args.part}.json").write_text(
            json.dumps({"speed": speed_rows, "check": check}, indent=1)
        )
        print("\n".join(text), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
