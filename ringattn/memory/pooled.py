"""``pooled``: bounded LRU caches for index patterns and for scratch buffers.

Patterns are keyed by everything they depend on (shape, config, device), so a hit can never be
stale. Scratch buffers are keyed by (tag, shape, dtype, device) and by who runs the call: the
thread, and on CUDA its current stream. Within one thread and stream a call's work is ordered
after the previous call's, a tag is used for one purpose at a time (one manager per module), and
the caller overwrites the buffer before reading it, so reuse never changes a result. Threads
sharing a module (the functional form shares one per option set) each get their own buffers, as
do streams, as torch's caching allocator does: one buffer shared by two concurrent calls gave
wrong outputs. Both caches hold at most ``max_entries`` items, and a lock keeps their bookkeeping
whole under threads. While a CUDA graph is being captured the caches are bypassed: the graph's
patterns and buffers are made in its own pool and kept by nothing here (``docs/architecture.md``,
"Memory under compile").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import cast

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from ringattn.capture import capturing, pool_allocating
from ringattn.config import checked_int
from ringattn.memory.base import MemoryManager, T
from ringattn.registry import register


class _LRU:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        # tensors, or a computer's own structures of tensors (flex's BlockMask)
        self.items: OrderedDict[Hashable, object] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        if capturing():
            # a CUDA graph being captured gets what it asks for made in its own pool, and none
            # of it kept: made here, a pattern's kernels are only recorded, so the kept tensor
            # held no values until the first replay (eager calls of that shape gathered with
            # garbage); and a kept tensor the graph read or wrote, once evicted, went back to
            # the allocator while the graph's replays still used its memory
            with torch.inference_mode(False):
                return build()
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
                self.hits += 1
                return cast(T, value)  # (a key names everything its value depends on)
            self.misses += 1
        # built as a normal tensor even under torch.inference_mode(): an inference tensor kept
        # here could not be saved for backward (nor written in place) by a later training call
        with torch.inference_mode(False):
            built = build()
        if pool_allocating():  # a cudagraph tree's warm-up: made in its pool (ringattn.capture)
            return built
        with self.lock:
            self.items[key] = built
            self.items.move_to_end(key)
            if len(self.items) > self.max_entries:
                self.items.popitem(last=False)
        return built

    def values(self) -> list[object]:
        with self.lock:  # (another thread's call may be adding an entry)
            return list(self.items.values())

    def clear(self) -> None:
        with self.lock:  # (a get in another thread between its lookup and move_to_end)
            self.items.clear()

    def __getstate__(self) -> dict[str, int]:
        # copies and pickles start empty: the lock cannot be copied, and the kept tensors are
        # this process's scratch and patterns, rebuilt on the first call
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict[str, int]) -> None:
        _LRU.__init__(self, state["max_entries"])


def _owner(device: torch.device) -> tuple[int, int | None]:
    """Who a scratch buffer belongs to: the calling thread, and on CUDA its current stream."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
    return threading.get_ident(), stream


def _contents(cell: object) -> object:
    try:
        return cell.cell_contents  # type: ignore[attr-defined]
    except ValueError:  # an empty cell (a name the function's scope never bound)
        return None


def _tensors(value: object) -> list[Tensor]:
    """The tensors a kept value holds (a tensor, a structure of them, or a flex_attention
    ``BlockMask``, whose ``as_tuple`` lists its tensors)."""
    if isinstance(value, Tensor):
        return [value]
    as_tuple = getattr(value, "as_tuple", None)
    if callable(as_tuple):
        # and what its mask function closes over (global dilation's run layout: 40% of what
        # a global flex module keeps, uncounted before)
        cells = getattr(getattr(value, "mask_mod", None), "__closure__", None) or ()
        value = (as_tuple(), [_contents(cell) for cell in cells])
    return [x for x in tree_leaves(value) if isinstance(x, Tensor)]


@register("memory", "pooled")
class PooledMemory(MemoryManager):
    """``pooled``: an LRU of patterns and one of scratch buffers, each holding at most
    ``max_entries`` entries (64 by default; the modules build it with the default)."""

    def __init__(self, max_entries: int = 64) -> None:
        checked_int("max_entries", max_entries)
        self.patterns = _LRU(max_entries)
        self.buffers = _LRU(max_entries)

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        return self.patterns.get(key, build)

    def scratch(
        self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        device = torch.device(device)
        key = (tag, tuple(shape), dtype, str(device), _owner(device))
        return self.buffers.get(key, lambda: torch.empty(shape, dtype=dtype, device=device))

    def held_bytes(self) -> int:
        storages = {
            x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()
            for value in (*self.patterns.values(), *self.buffers.values())
            for x in _tensors(value)
        }
        return sum(storages.values())

    def clear(self) -> None:
        self.patterns.clear()
        self.buffers.clear()

    def stats(self) -> dict[str, int]:
        return {
            "pattern_hits": self.patterns.hits,
            "pattern_misses": self.patterns.misses,
            "patterns": len(self.patterns.items),
            "buffer_hits": self.buffers.hits,
            "buffer_misses": self.buffers.misses,
            "buffers": len(self.buffers.items),
        }
