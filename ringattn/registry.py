"""Name → class registries for the four component kinds.

``register(kind, name)`` is a class decorator; ``names(kind)`` lists what is registered and
``get(kind, name)`` looks a class up (``ValueError`` naming the valid choices otherwise). Importing
``ringattn`` registers every built-in strategy; ``docs/catalog.md`` (generated from these
registries) maps each name to its class and file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

KINDS = ("dilation", "computer", "communicator", "memory")

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}

T = TypeVar("T", bound=type)


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def register(kind: str, name: str) -> Callable[[T], T]:
    """Register a component class under ``kind`` / ``name``; the class gets ``.name = name``."""
    _check_kind(kind)

    def decorate(cls: T) -> T:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"{kind} strategy {name!r} is already registered by {existing!r}")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[kind][name] = cls
        return cls

    return decorate


def unregister(kind: str, name: str) -> None:
    """Remove a registration (for tests and notebooks that add a temporary strategy)."""
    _check_kind(kind)
    _REGISTRY[kind].pop(name, None)


def names(kind: str) -> tuple[str, ...]:
    _check_kind(kind)
    return tuple(_REGISTRY[kind])


def get(kind: str, name: str) -> type:
    _check_kind(kind)
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be a strategy name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} strategy {name!r}; registered: {', '.join(names(kind))}"
        ) from None
