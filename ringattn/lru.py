"""Bounded caches that several threads share: dropping the oldest entry.

``cache.pop(next(iter(cache)))`` is two steps: two threads at a cache's limit both chose the same
oldest key and the second ``pop`` raised ``KeyError`` into the user's call (seen on the GIL build
with a short switch interval: one in 80,000 insertions from 4 threads). Here whichever comes
second drops nothing, so a cache may briefly hold one entry more than its bound. Plain Python with
no lock, so it stays traceable should a traced path ever fill a cache; caches that must also keep
a lookup and its update in step (the functional form's modules) take a lock of their own.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def drop_oldest(cache: dict[K, V]) -> None:
    """Remove ``cache``'s first-inserted entry, if it still has one."""
    try:  # noqa: SIM105 (a plain try, which Dynamo traces where a trace fills a cache)
        cache.pop(next(iter(cache)), None)
    except (StopIteration, RuntimeError):  # emptied, or changed between iter() and next()
        pass


def remember(cache: dict[K, V], key: K, value: V, limit: int) -> None:
    """``cache[key] = value``, the oldest entry dropped first where ``cache`` holds ``limit``."""
    if len(cache) >= limit:
        drop_oldest(cache)
    cache[key] = value
