"""``pooled``: bounded LRU caches for index patterns and for scratch buffers.

Patterns are keyed by everything they depend on (shape, config, device), so a hit can never be
stale. Scratch buffers are keyed by (tag, shape, dtype, device) and by who runs the call: the
thread, and on CUDA its current stream. Within one thread and stream a call's work is ordered
after the previous call's, a tag is used for one purpose at a time (one manager per module), and
the caller overwrites the buffer before reading it, so reuse never changes a result. Threads
sharing a module (the functional form shares one per option set) each get their own buffers, as
do streams, as torch's caching allocator does: one buffer shared by two concurrent calls gave
wrong outputs.

Both caches hold at most ``max_entries`` items, and together at most ``max_bytes`` bytes (each
storage counted once), the least recently used entries dropped first. Unlike the blocks torch's
allocator caches, kept entries are live tensors that an out-of-memory error cannot free, so the
default bound follows what the module uses: twice the most bytes one of its recent calls used
(``PooledMemory``). A lock keeps the bookkeeping whole under threads. While a CUDA graph is
being captured the caches are bypassed: the graph's patterns and buffers are made in its own pool
and kept by nothing here (``docs/architecture.md``, "Memory under compile").
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from ringattn.capture import capturing, pool_allocating
from ringattn.config import checked_int
from ringattn.memory.base import MemoryManager, T
from ringattn.registry import register

# the default bound: twice the most bytes one of the module's last 16 calls used (PooledMemory)
CALLS_REMEMBERED = 16
BOUND_OVER_CALL = 2

# a storage, by its device and address (meta and empty tensors hold none: never counted)
Storage = tuple[str, int]


@dataclass
class _Entry:
    storages: dict[Storage, int]  # what the entry's tensors hold, in bytes
    used: int  # the manager's access count at its last use: the two caches' common LRU order


@dataclass
class _Kept:
    """A storage the caches keep: its bytes, the entries holding it, the last call that used it."""

    nbytes: int
    holders: int
    call: int


class _LRU:
    """One cache's entries, in order of use; the manager's one lock guards both caches, whose
    bytes are bounded together."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        # tensors, or a computer's own structures of tensors (flex's BlockMask)
        self.items: OrderedDict[Hashable, object] = OrderedDict()
        self.entries: dict[Hashable, _Entry] = {}  # (the items' bookkeeping, by the same keys)
        self.hits = 0
        self.misses = 0


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


