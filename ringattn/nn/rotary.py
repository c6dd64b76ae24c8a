"""Rotary position embedding (RoPE) on ``[b, n, h, d]`` tensors at absolute positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rotary(x: Tensor, positions: Tensor, base: float | None = None) -> Tensor:
    """Rotate pairs of channels of ``x: [b, n, h, d]`` (d even) by angles ``positions[n] · θ_i``,
    ``θ_i = base^(-2i/d)``, ``base`` 10000 by default. Pair ``i`` is channels ``2i`` and
    ``2i + 1`` (interleaved, not the two halves of ``d``); ``positions``: ``[n]``, integer or
    floating. Returns ``x``'s shape and dtype (computed in float32, float64 for float64 ``x``)."""
    # (an integer x came back rotated and truncated to ints, and a base <= 0 or NaN gave NaN
    # angles: both silently; non-tensors raised AttributeError)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating [b, n, h, d] tensor, got {got}")
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a tensor, got {type(positions).__name__}")
    if positions.is_complex() or positions.dtype == torch.bool:
        # (complex positions lost their imaginary part in the float64 angles, silently)
        raise TypeError(f"positions must be real (integer or floating), got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"positions must be on x's device {x.device}, got {positions.device}")
    if base is not None:
        if isinstance(base, bool) or not isinstance(base, (int, float)):
            raise TypeError(f"base must be a float, got {type(base).__name__} {base!r}")
        if not 0 < base < math.inf:
            raise ValueError(f"base must be finite and > 0, got {base!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [b, n, h, d], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got d={d}")
    if positions.shape != (x.shape[1],):
        raise ValueError(
            f"positions must be [n] = [{x.shape[1]}] (one per row of x), got "
            f"{tuple(positions.shape)}"
        )
    # angles in float64: at a million positions a float32 angle is off by ~0.03 rad
    exponents = -torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d
    # the default written here, not as the argument's default: under torch.compile(dynamic=True)
    # Dynamo makes a float default (or global) a graph input, and two checkpointed layers then
    # failed inside Dynamo ("lift_tracked_freevar_to_input ... root SubgraphTracer", PyTorch
    # issue 193194); a literal stays a constant
    inv_freq = (10000.0 if base is None else base) ** exponents
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [n, d/2]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = (f(angles).to(work)[None, :, None, :] for f in (torch.cos, torch.sin))
    x1, x2 = x.to(work)[..., 0::2], x.to(work)[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)
