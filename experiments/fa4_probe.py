"""Does FlashAttention-4's Hopper path (``flash-attn-4``, CuTe DSL) beat cuDNN on our blocks? (GPU)

    python -m experiments.fa4_probe [--n 131072] [--out DIR]

Issue 5's forward is bound by cuDNN's rate on 2048-row blocks (0.86-0.88x of its dense rate
non-causal, 0.58-0.67x causal; h200_perf.md, "The kernel ceiling"). FA4 ships an SM90 port of
FA3's kernels that takes strided q/k/v, a preallocated strided ``out`` and ``lse``, and a
``dlse`` in the backward. This times, in one process, cuDNN (torch's aten op, what ``sdpa``
calls) and FA4 on:

* the dense problem ``[1, n, h, d]`` (the bench's baseline);
* contiguous blocks ``[n/2048, 2048, h, d]``;
* the strided view ``segment_local`` hands over for ``(w, r) = (4096, 2)``;

forward and forward+backward, causal and not, and checks FA4's output and LSE against cuDNN's.
Prints a table (TFLOP/s and ratio to cuDNN dense) and writes ``fa4_probe.json``.

``--part sweep`` times FA4's SM90 forward on the 2048-row blocks over tile shapes and its two
pipelining switches (``tile_mn``, ``mma_pv_is_rs``, ``intra_wg_overlap``) against cuDNN: whether
some configuration of it beats cuDNN's forward there (the default does not).
``--part determinism`` runs ``ringattn.kernels.fa4.backward`` twice with and without
``torch.use_deterministic_algorithms`` and reports whether the gradients are bit-identical, and
the time of each.
``--part replay`` times ``ringattn.kernels.fa4`` through FA4's Python launcher and through the
replay of its recorded launches (``ringattn.kernels.replay``): host ms per call, GPU ms, and
whether the replay's results equal the launcher's.
``--part merge`` holds ``ringattn.kernels.fa4_merge`` (FA4's forward with the LSE merge in its
epilogue) and the two-kernel path (FA4's forward, then the Triton merge) to a float64 merge on
``segment_local``'s strided views (full 2048-row blocks and 1000-row ones, whose last tile is
partial), times both, then times the whole ``lse`` module with the fused kernel on and off
(interleaved) at ``--n`` and n/4 and reports how far apart their outputs are.
``--part merge_cost`` times the merging kernel against variants with parts of its merge taken
out (``experiments/variants/fa4_merge.py``: skipped, its reads only, its arithmetic only).
``--part zero`` holds ``ringattn.kernels.fa4_zero`` (FA4's forward that also writes the zeros of
the rows a ``head_groups`` config leaves out) to FA4's forward on the strided views of ``(w, r)
= (4096, 2), (8192, 4), (32768, 16)`` (rows, LSE, exact zeros, nothing left unwritten), times it
against FA4's forward plus the fill, then the ``head_groups`` module with it on and off (forward,
and forward+backward).
``--part config`` times both mixings' module forward with FA4's causal forward tiles set to the
step-20 sweep's best causal configuration (``ringattn.kernels.fa4.FORWARD_CONFIG``) and at FA4's
default, interleaved, at ``--n`` and n/4.
``--part launch`` measures the host's µs per kernel launch, a replayed FA4 forward's and a torch
op's, on the caller's stream and on a side stream, with and without a pending wait between the
two (what ``ringattn.lanes`` adds to an eager call; step 28: the stream makes no difference).
``--part add`` does the same for ``ringattn.kernels.fa4_add`` (FA4's backward adding dK and dV
into the gradients with TMA reduce-add stores, and dQ in its postprocess) against FA4's backward
and the Triton add: the sums against each other, GPU ms of each (all three added by FA4's
kernels, dK / dV only, neither), and the ``lse`` module's forward+backward with dQ's adding
postprocess on and off (``fa4_add.ADD_DQ``).
``--part dpsum`` does the same for ``ringattn.kernels.fa4_dpsum`` (FA4's backward handed each
row's dPsum, formed once for all ``lse`` configs by ``ringattn.kernels.dpsum``): the gradients
against FA4's own, GPU ms with and without, the sums kernel's ms, and the ``lse`` module's
forward+backward with the shared sums on and off (``ringattn.core.SHARE_DPSUM``).
``--part fill`` sweeps the backward's gradient fill kernel (``ringattn.kernels.unselected``) over
its rows per program and warps (GPU ms, GB/s, host µs per launch, exactness) against torch's
``zero_`` of the whole buffer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from experiments import (
    ISSUE_LENGTHS,
    ISSUE_RATES,
    add_heads,
    deterministic_algorithms,
    make_out,
    require_cuda,
    require_positive,
    worst,
)
from experiments.bench import failure
from ringattn.flops import FORWARD_BACKWARD_FACTOR, tflops

if TYPE_CHECKING:
    from types import ModuleType

    import ringattn
    from ringattn.kernels.fa4_group import Group
    from ringattn.pattern import Block


aten = torch.ops.aten


def _gpu_and_host_times(repeats: int, **fns: Callable[[], object]) -> dict[str, float]:
    """``{name}_ms`` (median GPU ms, CUDA events) and ``{name}_host_us`` (the host's µs per call
    of ``repeats`` calls in a row) of each of ``fns``."""
    row = {f"{name}_ms": _events_ms(fn, 2, repeats) for name, fn in fns.items()}
    for name, fn in fns.items():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        row[f"{name}_host_us"] = (time.perf_counter() - start) / repeats * 1e6
        torch.cuda.synchronize()
    return row


def _emit(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """A finished row: printed as it comes (a run cut short keeps what it printed), and kept."""
    print(json.dumps(row), flush=True)
    rows.append(row)


def _events_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def _cudnn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    dout: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """q, k, v: [B, L, H, d] views; forward (and backward when ``dout`` is given) via cuDNN."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = aten._scaled_dot_product_cudnn_attention(
        qt, kt, vt, None, True, 0.0, causal, False, scale=scale
    )[:2]
    if dout is None:
        return out.transpose(1, 2), lse.squeeze(-1)
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    length = q.shape[1]
    grads: tuple[torch.Tensor, ...] = aten._scaled_dot_product_cudnn_attention_backward(
        dout.transpose(1, 2), qt, kt, vt, out, lse, seed, seed, None, None, None,
        length, length, 0.0, causal, scale=scale,
    )  # fmt: skip
    return grads


def _fa4(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    dout: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    o, lse = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=causal, return_lse=True, out=out)[
        :2
    ]
    if dout is None:
        return o, lse
    grads: tuple[torch.Tensor, ...] = _flash_attn_bwd(q, k, v, o, dout, lse, scale, causal)
    return grads


