"""``Strategy``: one registered choice per component, validated by name."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Any

from ringattn import registry


@dataclass(frozen=True)
class Strategy:
    """How to compute dilated attention; never *what* is computed (every valid one agrees).

    Each field is a registry name: ``ringattn.registry.names("dilation")`` etc. list the choices.
    """

    dilation: str = "segment_local"
    computer: str = "sdpa"
    communicator: str = "local"
    memory: str = "pooled"

    def __post_init__(self) -> None:
        for f in fields(self):
            registry.get(f.name, getattr(self, f.name))  # ValueError/TypeError naming the field

    def component(self, kind: str) -> type[Any]:
        """The class registered under this strategy's name for ``kind``."""
        registry._check_kind(kind)  # (before getattr: an unknown kind was its AttributeError)
        return registry.get(kind, getattr(self, kind))

    def incompatibility(self) -> str | None:
        """Why this combination is invalid regardless of inputs, or ``None`` if it is valid."""
        for kind in registry.KINDS:
            reason = self.component(kind).incompatible_with(self)
            if reason is not None and not isinstance(reason, str):
                # (a bool came out as the reason "True")
                raise TypeError(
                    f"{kind} strategy {getattr(self, kind)!r}: incompatible_with must return a "
                    f"reason (str) or None, got {type(reason).__name__} {reason!r}"
                )
            if reason:
                return f"{kind}={getattr(self, kind)!r}: {reason}"
        return None

    def check(self) -> Strategy:
        """``self`` if it is a valid combination, else a ``ValueError`` giving
        :meth:`incompatibility`'s reason."""
        reason = self.incompatibility()
        if reason:
            raise ValueError(f"invalid strategy {self}: {reason}")
        return self

    @property
    def label(self) -> str:
        """The four names joined by ``/``, ``"dilation/computer/communicator/memory"``
        (:meth:`from_label` reads it back)."""
        return "/".join(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_label(cls, label: str) -> Strategy:
        """The strategy whose :attr:`label` is ``label`` (``"dilation/computer/communicator/
        memory"``, as ablate's tables print it; bench's rows name only ``dilation/computer``),
        so a row's strategy can be pasted into code:
        ``Strategy.from_label("global/sdpa/local/none")``."""
        if not isinstance(label, str):
            raise TypeError(f"label must be a str, got {type(label).__name__}")
        names = label.split("/")
        if len(names) != len(registry.KINDS):
            raise ValueError(
                f"label must name one component per kind, {'/'.join(registry.KINDS)}, got {label!r}"
            )
        return cls(**dict(zip(registry.KINDS, names)))

    @classmethod
    def all(cls, **fixed: str) -> tuple[Strategy, ...]:
        """Every valid combination of registered components, optionally with some fields fixed.

        :meth:`single_device` / :meth:`sequence_parallel` split them by their communicator.
        """
        unknown = set(fixed) - set(registry.KINDS)
        if unknown:
            raise ValueError(f"unknown Strategy fields {sorted(unknown)}; fields: {registry.KINDS}")
        choices = [
            (fixed[kind],) if kind in fixed else registry.names(kind) for kind in registry.KINDS
        ]
        out = []
        for combo in itertools.product(*choices):
            strategy = cls(**dict(zip(registry.KINDS, combo)))
            if strategy.incompatibility() is None:
                out.append(strategy)
        return tuple(out)

    @classmethod
    def single_device(cls, **fixed: str) -> tuple[Strategy, ...]:
        """:meth:`all`'s strategies whose communicator runs on one device (``local``, and any
        registered communicator that is not sequence-parallel): what the single-device property
        tests run. Selected by the communicator's ``distributed`` flag, not its name, so a new
        one-device communicator is tested too."""
        return tuple(s for s in cls.all(**fixed) if not s.distributed)

    @classmethod
    def sequence_parallel(cls, **fixed: str) -> tuple[Strategy, ...]:
        """:meth:`all`'s strategies whose communicator spreads the sequence over a process group
        (``ring``, ``all_gather``, and any registered one with ``distributed = True``)."""
        return tuple(s for s in cls.all(**fixed) if s.distributed)

    @property
    def distributed(self) -> bool:
        """Whether the communicator spreads the sequence over a process group."""
        return bool(getattr(self.component("communicator"), "distributed", False))
