"""AttentionComputer strategies (registry kind ``"computer"``)."""

from ringattn.computers import math, sdpa  # noqa: F401  (registers)
from ringattn.computers.base import AttentionComputer, accumulation_dtype

__all__ = ["AttentionComputer", "accumulation_dtype"]
