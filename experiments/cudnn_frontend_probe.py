"""The measurements behind step 11 of docs/benchmarks/h200_perf.md (placed blocks written in place
through NVIDIA's cuDNN frontend), as one script. Needs a CUDA GPU and ``nvidia-cudnn-frontend``.

    python -m experiments.cudnn_frontend_probe --part probe      # one block: in place vs op + copy
    python -m experiments.cudnn_frontend_probe --part host       # host µs per placed forward call
    python -m experiments.cudnn_frontend_probe --part retention  # memory held after a call, gc off
    python -m experiments.cudnn_frontend_probe --part plans      # every cuDNN plan of a block

``probe``: a 3-head ``r = 2`` block of a 131K ``[1, n, 16, 128]`` bf16 tensor (the shape of a
``head_groups`` block), forward and backward written into strided views by
``ringattn.kernels.cudnn_graphs`` vs torch's cuDNN op followed by the copy into place, and the op
alone; outputs compared. ``host``: the same on a small block, where the host sets the pace
(``triton.testing.do_bench`` would hide it; wall time over many calls with no sync). ``retention``:
with the garbage collector off, a fresh module's first forward+backward per mixing, then how much
memory stays allocated after its tensors are dropped (must be 0: graph builds run off the caller's
stack). The report's numbers were taken with earlier ad-hoc forms of these measurements; this is
their method, kept with the code. ``plans``: every execution plan cuDNN offers (heuristics A, B
and fallback) for the forward and backward of issue 5's blocks at 131K (a ``head_groups`` block:
3 heads, ``r = 1`` and ``r = 16``; an ``lse`` block: 16 heads, ``r = 2``), causal and not, each
timed: does the heuristics' first choice (what :mod:`ringattn.kernels.cudnn_graphs` runs) leave
speed on the table?
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

import ringattn
from experiments import ISSUE_LENGTHS, ISSUE_RATES, require_cuda
from experiments.ablate import median_ms, rel_err
from ringattn.kernels import cudnn_graphs
from ringattn.kernels.cudnn_graphs import cudnn

aten = torch.ops.aten


def strided_block(x: torch.Tensor, r: int, w: int, head0: int, heads: int) -> torch.Tensor:
    """``[segments, w / r, heads, d]`` view of ``x: [1, n, h, d]``: rows s*w + j*r, heads
    head0.."""
    _, n, h, d = x.shape
    shape = (n // w, w // r, heads, d)
    return x.as_strided(shape, (w * h * d, r * h * d, d, 1), head0 * d)


def torch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = aten._scaled_dot_product_cudnn_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), None, True, 0.0, False, False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse.squeeze(-1).transpose(1, 2)


def probe(n: int = 131072, r: int = 2, w: int = 4096) -> None:
    x = [torch.randn(1, n, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    q, k, v, dout = (strided_block(t, r, w, 4, 3) for t in x)
    targets = [torch.full_like(x[0], float("nan")) for _ in range(4)]
    out, dq, dk, dv = (strided_block(t, r, w, 4, 3) for t in targets)
    lse = torch.empty(q.shape[:3], device="cuda")
    scale = 128**-0.5

    def in_place_fwd() -> None:
        assert cudnn_graphs.forward_into(q, k, v, out, lse, False, scale)

    def copy_fwd() -> None:
        o, s = torch_forward(q, k, v, scale)
        out.copy_(o)
        lse.copy_(s)

    in_place_fwd()
    ref_out, ref_lse = torch_forward(q, k, v, scale)
    print(f"forward: out error {rel_err(out, ref_out):.2e}, lse error {rel_err(lse, ref_lse):.2e}")
    device = torch.device("cuda")
    fn: Callable[[], object]
    for name, fn in (
        ("in place", in_place_fwd),
        ("op + copy", copy_fwd),
        ("op alone", lambda: torch_forward(q, k, v, scale)),
    ):
        print(f"forward {name:10s} {median_ms(fn, device, 3, 20):.3f} ms")

    out_view = out.clone()  # the backward reads the merged output; here the block's own
    seed = torch.zeros((), dtype=torch.int64, device="cuda")

    def torch_backward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        grads = aten._scaled_dot_product_cudnn_attention_backward(
            *(t.transpose(1, 2) for t in (dout.contiguous(), q, k, v, out_view.contiguous())),
            lse.transpose(1, 2).unsqueeze(-1).contiguous(),
            seed,
            seed,
            None,
            None,
            None,
            q.shape[1],
            q.shape[1],
            0.0,
            False,
            scale=scale,
        )
        return grads

    def in_place_bwd() -> None:
        assert cudnn_graphs.backward_into(dout, q, k, v, out_view, lse, (dq, dk, dv), False, scale)

    def copy_bwd() -> None:
        for grad, g in zip((dq, dk, dv), torch_backward()):
            grad.copy_(g.transpose(1, 2))

    in_place_bwd()
    for name, grad, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), torch_backward()):
        print(f"backward: {name} error {rel_err(grad, ref.transpose(1, 2)):.2e}")
    for name, fn in (
        ("in place", in_place_bwd),
        ("op + copy", copy_bwd),
        ("op alone", torch_backward),
    ):
        print(f"backward {name:10s} {median_ms(fn, device, 3, 20):.3f} ms")


def host(calls: int = 2000) -> None:
    x = [torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    q, k, v, out = (strided_block(t, 2, 256, 0, 4) for t in x)
    scale = 128**-0.5

    def copy_fwd() -> None:
        out.copy_(torch_forward(q, k, v, scale)[0])

    for name, fn in (
        (
            "forward_into (in place)",
            lambda: cudnn_graphs.forward_into(q, k, v, out, None, False, scale),
        ),
        ("torch op + copy", copy_fwd),
    ):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host_us = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        print(f"{name:25s} {host_us:6.1f} µs of host time per call")


def retention(n: int = 131072) -> None:
    gc.disable()
    try:
        q, k, v, dout = (
            torch.randn(1, n, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)
        )
        unit = q.numel() * q.element_size()
        for mixing in ("head_groups", "lse"):
            base = torch.cuda.memory_allocated()
            attention = ringattn.DilatedAttention(
                ISSUE_LENGTHS, ISSUE_RATES, mixing=mixing, compile=False
            )
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            out = attention(*xs)
            out.backward(dout)
            del out, xs, attention
            torch.cuda.synchronize()
            held = (torch.cuda.memory_allocated() - base) / unit
            print(f"{mixing}: held after the first call, gc off: {held:.2f} x size of q")
    finally:
        gc.enable()


def _all_plans(graph: Any) -> Any:  # (a _Graph, then its frontend graph: untyped)
    """``_Graph.built`` with every heuristic mode's plans, all of them built (for timing)."""
    graph = graph.graph
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    return graph