def _storages(value: object) -> dict[Storage, int]:
    """The storages ``value``'s tensors hold, each once, with their bytes."""
    held = {}
    for x in _tensors(value):
        storage = x.untyped_storage()
        if storage.data_ptr() != 0:
            held[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return held


@register("memory", "pooled")
class PooledMemory(MemoryManager):
    """``pooled``: an LRU of patterns and one of scratch buffers, each holding at most
    ``max_entries`` entries (64 by default), together at most ``max_bytes`` bytes, each storage
    counted once: the least recently used entries of either go first, and an entry larger than
    the bound is not kept. Modules build it with the defaults; another bound is a subclass
    registered under a name of its own, or set on a module's manager (``attn.memory.max_bytes
    = 2**30``), which drops what it no longer fits at once.

    ``max_bytes=None`` (the default): twice the most bytes that one of the module's last 16
    calls used (:meth:`begin_call`; a storage counts towards each call that used it). Relative,
    because no one number fits: a ring's two key/value buffers range from kilobytes on a laptop
    to gigabytes a rank at 1M tokens, and a bound below what one call uses rebuilds its buffers
    every call. Every entry that a call uses is kept through that call, so a loop over one
    shape hits as before, and the factor of two keeps a training step whose forward and
    backward are separate calls (a compiled graph's two ops, a checkpointed forward run again),
    or two shapes in turn. A sweep over sequence lengths no longer keeps every length's
    patterns and buffers (up to 64 entries a module, in each layer of a model: live tensors
    that an out-of-memory error cannot free, and only ``clear()`` gave back), but at most twice
    what its largest recent call used; 16 calls after a length's last use its bytes stop
    counting towards the bound. More shapes in turn than fit twice the largest call's bytes, or
    more threads sharing the functional form's module than its buffers fit, make those entries
    again when they come back, as ``none`` makes everything.
    """

    def __init__(self, max_entries: int = 64, max_bytes: int | None = None) -> None:
        checked_int("max_entries", max_entries)
        self.lock = threading.Lock()
        self.patterns = _LRU(max_entries)
        self.buffers = _LRU(max_entries)
        self._kept: dict[Storage, _Kept] = {}
        self._held = 0  # the bytes of _kept
        self._accesses = 0  # so far (the order of both caches' entries by last use)
        self._calls = 0  # begun so far
        # the bytes each of the last calls used, the current one's last
        self._used: deque[int] = deque([0], maxlen=CALLS_REMEMBERED)
        self.max_bytes = max_bytes

    # Both bounds are properties, so that one set on a live module's manager (`attn.memory`)
    # applies at once: a plain max_entries set after construction was read by neither cache,
    # silently, and a max_bytes of -1 was taken unchecked
    @property
    def max_entries(self) -> int:
        return self.patterns.max_entries

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        checked_int("max_entries", value)
        with self.lock:
            for cache in (self.patterns, self.buffers):
                cache.max_entries = value
                self._trim(cache)

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        if value is not None:
            checked_int("max_bytes", value, minimum=0)
        with self.lock:
            self._max_bytes = value
            self._evict()

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles start empty: the lock cannot be copied, and the kept tensors are
        # this process's scratch and patterns, rebuilt on the first call
        return {"max_entries": self.max_entries, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        PooledMemory.__init__(self, state["max_entries"], state["max_bytes"])

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        return self._get(self.patterns, key, build)

    def scratch(
        self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        device = torch.device(device)
        key = (tag, tuple(shape), dtype, str(device), _owner(device))
        return self._get(self.buffers, key, lambda: torch.empty(shape, dtype=dtype, device=device))

    def begin_call(self) -> None:
        with self.lock:
            self._calls += 1
            self._used.append(0)
            self._evict()  # (a large call 16 calls back no longer holds the bound up)

    def _get(self, cache: _LRU, key: Hashable, build: Callable[[], T]) -> T:
        if capturing():
            # a CUDA graph being captured gets what it asks for made in its own pool, and none
            # of it kept: made here, a pattern's kernels are only recorded, so the kept tensor
            # held no values until the first replay (eager calls of that shape gathered with
            # garbage); and a kept tensor the graph read or wrote, once evicted, went back to
            # the allocator while the graph's replays still used its memory
            with torch.inference_mode(False):
                return build()
        with self.lock:
            value = cache.items.get(key)
            if value is not None:
                cache.items.move_to_end(key)
                cache.hits += 1
                self._use(cache.entries[key])
                return cast(T, value)  # (a key names everything its value depends on)
            cache.misses += 1
        # built as a normal tensor even under torch.inference_mode(): an inference tensor kept
        # here could not be saved for backward (nor written in place) by a later training call
        with torch.inference_mode(False):
            built = build()
        if pool_allocating():  # a cudagraph tree's warm-up: made in its pool (ringattn.capture)
            return built
        storages = _storages(built)
        if self.max_bytes is not None and sum(storages.values()) > self.max_bytes:
            return built  # (kept, it would leave no room even for itself)
        with self.lock:
            if key in cache.items:  # (another thread built it meanwhile: this one replaces it)
                self._drop(cache, key)
            cache.items[key] = built
            entry = cache.entries[key] = _Entry(storages, 0)
            for storage, nbytes in storages.items():
                kept = self._kept.get(storage)
                if kept is None:
                    kept = self._kept[storage] = _Kept(nbytes, 0, self._calls - 1)
                    self._held += nbytes
                kept.holders += 1
            self._use(entry)
            self._trim(cache)
            self._evict()
        return built

    def _use(self, entry: _Entry) -> None:
        """Mark ``entry`` used by the current call (under the lock)."""
        self._accesses += 1
        entry.used = self._accesses
        for storage in entry.storages:
            kept = self._kept[storage]
            if kept.call != self._calls:  # (a storage counts once a call)
                kept.call = self._calls
                self._used[-1] += kept.nbytes

    def _trim(self, cache: _LRU) -> None:
        """Drop ``cache``'s least recently used entries over its ``max_entries`` (under the
        lock)."""
        while len(cache.items) > cache.max_entries:
            self._drop(cache, next(iter(cache.items)))

    def _drop(self, cache: _LRU, key: Hashable) -> None:
        """Remove one entry (under the lock), and the bytes of its storages no other holds."""
        del cache.items[key]
        for storage in cache.entries.pop(key).storages:
            kept = self._kept[storage]
            kept.holders -= 1
            if kept.holders == 0:
                del self._kept[storage]
                self._held -= kept.nbytes

    def _evict(self) -> None:
        """Drop the least recently used entries of either cache while the bytes kept exceed the
        bound (under the lock). The default bound is at least what the current call used, and
        the entries it used come last, so it drops none of them."""
        bound = self.max_bytes
        if bound is None:
            bound = BOUND_OVER_CALL * max(self._used)
        while self._held > bound:
            cache = min(
                (cache for cache in (self.patterns, self.buffers) if cache.items),
                key=lambda cache: cache.entries[next(iter(cache.items))].used,
            )
            self._drop(cache, next(iter(cache.items)))

    def held_bytes(self) -> int:
        with self.lock:  # (another thread's call may be adding an entry)
            return self._held

    def clear(self) -> None:
        with self.lock:  # (a get in another thread between its lookup and move_to_end)
            for cache in (self.patterns, self.buffers):
                while cache.items:
                    self._drop(cache, next(iter(cache.items)))

    def stats(self) -> dict[str, int]:
        return {
            "pattern_hits": self.patterns.hits,
            "pattern_misses": self.patterns.misses,
            "patterns": len(self.patterns.items),
            "buffer_hits": self.buffers.hits,
            "buffer_misses": self.buffers.misses,
            "buffers": len(self.buffers.items),
        }
