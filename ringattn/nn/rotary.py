"""Rotary position embedding (RoPE) on ``[b, n, h, d]`` tensors at absolute positions."""

from __future__ import annotations

import torch
from torch import Tensor


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate pairs of channels of ``x: [b, n, h, d]`` (d even) by angles ``positions[n] · θ_i``."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got d={d}")
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [n, d/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)
