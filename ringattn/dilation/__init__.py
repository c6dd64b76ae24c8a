"""DilationProcessor strategies (registry kind ``"dilation"``)."""

from ringattn.dilation import global_perm, segment_local  # noqa: F401  (registers)
from ringattn.dilation.base import DilationProcessor
from ringattn.dilation.global_perm import global_permutation

__all__ = ["DilationProcessor", "global_permutation"]
