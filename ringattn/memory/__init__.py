"""MemoryManager strategies (registry kind ``"memory"``)."""

from ringattn.memory import none, pooled  # noqa: F401  (registers)
from ringattn.memory.base import MemoryManager

__all__ = ["MemoryManager"]
