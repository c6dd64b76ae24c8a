"""AttentionComputer strategies (registry kind ``"computer"``)."""

from ringattn.computers import flex, math, sdpa  # noqa: F401  (registers)
from ringattn.computers.base import (
    AttentionComputer,
    BlockComputer,
    LayoutComputer,
    accumulation_dtype,
)

__all__ = ["AttentionComputer", "BlockComputer", "LayoutComputer", "accumulation_dtype"]
