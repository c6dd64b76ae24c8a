"""Which fused kernel is the ceiling, and what the dilated blocks get from each (GPU).

    python -m experiments.sdpa_backends [--out DIR]

1. Which backend ``F.scaled_dot_product_attention`` picks for the dense baseline, and each
   backend's TFLOP/s on it (forward, forward+backward).
2. The same for the shape of one dilated block (``[b*S, w/r, H, d]``), contiguous and as the
   strided view that ``segment_local`` hands over.
3. The LSE-returning aten ops (flash, cuDNN) agree on output and LSE for strided views, and their
   backwards with the same (out, lse) agree.
4. A profile of one eager ``segment_local/sdpa`` forward+backward (top kernels by GPU time).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringattn
from experiments import ISSUE_LENGTHS, ISSUE_RATES, ablate, require_cuda
from ringattn.flops import dense_flops, tflops

aten = torch.ops.aten


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    return ablate.median_ms(fn, torch.device("cuda"), warmup=2, repeats=repeats)


def backend_rates(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, label: str
) -> list[dict[str, Any]]:
    """q, k, v: [B, H, L, d] (any strides)."""
    b, h, length, d = q.shape
    flops_f = dense_flops(b, length, h, d, causal=False)
    flops_fb = dense_flops(b, length, h, d, causal=False, backward=True)
    rows: list[dict[str, Any]] = []
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ):
        try:
            with sdpa_kernel([backend]):
                fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                xs = [x.detach().requires_grad_() for x in (q, k, v)]
                grad = torch.randn_like(q)

                def fb(xs: list[torch.Tensor] = xs, grad: torch.Tensor = grad) -> None:
                    F.scaled_dot_product_attention(xs[0], xs[1], xs[2]).backward(grad)

                fwdbwd = median_ms(fb)
            rows.append(
                {
                    "shape": label,
                    "backend": backend.name,
                    "fwd_ms": fwd,
                    "fwd_tflops": tflops(flops_f, fwd),
                    "fwdbwd_ms": fwdbwd,
                    "fwdbwd_tflops": tflops(flops_fb, fwdbwd),
                }
            )
        except Exception as exc:
            rows.append({"shape": label, "backend": backend.name, "error": str(exc)[:200]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def lse_ops_agree(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Any]:
    """Flash vs cuDNN aten ops on [B, H, L, d] strided views: out, LSE, and backward."""
    out_f, lse_f = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    out_c, lse_c = res[0], res[1]
    report = {
        "cudnn_out_strides": list(out_c.stride()),
        "cudnn_lse_shape": list(lse_c.shape),
        "cudnn_lse_strides": list(lse_c.stride()),
        "cudnn_lse_dtype": str(lse_c.dtype),
        "flash_lse_shape": list(lse_f.shape),
        "out_maxdiff": (out_f.float() - out_c.float()).abs().max().item(),
        "lse_maxdiff": (lse_f.float() - lse_c.float().reshape(lse_f.shape)).abs().max().item(),
    }
    dout = torch.randn_like(q)
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    length = q.shape[2]
    g_f = aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out_f, lse_f, None, None, length, length, 0.0, False, seed, seed
    )
    for bias_name, bias in (("None", None), ("empty", torch.empty(0, device=q.device))):
        try:
            g_c = aten._scaled_dot_product_cudnn_attention_backward(
                dout,
                q,
                k,
                v,
                out_c,
                lse_c,
                res[6],
                res[7],
                bias,
                res[2],
                res[3],
                length,
                length,
                0.0,
                False,
            )
            report[f"grad_maxdiff_bias_{bias_name}"] = max(
                (a.float() - b.float()).abs().max().item() for a, b in zip(g_f, g_c)
            )
            report["cudnn_grad_strides"] = [list(g.stride()) for g in g_c]
        except Exception as exc:
            report[f"cudnn_backward_error_bias_{bias_name}"] = str(exc)[:300]
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "sdpa_backends",
        help="folder for sdpa_backends.md / .json (default: %(default)s)",
    )
    args = p.parse_args(argv)
    require_cuda(p.prog)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    n, h, d = 32768, 16, 128
    q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=dt) for _ in range(3))
    report["dense_choice"] = int(torch._fused_sdp_choice(q, k, v))
    rows = backend_rates(q, k, v, f"dense n={n}")

    # one block of issue 5's first config (w=2048, r=1) over 131072 tokens, 4 heads of 16
    big = torch.randn(1, 131072, h, d, device=dev, dtype=dt)
    seg = big.unflatten(1, (64, 2048))  # [1, S, w, h, d]
    strided = seg[0, :, :, 0:4].transpose(1, 2)  # [S, 4, w, d] view, row stride h*d
    rows += backend_rates(strided, strided, strided, "block 64x2048 4 heads strided")
    contiguous = strided.contiguous()
    rows += backend_rates(contiguous, contiguous, contiguous, "block 64x2048 4 heads contiguous")
    dil = seg[0, :, 1::2, 4:7].transpose(1, 2)  # r=2: every other row, 3 heads
    rows += backend_rates(dil, dil, dil, "block 64x1024 r=2 3 heads strided")
    report["sdpa"] = rows
    report["lse_ops"] = lse_ops_agree(strided, strided, strided)
    print(json.dumps(report["lse_ops"]), flush=True)

    # where an eager segment_local/sdpa forward+backward spends its GPU time
    x = [torch.randn(1, 131072, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3)]
    grad = torch.randn_like(x[0])
    for mixing in ("head_groups", "lse"):
        module = ringattn.DilatedAttention(ISSUE_LENGTHS, ISSUE_RATES, mixing=mixing, compile=False)
        module(*x).backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            module(*x).backward(grad)
            torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=14, max_name_column_width=70
        )
        print(f"profile {mixing}\n{table}", flush=True)
        (args.out / f"profile_{mixing}.txt").write_text(table)
    (args.out / "sdpa_backends.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
