"""AttentionComputer: plain (optionally causal) attention over a batch of equal-length blocks.

Inputs are ``[B, L, H, d]`` (B independent problems, L rows each); the forward returns the output
and the per-row log-sum-exp ``[B, L, H]`` (float32, or float64 for float64 inputs). The backward
takes the *merged* output and LSE of the whole dilated attention for these rows: with them, the
flash-attention backward of each block gives exactly that block's share of the gradient of the
merged (multi-config) softmax, so no gradient ever has to flow through an LSE.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from jaxtyping import Float
from torch import Tensor

from ringattn.component import Component

Rows = Float[Tensor, "B L H d"]
RowsLSE = Float[Tensor, "B L H"]


class AttentionComputer(Component):
    def unsupported(self, dtype: torch.dtype, device: torch.device, needs_grad: bool) -> str | None:
        """Why this computer cannot run these inputs (checked eagerly, before any work)."""
        return None

    @abstractmethod
    def forward(
        self, q: Rows, k: Rows, v: Rows, causal: bool, scale: float
    ) -> tuple[Rows, RowsLSE]: ...

    @abstractmethod
    def backward(
        self,
        dout: Rows,
        q: Rows,
        k: Rows,
        v: Rows,
        out: Rows,
        lse: RowsLSE,
        causal: bool,
        scale: float,
    ) -> tuple[Rows, Rows, Rows]: ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and merges run in float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
