"""What every component class shares: a registry name and a static compatibility hook."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ringattn.strategy import Strategy


class Component:
    name: ClassVar[str] = "unregistered"

    @classmethod
    def incompatible_with(cls, strategy: Strategy) -> str | None:
        """Return why ``strategy`` cannot use this component (whatever the inputs), else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
