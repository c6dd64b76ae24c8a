"""Gradient error where each query sees one key, against torch's own SDPA on the same rows.

    python -m experiments.one_key_grads --device cuda

With ``w = r`` every dilated block has one row, so dQ and dK are exactly zero and dV is the
output gradient. ``computer="math"`` (autograd through a softmax) cancels exactly there; a
flash-style backward forms ``D = rowsum(dO ∘ O)`` from the rounded output and leaves its
rounding in dQ and dK. This prints, for float32 inputs, the output / gradient error against the
float64 oracle of ``sdpa`` and ``math``, and of ``F.scaled_dot_product_attention`` with every row
as its own one-key sequence (default backend, then each backend named): if ``sdpa``'s matches
torch's, the error is the kernel's, not the library's (``docs/benchmarks/h200_perf.md``, step 56;
``experiments/gpu_fuzz.py`` measures gradients accordingly). Gradients are compared
concatenated, relative to their joint norm.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringattn
from experiments.ablate import rel_err
from ringattn import reference

CASES = ((64, None), (128, None), (64, 1.0), (16, None))  # (d, scale)


def _grads(
    fn: Callable[..., torch.Tensor], grad_out: torch.Tensor, *inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, grad_out.to(out.dtype))
    return out, torch.cat([g.flatten() for g in grads])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default: cuda)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("one_key_grads: error: --device cuda, but CUDA is not available here")
    torch.manual_seed(0)
    b, n, h, w = 3, 12, 3, 4
    backends = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    for d, scale in CASES:
        q, k, v, grad_out = (torch.randn(b, n, h, d, device=args.device) for _ in range(4))
        wide = [x.double() for x in (q, k, v)]

        def oracle(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = scale
        ) -> torch.Tensor:
            return reference.dilated_attention(
                q, k, v, segment_lengths=(w,), dilation_rates=(w,), scale=scale
            )

        def one_key(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            scale: float | None = scale,
            d: int = d,
        ) -> torch.Tensor:  # every row its own sequence
            q1, k1, v1 = (x.reshape(b * n, 1, h, d).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q1, k1, v1, scale=scale)
            return out.transpose(1, 2).reshape(b, n, h, d)

        line = [f"d={d} scale={scale}"]
        ref_out, ref_grads = _grads(oracle, grad_out, *wide)
        for computer in ("sdpa", "math"):
            module = ringattn.DilatedAttention(
                segment_lengths=(w,),
                dilation_rates=(w,),
                scale=scale,
                strategy=ringattn.Strategy(computer=computer),
                compile=False,
            )
            out, grads = _grads(module, grad_out, q, k, v)
            line.append(f"{computer} {rel_err(out, ref_out):.3g}/{rel_err(grads, ref_grads):.3g}")
        ref_out, ref_grads = _grads(one_key, grad_out, *wide)
        out, grads = _grads(one_key, grad_out, q, k, v)
        line.append(f"F.sdpa {rel_err(out, ref_out):.3g}/{rel_err(grads, ref_grads):.3g}")
        for backend in backends if args.device == "cuda" else backends[1:]:
            with sdpa_kernel(backend):
                out, grads = _grads(one_key, grad_out, q, k, v)
            line.append(
                f"{backend.name} {rel_err(out, ref_out):.3g}/{rel_err(grads, ref_grads):.3g}"
            )
        print(" | ".join(line))


if __name__ == "__main__":
    main()
