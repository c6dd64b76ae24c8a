"""jaxtyping aliases for the one layout every component boundary uses: ``[b, n, h, d]``."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

# batch, sequence, heads, head dim
BNHD = Float[Tensor, "b n h d"]
# per-row log-sum-exp, same leading layout without the head dim
BNH = Float[Tensor, "b n h"]

__all__ = ["BNH", "BNHD"]
