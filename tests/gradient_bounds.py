"""Gradient bounds against the float64 oracle, shared by tests/test_strategies.py and the gloo
ranks' tests/dist_cases.py.

Attention gradients can be ill-conditioned (dK cancels where a query's probabilities are near
0 or 1): then even PyTorch's own attention in the inputs' precision misses the float64 gradient
by more than the dtype's bound. Following FlashAttention's tests, a gradient passes if its error
is within the dtype's bound *or* within 4x a naive baseline's error on the same inputs (plain
dense autograd attention in the inputs' precision), plus the share that the strategy's own
output rounding propagates into it (:func:`propagated_output_errors`).
"""

from __future__ import annotations

import torch

from ringattn import reference


def naive_gradients(q, k, v, grad_out, opts: dict) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv of plain dense autograd attention (one softmax over the pattern's
    multiplicities) run in the inputs' own precision."""
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = reference.dilated_attention_by_multiplicity(*inputs, **opts, dtype=q.dtype)
    return torch.autograd.grad(out, inputs, grad_out.to(q.dtype))


def propagated_output_errors(out, ref, lse_ref, ref_inputs, ref_grads, grad_out, floor: float):
    """Gradient errors (dq, dk, dv) that a merged-stats backward makes, by design, from the
    output it is given.

    Such a backward (FlashAttention's, cuDNN's, FA4's, and this library's for every block
    computer) forms ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)`` read from the forward's
    *rounded* output ``O``. Where a row's softmax is sharp, ``dP ≈ D`` cancels and dQ / dK carry
    ``O``'s rounding amplified (bf16, ``scale=1.7``, d=8: dK 0.034 off from an output 0.0011
    off; the naive baseline, autograd through a softmax, forms no ``D``). In exact arithmetic
    that backward's gradients from ``out`` are the oracle's plus those of
    ``sum((D_ref - D_out) * LSE)`` (as ``dLSE_i / dS_ij = P_ij``); this returns their sizes
    relative to the oracle's gradients. By the triangle inequality a strategy's gradient error
    is at most this plus its backward's own error on the inputs it was given.
    """
    shifts = gradient_shifts(out, ref, lse_ref, ref_inputs, grad_out)
    return [
        float(shift.norm()) / max(float(g.norm()), floor)
        for shift, g in zip(shifts, ref_grads, strict=True)
    ]


def gradient_shifts(out, ref, lse_ref, ref_inputs, grad_out) -> list[torch.Tensor]:
    """The gradients of ``sum((D_ref - D_out) * LSE)`` (see :func:`propagated_output_errors`)."""
    d_shift = (grad_out * (ref.detach() - out.detach().double())).sum(-1)
    lse = torch.where(torch.isfinite(lse_ref), lse_ref, 0.0)  # (unselected rows: no gradient)
    shifts = torch.autograd.grad(
        (d_shift * lse).sum(), ref_inputs, retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(shifts, ref_inputs)]


def grad_floor(grad_out: torch.Tensor) -> float:
    # A gradient that is exactly zero in exact arithmetic (e.g. dq when each query sees a single
    # key) is rounding noise in floating point; measure it against the scale of the incoming
    # gradient instead of against zero. A wrong gradient is O(‖grad_out‖) and still fails.
    return 0.1 * float(grad_out.norm())