def _time_plans(
    graph: Any,  # (the frontend's graph and handle: untyped)
    operands: list[torch.Tensor],
    uids: tuple[int, ...],
    handle: Any,
    device: torch.device,
) -> list[tuple[str, float]]:
    rows = []
    for index in range(graph.get_execution_plan_count()):
        try:
            name = graph.get_plan_name_at_index(index)
            ws_bytes = max(graph.get_workspace_size_plan_at_index(index), 1)
            ws = torch.empty(ws_bytes, dtype=torch.uint8, device=device)

            def call(index: int = index, ws: torch.Tensor = ws) -> None:
                graph.execute_plan_at_index(operands, ws, index, handle, tensor_uids=uids)

            rows.append((name, median_ms(call, device, 3, 15)))
        except Exception as e:  # a plan that did not build: say so, time the others
            rows.append((f"plan {index}: {type(e).__name__}: {str(e)[:80]}", float("nan")))
    return rows


def plans(n: int = 131072) -> None:
    cg = cudnn_graphs
    cg._Graph.built = _all_plans  # type: ignore[method-assign, assignment]  # (this process only: every plan)
    device = torch.device("cuda", torch.cuda.current_device())  # (cuDNN handles per index)
    scale = 128**-0.5
    x = [torch.randn(1, n, 16, 128, device=device, dtype=torch.bfloat16) for _ in range(8)]
    for label, r, w, heads in (
        ("head_groups r=1", 1, 2048, 3),
        ("head_groups r=16", 16, 32768, 3),
        ("lse r=2", 2, 4096, 16),
    ):
        q, k, v, out, dout, dq, dk, dv = (strided_block(t, r, w, 0, heads) for t in x)
        lse = torch.empty(q.shape[:3], device=device)
        for causal in (False, True):
            stats = torch.empty(cg._stats(lse).shape, device=device)
            fwd_ops = [cg._bhsd(t) for t in (q, k, v, out)] + [stats]
            graph = cg._forward_graph(device, causal, scale, *map(cg._layout, fwd_ops))
            handle = cg._handle(device)
            fwd_uids = (*cg._FORWARD_UIDS, cg._STATS)
            cg._execute(graph, graph.get_workspace_size() + 1, fwd_uids, fwd_ops, device)
            bwd_ops = [cg._bhsd(t) for t in (q, k, v, out, dout)]
            bwd_ops += [stats, *(cg._bhsd(t) for t in (dq, dk, dv))]
            bgraph = cg._backward_graph(device, causal, scale, *map(cg._layout, bwd_ops))
            for part, g, ops, uids in (
                ("forward", graph, fwd_ops, fwd_uids),
                ("backward", bgraph, bwd_ops, cg._BACKWARD_UIDS),
            ):
                rows = _time_plans(g, ops, uids, handle, device)
                first = rows[0][1]
                for i, (name, ms) in enumerate(rows):
                    print(
                        f"{label:17s} causal={causal!s:5s} {part:8s} plan {i}: {ms:8.3f} ms "
                        f"({ms / first:5.2f}x plan 0)  {name}",
                        flush=True,
                    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--part",
        choices=["probe", "host", "retention", "plans", "all"],
        default="all",
        help="probe: a placed block in place vs torch's op + copy; host: host µs per call; "
        "retention: memory held after a call; plans: every cuDNN plan of issue 5's blocks, "
        "timed; all (default)",
    )
    args = p.parse_args(argv)
    require_cuda("cudnn_frontend_probe")
    if cudnn_graphs.cudnn is None:
        raise SystemExit("needs nvidia-cudnn-frontend (pip install 'ringattn[cuda]')")
    for part, fn in (("probe", probe), ("host", host), ("retention", retention), ("plans", plans)):
        if args.part in (part, "all"):
            print(f"== {part}", flush=True)
            fn()


if __name__ == "__main__":
    main()
