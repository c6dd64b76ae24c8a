"""Model-level layers built on dilated attention."""

from ringattn.nn.attention import MultiheadDilatedAttention
from ringattn.nn.decode import KVCache, decode_one
from ringattn.nn.rotary import rotary

__all__ = ["KVCache", "MultiheadDilatedAttention", "decode_one", "rotary"]
