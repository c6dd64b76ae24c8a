"""ringattn: LongNet dilated attention with interchangeable, compiled, property-tested strategies.

Importing the package registers every built-in strategy (see :mod:`ringattn.registry`).
"""

from ringattn import communicators, computers, dilation, memory, registry  # noqa: F401
from ringattn.api import DilatedAttention, UnsupportedError, dilated_attention
from ringattn.config import DilatedConfig
from ringattn.nn import MultiheadDilatedAttention
from ringattn.strategy import Strategy

__all__ = [
    "DilatedAttention",
    "DilatedConfig",
    "MultiheadDilatedAttention",
    "Strategy",
    "UnsupportedError",
    "dilated_attention",
    "registry",
]
__version__ = "0.1.0"