# (yields a str and three tensors: mypy reads each yield's starred list as a tuple of any length)
def problems(n: int, h: int, d: int, device: torch.device) -> Iterator[tuple[Any, ...]]:
    """(label, q, k, v), q/k/v as [B, L, H, d] views."""
    base = [torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16) for _ in range(3)]
    yield "dense", *base
    blocks = [x.view(n // 2048, 2048, h, d) for x in base]
    yield "blocks 2048", *blocks
    # segment_local's view for (w, r) = (4096, 2), offset 0: rows 0, 2, 4, ... of each segment
    strided = [x.view(n // 4096, 2048, 2, h, d)[:, :, 0] for x in base]
    yield "strided w4096 r2", *strided


# (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap); None: FA4's own choice (128, 128, True, True)
SWEEP = (
    None,
    (128, 176, True, True),
    (128, 192, True, True),
    (128, 160, True, True),
    (128, 112, True, True),
    (128, 128, False, True),
    (128, 128, True, False),
    (192, 128, False, True),
    (64, 128, True, True),
)


def sweep(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    from flash_attn.cute.interface import _flash_attn_fwd

    q, k, v = (
        torch.randn(n // 2048, 2048, h, d, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    rows: list[dict[str, Any]] = []
    for causal in (False, True):
        flops = 4.0 * n * 2048 * d * h / (2 if causal else 1)
        ref = _cudnn(q, k, v, causal, d**-0.5)[0].float()
        ms = _events_ms(partial(_cudnn, q, k, v, causal, d**-0.5), 2, repeats)
        rate = tflops(flops, ms)
        rows.append({"causal": causal, "kernel": "cudnn", "fwd_ms": ms, "tflops": rate})
        print(json.dumps(rows[-1]), flush=True)
        for config in SWEEP:
            extra: dict[str, Any] = {}
            if config is not None:
                extra = dict(tile_mn=config[:2], mma_pv_is_rs=config[2], intra_wg_overlap=config[3])
            fn = partial(
                _flash_attn_fwd, q, k, v, softmax_scale=d**-0.5, causal=causal, return_lse=True
            )
            row: dict[str, Any] = {"causal": causal, "kernel": f"fa4 {config or 'default'}"}
            try:
                out = fn(**extra)[0]
                row["rel_err_vs_cudnn"] = float((out.float() - ref).norm() / ref.norm())
                ms = _events_ms(partial(fn, **extra), 2, repeats)
                row.update(fwd_ms=ms, tflops=tflops(flops, ms))
            except Exception as exc:
                row["error"] = failure(exc, 200)
            _emit(rows, row)
    return rows


def determinism(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    from ringattn.kernels import fa4

    q, k, v, dout = (
        torch.randn(n // 2048, 2048, h, d, device=device, dtype=torch.bfloat16) for _ in range(4)
    )
    out, lse = _cudnn(q, k, v, False, d**-0.5)
    lse = lse.transpose(1, 2)  # fa4.backward takes the core's [B, L, H]
    rows: list[dict[str, Any]] = []
    for flag in (False, True):
        with deterministic_algorithms(flag):
            fn = partial(fa4.backward, dout, q, k, v, out, lse, False, d**-0.5)
            first, second = fn(), fn()
            rows.append(
                {
                    "deterministic": flag,
                    "bit_identical": all(torch.equal(a, b) for a, b in zip(first, second)),
                    "bwd_ms": _events_ms(fn, 2, repeats),
                }
            )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def replay(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """``ringattn.kernels.fa4`` through FA4's launcher vs through the replay of its recorded
    launches: host ms per call, GPU ms, and the replay's result against the launcher's."""
    from experiments.ablate import queued_host_ms
    from ringattn.kernels import fa4
    from ringattn.kernels import replay as replay_module

    rows: list[dict[str, Any]] = []
    scale = d**-0.5
    for label, q, k, v in problems(n, h, d, device):
        if label == "dense":
            continue
        dout = torch.randn_like(q)
        for causal in (False, True):
            full = torch.empty(1, n, h, d, device=device, dtype=torch.bfloat16)
            placed = full.view(n // 4096, 2048, 2, h, d)[:, :, 0] if "strided" in label else None
            out, lse = fa4.forward(q, k, v, causal, scale)
            calls: dict[str, Callable[[], Any]] = {
                "fwd": partial(fa4.forward, q, k, v, causal, scale),
                "fwd into": partial(fa4.forward, q, k, v, causal, scale, out=placed),
                "bwd": partial(fa4.backward, dout, q, k, v, out, lse, causal, scale),
            }
            for what, fn in calls.items():
                if what == "fwd into" and placed is None:
                    continue
                row: dict[str, Any] = {"problem": label, "causal": causal, "call": what}
                for mode in (False, True):
                    fa4.REPLAY = mode
                    fa4._REPLAYS.clear()
                    first = [x.clone() for x in fn()]  # mode True: recorded (launcher)
                    again = fn()  # mode True: the replay
                    name = "replay" if mode else "launcher"
                    row[f"{name}_host_ms"] = queued_host_ms(fn, 20, 2_000_000_000)
                    row[f"{name}_gpu_ms"] = _events_ms(fn, 2, repeats)
                    if mode:
                        row["replays"] = sum(r is not None for r in fa4._REPLAYS.values())
                        if not row["replays"]:
                            row["refusal"] = replay_module.last_refusal
                        row["replay_max_rel_err"] = worst(
                            float((a.float() - b.float()).norm() / b.float().norm())
                            for a, b in zip(again, first)
                        )
                        row["replay_bit_identical"] = all(
                            torch.equal(a, b) for a, b in zip(again, first)
                        )
                _emit(rows, row)
    fa4.REPLAY = True
    return rows


def _merge_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``merge((out, lse), attention(q, k, v))`` of ``[B, L, H, d]`` blocks."""
    scores = q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1) * scale
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    block_lse = scores.logsumexp(-1)  # [B, H, L]
    block_out = (scores - block_lse[..., None]).exp() @ v.double().transpose(1, 2)
    block_lse, block_out = block_lse.transpose(1, 2), block_out.transpose(1, 2)
    merged = torch.logaddexp(lse.double(), block_lse)
    top = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    w_old, w_new = (torch.exp(x - top)[..., None] for x in (lse.double(), block_lse))
    return out.double() * w_old + block_out * w_new, merged


def _store_paths(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    out_full: torch.Tensor,
    lse_full: torch.Tensor,
    strided: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """GPU ms of FA4's forward writing into the strided rows (TMA store), of the fused kernel's
    class with its merge skipped (plain stores), and of the fused kernel."""
    import cutlass.cute as cute

    from ringattn.kernels import fa4, fa4_merge, fa4_merge_sm90

    class StoreOnly(fa4_merge_sm90.MergingForwardSm90):
        # (left unannotated: the CuTe DSL reads a @cute.jit function's annotations, e.g.
        # cutlass.Constexpr for a compile-time argument, and cute / cutlass are no globals here)
        @cute.jit
        def merge_old(  # type: ignore[no-untyped-def]
            self, acc_O, lse, mO, mLSE, seqlen, mma, tidx, m_block, head_idx, batch_idx
        ):
            pass

    out_v, lse_v = strided(out_full.clone()), strided(lse_full.clone())
    key = fa4_merge._key(q, causal, lse_v)
    store_only = fa4_merge.compile_forward(key, q, k, v, out_v, lse_v.transpose(1, 2), StoreOnly)
    fused = fa4_merge._COMPILED[key]
    args = (q, k, v, out_v, lse_v.transpose(1, 2), scale)
    return {
        "fa4_tma_store_ms": _events_ms(
            partial(fa4.forward, q, k, v, causal, scale, out=out_v), 2, 10
        ),
        "plain_store_no_merge_ms": _events_ms(partial(store_only, *args), 2, 10),
        "fused_kernel_ms": _events_ms(partial(fused, *args), 2, 10),
    }


def _module_ab(
    n: int,
    h: int,
    d: int,
    repeats: int,
    device: torch.device,
    mixing: str,
    switch: ModuleType | _TileSwitch,
    names: tuple[str, str],
    backward: bool = False,
    flag: str = "ENABLED",
    report: ModuleType | _TileSwitch | None = None,
) -> list[dict[str, Any]]:
    """The issue's module at n/4 and n, causal and not, timed with ``switch`` (a module with a
    boolean ``flag``, ``ENABLED`` by default) on and off, interleaved twice; how far apart the
    two results are. ``report``: the kernel module whose first-call checks are reported
    (default: ``switch``)."""
    report = switch if report is None else report
    import ringattn

    on, off = names
    rows: list[dict[str, Any]] = []
    for size in (n // 4, n):
        q, k, v = (
            torch.randn(1, size, h, d, device=device, dtype=torch.bfloat16).requires_grad_(backward)
            for _ in "qkv"
        )
        dout = torch.randn_like(q)
        for causal in (False, True):
            # one module per arm: a module prepares its launches at its first call, with the
            # switch as it is then (fa4_zero's decides what the launches are)
            modules = {
                enabled: ringattn.DilatedAttention(
                    ISSUE_LENGTHS, ISSUE_RATES, causal=causal, mixing=mixing
                )
                for enabled in (True, False)
            }
            kind = "fwd+bwd" if backward else "fwd"
            row: dict[str, Any] = {"problem": f"module n={size} {mixing} {kind}", "causal": causal}

            def call(
                module: ringattn.DilatedAttention,
                q: torch.Tensor = q,
                k: torch.Tensor = k,
                v: torch.Tensor = v,
                dout: torch.Tensor = dout,
            ) -> tuple[torch.Tensor, ...]:
                if backward:
                    return torch.autograd.grad(module(q, k, v), (q, k, v), dout)
                with torch.no_grad():
                    return (module(q, k, v),)

            results: dict[str, tuple[torch.Tensor, ...]] = {}
            try:
                for turn in range(2):
                    for enabled in (True, False):
                        setattr(switch, flag, enabled)
                        name = on if enabled else off
                        fn = partial(call, modules[enabled])
                        results[name] = fn()
                        row[f"{name}_{'fwdbwd' if backward else 'fwd'}_ms_{turn}"] = _events_ms(
                            fn, 2 if backward else 3, repeats
                        )
                row[f"{on}_vs_{off}_rel"] = worst(
                    float((a.float() - b.float()).norm() / b.float().norm())
                    for a, b in zip(results[on], results[off])
                )
            except Exception as exc:  # a probe: report and go on
                row["error"] = failure(exc, 600)
            setattr(switch, flag, True)
            compiled = getattr(report, "_COMPILED", getattr(report, "_CHECKED", {}))
            row["kernels"] = {str(key): bool(x) for key, x in compiled.items()}
            row["refusal"] = (report.last_refusal or "")[:600]
            _emit(rows, row)
    return rows


def merge(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """``ringattn.kernels.fa4_merge`` against the two-kernel path: errors vs float64, GPU ms,
    then the ``lse`` module with the fused kernel on and off."""
    from ringattn.kernels import fa4, fa4_merge
    from ringattn.merge import merge_into_

    rows: list[dict[str, Any]] = []
    scale = d**-0.5

    def fused(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        assert fa4_merge.forward_merge_(q, k, v, causal, scale, out, lse), "fused kernel refused"

    def two_kernel(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        merge_into_(out, lse, *fa4.forward(q, k, v, causal, scale))

    for length in (2048, 1000):
        segments = n // (2 * length)
        rows_used = segments * 2 * length

        def strided(
            x: torch.Tensor,
            segments: int = segments,
            length: int = length,
            rows_used: int = rows_used,
        ) -> torch.Tensor:
            # segment_local's view for (w, r) = (2 * length, 2), offset 1
            return x[:, :rows_used].reshape(segments, length, 2, *x.shape[2:])[:, :, 1]

        q, k, v = (
            strided(torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16)) for _ in "qkv"
        )
        out_full = torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16)
        lse_full = torch.rand(1, n, h, device=device) * 4 - 1
        lse_full[:, ::7, :3] = float("-inf")  # rows nothing selected yet: their output is 0
        out_full[:, ::7, :3] = 0
        for causal in (False, True):
            row: dict[str, Any] = {
                "problem": f"L={length} r=2 offset 1",
                "causal": causal,
                "shape": list(q.shape),
            }
            out0, lse0 = strided(out_full), strided(lse_full)
            ref_out, ref_lse = _merge_reference(
                q[:2], k[:2], v[:2], causal, scale, out0[:2], lse0[:2]
            )
            results: dict[str, torch.Tensor] = {}
            for name in ("fused", "two_kernel"):
                out_acc, lse_acc = out_full.clone(), lse_full.clone()
                out_v, lse_v = strided(out_acc), strided(lse_acc)

                call = partial(fused if name == "fused" else two_kernel, q, k, v, causal)
                call = partial(call, out_v, lse_v)
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        # the first call compiles the kernel and checks it on the two-kernel
                        # path (the blocks' first entries) before its own launch: reset, then
                        # the call checked
                        call()
                        out_acc.copy_(out_full), lse_acc.copy_(lse_full)
                        call()
                    torch.cuda.synchronize()
                    for w in caught:
                        row[f"{name}_warning"] = str(w.message)[:400]
                    got_out, got_lse = out_v[:2].double(), lse_v[:2].double()
                    row[f"{name}_out_rel_err"] = float((got_out - ref_out).norm() / ref_out.norm())
                    fin = torch.isfinite(ref_lse)
                    row[f"{name}_lse_max_abs"] = float((got_lse[fin] - ref_lse[fin]).abs().max())
                    row[f"{name}_lse_inf_agree"] = bool(torch.equal(fin, torch.isfinite(got_lse)))
                    results[name] = out_v.clone()
                    row[f"{name}_ms"] = _events_ms(call, 2, repeats)
                except Exception as exc:  # a probe: report and go on
                    row[f"{name}_error"] = failure(exc, 600)
                    row["refusal"] = (fa4_merge.last_refusal or "")[:3000]
            if length == 2048:
                try:  # where the fused kernel's extra time goes: its store path without the merge
                    row.update(_store_paths(q, k, v, causal, scale, out_full, lse_full, strided))
                except Exception as exc:
                    row["store_paths_error"] = failure(exc, 600)
            if len(results) == 2:
                a, b = (results[x].float() for x in ("fused", "two_kernel"))
                row["fused_vs_two_kernel_rel"] = float((a - b).norm() / b.norm())
            _emit(rows, row)
    return rows + _module_ab(n, h, d, repeats, device, "lse", fa4_merge, ("fused", "two_kernel"))


def _offset_one_blocks(
    n: int, h: int, d: int, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``segment_local``'s view for ``(w, r) = (4096, 2)``, offset 1 (2048-row blocks), as
    ``strided(x)`` of a ``[1, n, ...]`` tensor, and random bf16 q, k, v in it."""
    segments = n // 4096

    def strided(x: torch.Tensor) -> torch.Tensor:
        return x[:, : segments * 4096].reshape(segments, 2048, 2, *x.shape[2:])[:, :, 1]

    q, k, v = (strided(torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16)) for _ in "qkv")
    return strided, q, k, v


def merge_cost(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """The merging kernel against its variants with parts of the merge taken out
    (``experiments/variants/fa4_merge.py``: the merge skipped, its reads only, its arithmetic
    only) on the strided ``(w, r) = (4096, 2)`` view at ``--n``, interleaved three times."""
    from experiments.variants.fa4_merge import VARIANTS
    from ringattn.kernels import fa4_merge

    rows: list[dict[str, Any]] = []
    scale = d**-0.5
    strided, q, k, v = _offset_one_blocks(n, h, d, device)
    out_v = strided(torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16))
    lse_v = strided(torch.rand(1, n, h, device=device) * 4 - 1)
    for causal in (False, True):
        row: dict[str, Any] = {
            "problem": "L=2048 r=2 offset 1",
            "causal": causal,
            "shape": list(q.shape),
        }
        try:
            assert fa4_merge.forward_merge_(q, k, v, causal, scale, out_v, lse_v), "refused"
            key = fa4_merge._key(q, causal, lse_v)
            args = (q, k, v, out_v, lse_v.transpose(1, 2), scale)
            kernels = {"merge": partial(fa4_merge._COMPILED[key], *args)}
            for name, cls in VARIANTS.items():
                compiled = fa4_merge.compile_forward(key, q, k, v, out_v, args[4], cls)
                kernels[name] = partial(compiled, *args)
            for turn in range(3):
                for name, kernel in kernels.items():
                    row[f"{name}_ms_{turn}"] = _events_ms(kernel, 2, repeats)
        except Exception as exc:  # a probe: report and go on
            row["error"] = failure(exc, 600)
        _emit(rows, row)
    return rows


def add(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """``ringattn.kernels.fa4_add`` against FA4's backward plus the Triton add: all three
    gradients added by FA4's kernels (dQ in its postprocess), dK / dV only, or none."""
    from ringattn.kernels import fa4, fa4_add
    from ringattn.kernels.add import add_rows_

    rows: list[dict[str, Any]] = []
    scale = d**-0.5

    def adding(
        inputs: tuple[torch.Tensor, ...], grads: list[torch.Tensor], causal: bool, add_dq: bool
    ) -> None:
        dq, dk, dv = grads
        dout, q, k, v, out, lse = inputs
        fa4_add.ADD_DQ = add_dq
        try:
            left = fa4_add.backward_add_(dout, q, k, v, out, lse, causal, scale, dq, dk, dv)
        finally:
            fa4_add.ADD_DQ = True
        assert left is not None, "the adding kernels declined (they are checked on first calls)"
        assert len(left) == (0 if add_dq else 1), "dQ's adding postprocess was refused"
        if left:
            add_rows_([dq.unsqueeze(0)], [left[0].unsqueeze(0)])

    def plain(inputs: tuple[torch.Tensor, ...], grads: list[torch.Tensor], causal: bool) -> None:
        dout, q, k, v, out, lse = inputs
        result = fa4.backward(dout, q, k, v, out, lse, causal, scale)
        add_rows_([g.unsqueeze(0) for g in grads], [x.unsqueeze(0) for x in result])

    for length in (2048, 1000):
        segments = n // (2 * length)
        used = segments * 2 * length

        def strided(
            x: torch.Tensor, segments: int = segments, length: int = length, used: int = used
        ) -> torch.Tensor:
            return x[:, :used].reshape(segments, length, 2, *x.shape[2:])[:, :, 1]

        def full() -> torch.Tensor:
            return torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16)

        q, k, v, dout, out = (strided(full()) for _ in range(5))
        lse = strided(torch.rand(1, n, h, device=device) * 4 + 2)
        inputs = (dout, q, k, v, out, lse)
        grads_full = [full() for _ in range(3)]
        for causal in (False, True):
            row: dict[str, Any] = {"problem": f"L={length} r=2 offset 1", "causal": causal}
            try:
                grads = [strided(g.clone()) for g in grads_full]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    first = fa4_add.backward_add_(dout, q, k, v, out, lse, causal, scale, *grads)
                    for g, g_full in zip(grads, grads_full):
                        g.copy_(strided(g_full))
                    left = fa4_add.backward_add_(dout, q, k, v, out, lse, causal, scale, *grads)
                row["first_call_declined"] = first is None  # (it checked the kernels)
                row["warnings"] = [
                    str(w.message)[:300] for w in caught if "deprecated" not in str(w.message)
                ]
                row["kept"] = {str(key): kept for key, kept in fa4_add._CHECKED.items()}
                row["refusal"] = (fa4_add.last_refusal or "")[:2000]
                row["left_for_the_add"] = None if left is None else len(left)
                if left is not None:
                    ref = fa4.backward(dout, q, k, v, out, lse, causal, scale)
                    dq = grads[0] if not left else strided(grads_full[0]) + left[0]
                    for name, got, old, block in (
                        ("dq", dq, strided(grads_full[0]), ref[0]),
                        ("dk", grads[1], strided(grads_full[1]), ref[1]),
                        ("dv", grads[2], strided(grads_full[2]), ref[2]),
                    ):
                        want = old.float() + block.float()
                        row[f"{name}_rel_err"] = float((got.float() - want).norm() / want.norm())

                    for name, call in (
                        ("adding_all", partial(adding, inputs, grads, causal, True)),
                        ("adding", partial(adding, inputs, grads, causal, False)),
                        ("plain", partial(plain, inputs, grads, causal)),
                    ):
                        row[f"{name}_ms"] = _events_ms(call, 2, repeats)
            except Exception as exc:  # a probe: report and go on
                row["error"] = failure(exc, 1500)
            _emit(rows, row)
    modules = _module_ab(
        n, h, d, repeats, device, "lse", fa4_add, ("add_dq", "add_kernel"), True, "ADD_DQ"
    )
    return rows + modules


def dpsum(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """``ringattn.kernels.fa4_dpsum``: FA4's backward on ``segment_local``'s strided blocks
    (2048- and 1000-row, ``r = 2`` offset 1) handed each row's dPsum (``ringattn.kernels.dpsum``
    over the whole ``[1, n, h, d]``, viewed as the blocks' rows) against FA4's own: the swap's
    first-call check, the gradients' relative differences, GPU ms of the backward with and
    without; the sums kernel's ms and GB/s at ``n``; then the ``lse`` module's forward+backward
    with the shared sums on and off (``ringattn.core.SHARE_DPSUM``), interleaved, at n/4 and n."""
    import ringattn.core
    from ringattn.kernels import dpsum as dpsum_kernel
    from ringattn.kernels import fa4, fa4_dpsum

    rows: list[dict[str, Any]] = []
    scale = d**-0.5

    def full() -> torch.Tensor:
        return torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16)

    out_full, dout_full = full(), full()
    lse_full = torch.rand(1, n, h, device=device) * 4 + 2
    row: dict[str, Any] = {"problem": f"sums kernel n={n}"}
    try:
        minus_full = dpsum_kernel.minus_dpsum(out_full, dout_full, lse_full)
        assert minus_full is not None, "the sums kernel declined"
        want = -(out_full.float() * dout_full.float()).sum(-1)
        row["rel_err"] = float((minus_full - want).norm() / want.norm())
        row["ms"] = _events_ms(
            partial(dpsum_kernel.minus_dpsum, out_full, dout_full, lse_full), 3, repeats
        )
        row["GB_per_s"] = (2 * out_full.numel() * 2 + minus_full.numel() * 4) / row["ms"] / 1e6
    except Exception as exc:  # a probe: report and go on
        row["error"] = failure(exc, 1500)
        minus_full = None
    _emit(rows, row)
    for length in (2048, 1000):
        segments = n // (2 * length)
        used = segments * 2 * length

        def strided(
            x: torch.Tensor, segments: int = segments, length: int = length, used: int = used
        ) -> torch.Tensor:
            return x[:, :used].reshape(segments, length, 2, *x.shape[2:])[:, :, 1]

        q, k, v = (strided(full()) for _ in range(3))
        out, dout, lse = strided(out_full), strided(dout_full), strided(lse_full)
        minus = None if minus_full is None else strided(minus_full)
        inputs = (dout, q, k, v, out, lse)
        for causal in (False, True):
            row = {"problem": f"L={length} r=2 offset 1", "causal": causal}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    given = fa4_dpsum.usable(minus, *inputs, causal, scale)
                row["kept"] = given is not None
                row["warnings"] = [
                    str(w.message)[:300] for w in caught if "deprecated" not in str(w.message)
                ]
                row["refusal"] = (fa4_dpsum.last_refusal or "")[:2000]
                if given is not None:
                    with_sums = fa4.backward(*inputs, causal, scale, dlse=given)
                    own = fa4.backward(*inputs, causal, scale)
                    for name, got, ref in zip(("dq", "dk", "dv"), with_sums, own, strict=True):
                        error = (got.float() - ref.float()).norm() / ref.float().norm()
                        row[f"{name}_rel_diff"] = float(error)
                    row["given_ms"] = _events_ms(
                        partial(fa4.backward, *inputs, causal, scale, dlse=given), 2, repeats
                    )
                    row["own_ms"] = _events_ms(
                        partial(fa4.backward, *inputs, causal, scale), 2, repeats
                    )
            except Exception as exc:  # a probe: report and go on
                row["error"] = failure(exc, 1500)
            _emit(rows, row)
    modules = _module_ab(
        n,
        h,
        d,
        repeats,
        device,
        "lse",
        ringattn.core,
        ("shared", "own"),
        True,
        "SHARE_DPSUM",
        report=fa4_dpsum,
    )
    return rows + modules


def _fill_then_forward(
    out_full: torch.Tensor,
    table: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    out: torch.Tensor,
) -> None:
    """What the core did before ``fa4_zero``: the fill, then FA4's forward into the rows."""
    from ringattn.kernels import fa4
    from ringattn.kernels.unselected import zero_unselected_

    zero_unselected_(out_full, table)
    fa4.forward(q, k, v, causal, scale, out=out)


def zero(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """``ringattn.kernels.fa4_zero`` (FA4's forward writing the unselected rows' zeros) against
    FA4's forward plus the core's fill, on ``head_groups``' strided views, then the
    ``head_groups`` module with it on and off."""
    from ringattn.core import neighbour_shifts
    from ringattn.kernels import fa4, fa4_zero
    from ringattn.kernels.unselected import selection_table, zero_unselected_
    from ringattn.pattern import Block, Job

    rows: list[dict[str, Any]] = []
    scale = d**-0.5
    for (w, r, o), with_lse in itertools.product(
        ((4096, 2, 1), (8192, 4, 2), (32768, 16, 4)), (True, False)
    ):
        segments = n // w
        job = Job(config=0, w=w, r=r, offset=o, head_start=0, head_stop=h, head_step=1)
        block = Block(job, 0, segments, w // r, tail=False)

        def full() -> torch.Tensor:
            return torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16)

        def rows_of(x: torch.Tensor, block: Block = block) -> torch.Tensor:
            return block.rows(x).flatten(0, 1)

        q, k, v = (rows_of(full()) for _ in "qkv")
        out_full, lse_full = full(), torch.randn(1, n, h, device=device)
        out, lse = rows_of(out_full), (rows_of(lse_full) if with_lse else None)
        shifts = neighbour_shifts(block, out)
        table = selection_table(((r,) * h, (o,) * h), device)
        for causal in (False, True):
            row: dict[str, Any] = {"problem": f"w={w} r={r} o={o} lse={with_lse}", "causal": causal}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    took = fa4_zero.forward_zero_(q, k, v, causal, scale, out, lse, shifts)
                    out_full.fill_(float("nan"))  # the second call must write all of it
                    took = took and fa4_zero.forward_zero_(q, k, v, causal, scale, out, lse, shifts)
                torch.cuda.synchronize()
                row["took"] = took
                row["warnings"] = [str(x.message)[:400] for x in caught]
                row["refusal"] = (fa4_zero.last_refusal or "")[:3000]
                ref_out, ref_lse = fa4.forward(q, k, v, causal, scale)
                row["out_max_abs"] = float((out.float() - ref_out.float()).abs().max())
                if with_lse:
                    assert lse is not None
                    row["lse_max_abs"] = float((lse - ref_lse).abs().max())
                unselected = torch.arange(n, device=device) % r != o
                row["zeros_exact"] = bool((out_full[:, unselected] == 0).all())
                row["nan_left"] = int(out_full.isnan().sum())

                fused = partial(fa4_zero.forward_zero_, q, k, v, causal, scale, out, lse, shifts)
                plain = partial(_fill_then_forward, out_full, table, q, k, v, causal, scale, out)
                row["fused_ms"] = _events_ms(fused, 2, repeats)
                row["plain_ms"] = _events_ms(plain, 2, repeats)
                row["fill_ms"] = _events_ms(partial(zero_unselected_, out_full, table), 2, repeats)
            except Exception as exc:  # a probe: report and go on
                row["error"] = failure(exc, 1500)
                row["refusal"] = (fa4_zero.last_refusal or "")[:3000]
            _emit(rows, row)
    modules = _module_ab(n, h, d, repeats, device, "head_groups", fa4_zero, ("zeroing", "fill"))
    grads = _module_ab(n, h, d, repeats, device, "head_groups", fa4_zero, ("zeroing", "fill"), True)
    return rows + modules + grads


def _issue_groups(
    size: int, h: int, d: int, device: torch.device, with_lse: bool
) -> tuple[list[Group], list[tuple[int, ...]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Issue 5's ``head_groups`` plan at ``size`` tokens as the grouped forward's operands:
    ``(groups, shifts, out_full, lse_full, selected)`` (each group's ``(q, k, v, out, lse or
    None)`` views of random ``[1, size, h, d]`` tensors, its neighbour shifts, the full output
    and LSE, and which of their rows some config selects)."""
    from ringattn.core import neighbour_shifts
    from ringattn.pattern import make_plan

    plan = make_plan(size, h, tuple(zip(ISSUE_LENGTHS, ISSUE_RATES)), "head_groups")
    assert not any(block.tail for block in plan.blocks)
    assert len({block.length for block in plan.blocks}) == 1
    q_full, k_full, v_full, out_full = (
        torch.randn(1, size, h, d, device=device, dtype=torch.bfloat16) for _ in range(4)
    )
    lse_full = torch.randn(1, size, h, device=device)
    members = []
    for block in plan.blocks:
        views = [block.rows(x).flatten(0, 1) for x in (q_full, k_full, v_full, out_full)]
        lse = block.rows(lse_full).flatten(0, 1) if with_lse else None
        members.append(((*views, lse), neighbour_shifts(block, views[3])))
    groups, shifts = (list(x) for x in zip(*members))
    selected = torch.zeros(1, size, h, dtype=torch.bool, device=device)
    for block in plan.blocks:
        block.rows(selected).fill_(True)
    return groups, shifts, out_full, lse_full, selected


def group_sizes(n: int) -> list[int]:
    """The lengths :func:`group` and :func:`group_bwd` run issue 5's plan at: ``n // 4`` (at
    least its longest segment) and ``n``; :func:`n_error` says where a config leaves a tail
    there (every config's full segments of one length: one group each, all in one launch)."""
    return sorted({max(n // 4, max(ISSUE_LENGTHS)), n})


def group(
    n: int,
    h: int,
    d: int,
    repeats: int,
    device: torch.device,
    persistent: tuple[bool, ...] = (False,),
) -> list[dict[str, Any]]:
    """``ringattn.kernels.fa4_group`` (every ``head_groups`` config's blocks in one FA4 forward)
    against one launch per config (FA4's zeroing forward, or its plain one for ``r = 1``), on
    issue 5's plan at ``n // 4`` (at least its longest segment) and ``n``: each group's rows
    and LSE against FA4's forward, every unselected row 0, nothing left unwritten (the output
    starts NaN), GPU ms and the host's µs per call of both; then the module with it on and
    off. ``persistent``: the grouped kernel's variants (``fa4_group.PERSISTENT``), each checked
    and timed (``grouped_persistent``)."""
    from ringattn.kernels import fa4, fa4_group, fa4_zero

    rows: list[dict[str, Any]] = []
    scale = d**-0.5
    default_persistence, default_max = fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX
    for size, causal, with_lse in itertools.product(group_sizes(n), (False, True), (True, False)):
        groups, shifts, out_full, _, selected = _issue_groups(size, h, d, device, with_lse)
        row: dict[str, Any] = {
            "problem": f"n={size} groups={len(groups)} lse={with_lse}",
            "causal": causal,
        }

        def grouped(
            groups: list[Group] = groups,
            shifts: list[tuple[int, ...]] = shifts,
            causal: bool = causal,
            persistent: bool = persistent[0],
        ) -> bool:
            # (every size on the persistent grid, or none)
            fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX = (
                ("always", 0) if persistent else ("never", default_max)
            )
            return fa4_group.forward_group_(groups, causal, scale, shifts)

        def per_config(
            groups: list[Group] = groups,
            shifts: list[tuple[int, ...]] = shifts,
            causal: bool = causal,
        ) -> None:
            for (q, k, v, out, lse), group_shifts in zip(groups, shifts, strict=True):
                if not group_shifts:
                    lse_block = fa4.forward(q, k, v, causal, scale, out=out)[1]
                    if lse is not None:
                        lse.copy_(lse_block)
                else:
                    assert fa4_zero.forward_zero_(q, k, v, causal, scale, out, lse, group_shifts)

        try:
            variants: dict[str, Callable[[], object]] = {}
            for each in persistent:
                tag = "_persistent" if each else ""
                variants[f"grouped{tag}"] = partial(grouped, persistent=each)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out_full.fill_(float("nan"))
                    took = grouped(persistent=each)
                    out_full.fill_(float("nan"))  # the second call must write all of it
                    took = took and grouped(persistent=each)
                torch.cuda.synchronize()
                row[f"took{tag}"] = took
                row[f"warnings{tag}"] = [str(x.message)[:400] for x in caught][:3]
                row[f"refusal{tag}"] = (fa4_group.last_refusal or "")[:3000]
                row[f"nan_left{tag}"] = int(out_full.isnan().sum())
                out_err, lse_err = 0.0, 0.0
                for q, k, v, out, lse in groups:
                    ref_out, ref_lse = fa4.forward(q, k, v, causal, scale)
                    out_err = worst([out_err, float((out.float() - ref_out.float()).abs().max())])
                    if lse is not None:
                        lse_err = worst([lse_err, float((lse - ref_lse).abs().max())])
                row[f"out_max_abs{tag}"], row[f"lse_max_abs{tag}"] = out_err, lse_err
                row[f"zeros_exact{tag}"] = bool((out_full[~selected] == 0).all())
            row.update(_gpu_and_host_times(repeats, **variants, per_config=per_config))
        except Exception as exc:  # a probe: report and go on
            row["error"] = failure(exc, 1500)
            row["refusal"] = (fa4_group.last_refusal or "")[:3000]
        _emit(rows, row)
    fa4_group.PERSISTENT, fa4_group.ALL_TILES_MAX = default_persistence, default_max
    if len(persistent) > 1:  # the kernels' own A/B; the module's is overheads --group-persistent
        return rows
    names = ("grouped", "per_config")
    modules = _module_ab(n, h, d, repeats, device, "head_groups", fa4_group, names)
    grads = _module_ab(n, h, d, repeats, device, "head_groups", fa4_group, names, True)
    return rows + modules + grads


def persistent(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """:func:`group`'s kernel checks and timings with the grouped forward on one CTA per tile
    and on a persistent grid (``fa4_group.PERSISTENT`` "never" / "always" with no tile bound),
    at ``n // 4`` and ``n``."""
    return group(n, h, d, repeats, device, persistent=(False, True))


def group_bwd(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """``ringattn.kernels.fa4_group_bwd`` (every ``head_groups`` config's backward in one FA4
    launch) against FA4's backward of each config, on issue 5's plan at
    ``n // 4`` (at least its longest segment) and ``n``: each group's dq, dk, dv against FA4's
    (relative error; dQ is added atomically by both), GPU ms and the host's µs per call of both;
    then the module's forward+backward with it on and off."""
    from ringattn.kernels import fa4, fa4_group_bwd
    from ringattn.pattern import make_plan

    rows: list[dict[str, Any]] = []
    scale = d**-0.5
    for size, causal in itertools.product(group_sizes(n), (False, True)):
        plan = make_plan(size, h, tuple(zip(ISSUE_LENGTHS, ISSUE_RATES)), "head_groups")
        q_full, k_full, v_full, dout_full = (
            torch.randn(1, size, h, d, device=device, dtype=torch.bfloat16) for _ in range(4)
        )
        out_full = torch.empty_like(q_full)
        lse_full = torch.empty(1, size, h, device=device)
        grads_full = [torch.full_like(q_full, float("nan")) for _ in range(3)]
        positions = torch.arange(size * h, device=device).view(1, size, h)
        groups, units = [], []
        for block in plan.blocks:

            def part(x: torch.Tensor, block: Block = block) -> torch.Tensor:
                return block.rows(x).flatten(0, 1)

            q, k, v, out, dout = (part(x) for x in (q_full, k_full, v_full, out_full, dout_full))
            lse = part(lse_full)
            out_block, lse_block = fa4.forward(q, k, v, causal, scale)
            out.copy_(out_block)
            lse.copy_(lse_block)
            groups.append((dout, q, k, v, out, lse, *(part(g) for g in grads_full)))
            units.append(part(positions).transpose(1, 2).flatten())
        index = torch.cat(units).to(torch.int32)
        row: dict[str, Any] = {"problem": f"n={size} groups={len(groups)}", "causal": causal}

        def grouped(
            # (fa4_group_bwd.Group's: mypy reads the appended tuples' starred generator as a
            # tuple of any length)
            groups: list[Any] = groups,
            full: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (out_full, dout_full, lse_full),
            index: torch.Tensor = index,
            causal: bool = causal,
        ) -> bool:
            out, dout, lse = full
            return fa4_group_bwd.backward_group_(groups, out, dout, lse, index, causal, scale)

        def per_config(
            groups: list[tuple[torch.Tensor, ...]] = groups, causal: bool = causal
        ) -> None:
            for dout, q, k, v, out, lse, dq, dk, dv in groups:
                fa4.backward(dout, q, k, v, out, lse, causal, scale, (dq, dk, dv))

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                took = grouped()
            torch.cuda.synchronize()
            row["took"] = took
            row["warnings"] = [str(x.message)[:400] for x in caught]
            row["refusal"] = (fa4_group_bwd.last_refusal or "")[:3000]
            got = [g.clone() for g in grads_full]
            per_config()
            torch.cuda.synchronize()
            for name, a, b in zip(("dq", "dk", "dv"), got, grads_full, strict=True):
                # (rows no config selects stay NaN in both: compared where FA4's are written)
                written = ~b.isnan()
                a, b = a[written].float(), b[written].float()
                row[f"{name}_rel"] = float((a - b).norm() / b.norm())
                row[f"{name}_nan"] = int(a.isnan().sum())  # rows the grouped call left out
            row.update(_gpu_and_host_times(grouped=grouped, per_config=per_config, repeats=repeats))
        except Exception as exc:  # a probe: report and go on
            row["error"] = failure(exc, 1500)
            row["refusal"] = (fa4_group_bwd.last_refusal or "")[:3000]
        _emit(rows, row)
    names = ("grouped", "per_config")
    return rows + _module_ab(n, h, d, repeats, device, "head_groups", fa4_group_bwd, names, True)


class _TileSwitch:
    """``fa4.FORWARD_CONFIG[True]`` as an on/off switch for :func:`_module_ab` (on: ``tiles``)."""

    last_refusal = None

    def __init__(self, tiles: tuple[int, int, bool, bool]) -> None:
        self.tiles = tiles

    @property
    def ENABLED(self) -> bool:  # the name the kernels' switches have
        from ringattn.kernels import fa4

        return fa4.FORWARD_CONFIG[True] == self.tiles

    @ENABLED.setter
    def ENABLED(self, on: bool) -> None:
        from ringattn.kernels import fa4

        fa4.FORWARD_CONFIG[True] = self.tiles if on else None


def config(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Both mixings' forward with FA4's causal forward tiles at ``CAUSAL_TILES`` and at FA4's
    default, interleaved (one module per arm; the non-causal rows run the same code in both arms
    and so measure the noise)."""
    from ringattn.kernels import fa4

    switch = _TileSwitch(CAUSAL_TILES)
    try:
        return [
            *_module_ab(n, h, d, repeats, device, "head_groups", switch, ("tiles", "default")),
            *_module_ab(n, h, d, repeats, device, "lse", switch, ("tiles", "default")),
        ]
    finally:
        fa4.FORWARD_CONFIG[True] = None


# the step-20 sweep's best causal configuration on 2048-row blocks (4% ahead of the default)
CAUSAL_TILES = (128, 128, False, True)


def launch(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Host µs per launch of a replayed FA4 forward (small blocks), a torch op and two Triton
    kernels through Triton's launcher (the gradients' fill, unit_stats), issued while
    the GPU sleeps (so launches only queue): on the caller's stream, on a side stream, on a side
    stream that waits for the caller's, and on the caller's stream after it joined a side one."""
    from contextlib import nullcontext

    from ringattn.kernels import fa4, unit_stats, unselected

    q, k, v = (torch.randn(4, 256, 2, d, device=device, dtype=torch.bfloat16) for _ in "qkv")
    out, x = torch.empty_like(q), torch.zeros(1024, device=device)
    table = unselected.selection_table(((2, 1), (1, 0)), device)
    lse, index = torch.zeros(4, 256, 2, device=device), torch.arange(512, device=device)
    stats = torch.empty(2, 256, device=device), torch.empty(2, 256, device=device)
    stat = partial(unit_stats.unit_stats_, q.contiguous(), k.contiguous(), lse, index, 256, *stats)
    calls: dict[str, Callable[[], Any]] = {
        "fa4 forward (replayed)": partial(fa4.forward, q, k, v, False, d**-0.5, out=out),
        "torch add_": partial(x.add_, 1.0),
        "triton fill": partial(unselected.zero_unselected_, out, table),
        "triton unit_stats": stat,
    }
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    count = 20 * repeats
    rows: list[dict[str, Any]] = []
    for name, call in calls.items():
        for _ in range(5):  # recorded, compiled, warm
            call()
        # (where, launched on the side stream, the side stream waits for the caller's, the
        # caller's then waits for the side stream)
        for where, on_side, fork, join in (
            ("caller", False, False, False),
            ("side", True, False, False),
            ("side, waiting for the caller", True, True, False),
            ("caller, after a join", False, True, True),
        ):
            torch.cuda.synchronize()
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on the caller's stream
            if fork:
                side.wait_stream(main)
            if join:
                main.wait_stream(side)
            with torch.cuda.stream(side) if on_side else nullcontext():
                t0 = time.perf_counter()
                for _ in range(count):
                    call()
                host_us = (time.perf_counter() - t0) / count * 1e6
            torch.cuda.synchronize()
            rows.append({"kernel": name, "stream": where, "host_us_per_launch": round(host_us, 2)})
    return rows


def fill(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """The backward's gradient fill (``ringattn.kernels.unselected``: the three gradients as one
    ``[3, n, h, d]`` buffer, issue 5's head_groups selection) over the kernel's rows per program
    and warps: GPU ms, the GB/s of zeros it writes, the host µs per launch (queued behind a
    sleeping GPU), and whether it wrote exactly the unselected pairs; against torch's ``zero_`` of
    the whole buffer."""
    from experiments.ablate import queued_host_ms
    from ringattn import pattern
    from ringattn.kernels import unselected

    plan = pattern.make_plan(n, h, tuple(zip(ISSUE_LENGTHS, ISSUE_RATES)), "head_groups")
    assert plan.selection is not None  # (head_groups plans select)
    table = unselected.selection_table(plan.selection, device)
    grads = torch.empty(3, n, h, d, device=device, dtype=torch.bfloat16)
    rate, offset = (torch.tensor(x, device=device) for x in plan.selection)
    chosen = (torch.arange(n, device=device)[:, None] % rate) == offset  # [n, h]
    zero_bytes = int((~chosen).sum()) * 3 * d * grads.element_size()
    default = unselected.ROWS_PER_PROGRAM, unselected.WARPS

    def host_us(fn: Callable[[], object]) -> float:
        return round(queued_host_ms(fn, 20, 100_000_000) * 1e3, 1)

    rows: list[dict[str, Any]] = []
    try:
        for per_program, warps in itertools.product((1, 2, 4, 8, 16, 32), (4, 8)):
            unselected.ROWS_PER_PROGRAM, unselected.WARPS = per_program, warps
            call = partial(unselected.zero_unselected_, grads, table)  # [3, n, h, d]: b = 3
            grads.fill_(float("nan"))
            call()
            exact = bool((grads[:, ~chosen] == 0).all() and grads[:, chosen].isnan().all())
            ms = _events_ms(call, 3, repeats)
            rows.append(
                {
                    "fill": f"kernel rows={per_program} warps={warps}",
                    "ms": round(ms, 4),
                    "GB/s": round(zero_bytes / ms / 1e6),
                    "host_us": host_us(call),
                    "exact": exact,
                }
            )
    finally:
        unselected.ROWS_PER_PROGRAM, unselected.WARPS = default
    ms = _events_ms(grads.zero_, 3, repeats)
    rows.append(
        {
            "fill": "torch zero_ (all of it)",
            "ms": round(ms, 4),
            "GB/s": round(grads.numel() * grads.element_size() / ms / 1e6),
            "host_us": host_us(grads.zero_),
            "exact": True,
        }
    )
    return rows


# FA4's SM90 backward tile configurations (ringattn.kernels.fa4.BACKWARD_CONFIG's fields, those of
# flash_attn.cute.interface.BwdConfig: m, n, Q / dO / PdS stages, SdP / dKV / dQ swapAB, atom
# layouts M-SdP / N-dKV / M-dQ[, num_wg, dQ_single_wg]) by the names overheads --bwd-tiles takes:
# the sweep's best on 2048-row blocks (step 37: 4-5% faster than FA4's own causal, 2-4%
# non-causal), dQ's stores by one warp group, one P / dS stage, or both
BACKWARD_TILES = {
    "dq1wg": (64, 128, 2, 2, 2, True, False, False, 1, 2, 1, 2, True),
    "pds1": (64, 128, 2, 2, 1, True, False, False, 1, 2, 1),
    "dq1wg_pds1": (64, 128, 2, 2, 1, True, False, False, 1, 2, 1, 2, True),
}

# the configurations --part bwd_sweep times; None: FA4's own (64 x 128 causal, 80 x 128
# non-causal, from C++ FA3 on an H100)
BWD_SWEEP = (
    None,
    (80, 128, 2, 2, 2, True, False, True, 1, 2, 1),
    (64, 128, 2, 2, 2, False, False, False, 1, 2, 1),
    (64, 128, 2, 2, 2, True, True, False, 1, 2, 1),
    BACKWARD_TILES["dq1wg"],
    BACKWARD_TILES["pds1"],
    (96, 128, 2, 2, 2, True, False, True, 1, 2, 1),
    (128, 128, 2, 2, 2, True, False, False, 1, 2, 2),
)


def bwd_sweep(n: int, h: int, d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """FA4's SM90 backward alone on contiguous 2048-row blocks over :data:`BWD_SWEEP` (FA4 takes
    its SM90 backward tiles from ``_tile_size_bwd_sm90`` whatever the caller passes, so each
    configuration is swapped in for its calls as ``fa4.backward`` does; its compile key holds
    them): GPU ms, useful TFLOP/s (2.5x the forward's FLOPs) and the gradients' distance from
    the default's, causal and not; and the dense ``[1, n, h, d]`` problem at the default for the
    rate to beat."""
    from flash_attn.cute import interface

    from ringattn.kernels import fa4

    scale = d**-0.5
    rows: list[dict[str, Any]] = []
    for label, q, k, v in list(problems(n, h, d, device))[:2]:
        batch, length = q.shape[:2]
        for causal in (True, False):
            flops = 2.5 * 4.0 * batch * length * length * d * h / (2 if causal else 1)
            dout = torch.randn_like(q)
            out, lse = interface._flash_attn_fwd(
                q, k, v, softmax_scale=scale, causal=causal, return_lse=True
            )[:2]
            reference: list[torch.Tensor] | None = None
            for config in BWD_SWEEP if label != "dense" else (None,):
                row: dict[str, Any] = {
                    "problem": label,
                    "causal": causal,
                    "config": config or "default",
                }
                try:
                    with fa4._tiles(interface, config):
                        fn = partial(
                            interface._flash_attn_bwd, q, k, v, out, dout, lse, scale, causal
                        )
                        grads = [g.float() for g in fn()[:3]]
                        if config is None:
                            reference = grads
                        if reference is not None:  # (where the default raised, the first
                            # config that ran was the reference, 0 from itself "vs default")
                            row["rel_err_vs_default"] = worst(
                                float((g - r).norm() / r.norm()) for g, r in zip(grads, reference)
                            )
                        ms = _events_ms(fn, 2, repeats)
                    row.update(bwd_ms=ms, tflops=tflops(flops, ms))
                except Exception as exc:
                    row["error"] = failure(exc, 200)
                _emit(rows, row)
    return rows


# --n as each part's shapes take it: compare, replay and bwd_sweep view it as segment_local's
# (4096, 2) blocks (else a view failed, compare's after its dense and block rows); sweep and
# determinism as 2048-row blocks (sweep's TFLOP/s counted all n rows); zero as whole segments
# of its w = 32768 config (the rows past them stayed NaN: nan_left and zeros_exact read as the
# kernel's failure); merge, add and merge_cost need one (4096, 2) segment
N_MULTIPLE = {"compare": 4096, "replay": 4096, "bwd_sweep": 4096, "sweep": 2048}
N_MULTIPLE |= {"determinism": 2048, "zero": 32768}
N_AT_LEAST = {"merge": 4096, "add": 4096, "dpsum": 4096, "merge_cost": 4096}


def n_error(part: str, n: int, h: int) -> str | None:
    """Why ``--part part`` cannot run at ``--n n`` with ``h`` heads, or None (checked before
    CUDA starts)."""
    if n % N_MULTIPLE.get(part, 1):
        return f"--n {n}: --part {part} needs a multiple of {N_MULTIPLE[part]}"
    if n < N_AT_LEAST.get(part, 1):
        return f"--n {n}: --part {part} needs at least {N_AT_LEAST[part]}"
    if part in ("group", "persistent"):  # (its assertion failed, after the sizes before it ran)
        from ringattn.pattern import make_plan

        for size in group_sizes(n):
            plan = make_plan(size, h, tuple(zip(ISSUE_LENGTHS, ISSUE_RATES)), "head_groups")
            if any(block.tail for block in plan.blocks):
                longest = max(ISSUE_LENGTHS)
                return (
                    f"--n {n}: --part {part} runs issue 5's plan at n/4 (at least {longest}) "
                    f"and n, and at {size} a config has a tail (n a multiple of {longest} up "
                    f"to {4 * longest}, of {4 * longest} above)"
                )
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=131072, help="sequence length (default: %(default)s)"
    )
    add_heads(parser, "--head-dim")
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed calls per number, median reported (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="folder for fa4_probe[_<part>].json (default: the working directory)",
    )
    parser.add_argument(
        "--part",
        choices=[
            "compare",
            "sweep",
            "determinism",
            "replay",
            "merge",
            "merge_cost",
            "add",
            "dpsum",
            "zero",
            "config",
            "launch",
            "fill",
            "group",
            "group_bwd",
            "persistent",
            "bwd_sweep",
        ],
        default="compare",
        help="compare (default): FA4 against cuDNN on dense and strided blocks; the others are "
        "the probes of docs/benchmarks/h200_perf.md's steps, each described by its function's "
        "docstring",
    )
    args = parser.parse_args(argv)
    # (--repeats 0: an IndexError from the empty median after the part's first kernels ran)
    require_positive(parser, args, "n", "heads", "head_dim", "repeats")
    if error := n_error(args.part, args.n, args.heads):
        parser.error(error)
    require_cuda(parser.prog)
    make_out(parser, args.out)  # before the part (made after it, a bad --out lost its rows)
    device = torch.device("cuda")
    torch.manual_seed(0)
    h, d = args.heads, args.head_dim
    if args.part != "compare":
        run_part = {
            "sweep": sweep,
            "determinism": determinism,
            "replay": replay,
            "merge": merge,
            "merge_cost": merge_cost,
            "add": add,
            "dpsum": dpsum,
            "zero": zero,
            "config": config,
            "launch": launch,
            "fill": fill,
            "group": group,
            "group_bwd": group_bwd,
            "persistent": persistent,
            "bwd_sweep": bwd_sweep,
        }[args.part]
        rows = run_part(args.n, h, d, args.repeats, device)
        (args.out / f"fa4_probe_{args.part}.json").write_text(json.dumps(rows, indent=1))
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, n={args.n}")
        for row in rows:
            print(" | ".join(f"{key}={value}" for key, value in row.items()))
        return
    scale = d**-0.5
    rows = []
    for label, q, k, v in problems(args.n, h, d, device):
        batch, length = q.shape[:2]
        for causal in (False, True):
            flops = 4.0 * batch * length * length * d * h / (2 if causal else 1)
            dout = torch.randn_like(q)
            row = {"problem": label, "causal": causal, "shape": list(q.shape)}
            ref_out, ref_lse = _cudnn(q, k, v, causal, scale)
            for name, fn in (("cudnn", _cudnn), ("fa4", _fa4)):
                try:
                    t0 = time.perf_counter()
                    out, lse = fn(q, k, v, causal, scale)
                    torch.cuda.synchronize()
                    row[f"{name}_first_s"] = round(time.perf_counter() - t0, 2)
                    if name == "fa4":
                        err = (out.float() - ref_out.float()).norm() / ref_out.float().norm()
                        row["fa4_out_rel_err"] = float(err)
                        lse_ref = ref_lse.float().reshape(lse.shape)
                        row["fa4_lse_max_abs"] = float((lse.float() - lse_ref).abs().max())
                    fwd = _events_ms(partial(fn, q, k, v, causal, scale), 2, args.repeats)
                    fb = _events_ms(partial(fn, q, k, v, causal, scale, dout), 2, args.repeats)
                    row[f"{name}_fwd_ms"] = fwd
                    row[f"{name}_fwdbwd_ms"] = fb
                    row[f"{name}_fwd_tflops"] = tflops(flops, fwd)
                    row[f"{name}_fwdbwd_tflops"] = tflops(FORWARD_BACKWARD_FACTOR * flops, fb)
                except Exception as exc:  # a probe: report and go on
                    row[f"{name}_error"] = failure(exc, 300)
            if label == "strided w4096 r2":
                # FA4 writing into the strided rows of a [1, n, h, d] output (placed blocks)
                try:
                    full = torch.empty(1, args.n, h, d, device=device, dtype=torch.bfloat16)
                    view = full.view(args.n // 4096, 2048, 2, h, d)[:, :, 0]
                    _fa4(q, k, v, causal, scale, out=view)
                    err = (view.float() - ref_out.float()).norm() / ref_out.float().norm()
                    row["fa4_into_rel_err"] = float(err)
                    row["fa4_into_fwd_ms"] = _events_ms(
                        partial(_fa4, q, k, v, causal, scale, out=view), 2, args.repeats
                    )
                except Exception as exc:
                    row["fa4_into_error"] = failure(exc, 300)
            _emit(rows, row)
    (args.out / "fa4_probe.json").write_text(json.dumps(rows, indent=1))
    dense = {r["causal"]: r for r in rows if r["problem"] == "dense"}
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, n={args.n}, h={h}, d={d}")
    print("problem | causal | cudnn fwd | fa4 fwd | cudnn f+b | fa4 f+b (TFLOP/s; x cuDNN dense)")
    for r in rows:
        base = dense[r["causal"]]
        cells = []
        for key in (
            "cudnn_fwd_tflops",
            "fa4_fwd_tflops",
            "cudnn_fwdbwd_tflops",
            "fa4_fwdbwd_tflops",
        ):
            value, ref = r.get(key), base.get(key.replace("fa4", "cudnn"))
            cells.append(f"{value:.0f} ({value / ref:.2f})" if value and ref else "-")
        print(f"{r['problem']} | {r['causal']} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
