"""ringattn: LongNet dilated attention with interchangeable, compiled, property-tested strategies.

Importing the package registers every built-in strategy (see :mod:`ringattn.registry`).
"""

# the components' packages register the strategies; the others are reachable as attributes
# (ringattn.reference.dilated_attention, ringattn.models.LongNet) without an import of their own
from ringattn import (
    communicators,
    computers,
    dilation,
    distributed,
    memory,
    models,
    reference,
    registry,
)
from ringattn.api import DilatedAttention, UnsupportedError
from ringattn.config import DilatedConfig
from ringattn.functional import dilated_attention
from ringattn.nn import MultiheadDilatedAttention
from ringattn.strategy import Strategy

__all__ = [
    "DilatedAttention",
    "DilatedConfig",
    "MultiheadDilatedAttention",
    "Strategy",
    "UnsupportedError",
    "communicators",
    "computers",
    "dilated_attention",
    "dilation",
    "distributed",
    "memory",
    "models",
    "reference",
    "registry",
]
__version__ = "0.1.0"
