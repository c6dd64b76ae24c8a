"""MemoryManager: who owns index patterns and scratch buffers.

Two services. Patterns are fetched in eager code only, outside the compiled core. Scratch buffers
are asked for inside the core, but only a core that runs as eager code gets a pooling manager
(eager calls, and the opaque ops of a block computer's compiled calls): a traced core sees
``NoReuse`` (plain ``torch.empty``) and Inductor plans memory (see ``docs/architecture.md``):

* ``cached(key, build)``: an index pattern (e.g. the global permutation) for a key that names
  everything it depends on (shape, config, device);
* ``scratch(tag, shape, dtype, device)``: an uninitialised buffer that the caller fully overwrites
  and that never escapes the call (fp32 accumulators of a bf16 forward, for instance).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch import Tensor

from ringattn.component import Component

# what a pattern's builder makes (a tensor, or a computer's own structure: flex's BlockMask)
T = TypeVar("T")


class MemoryManager(Component):
    @abstractmethod
    def cached(self, key: Hashable, build: Callable[[], T]) -> T: ...

    @abstractmethod
    def scratch(
        self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor: ...

    def begin_call(self) -> None:
        """A call of the module begins (each eager forward, and each of a compiled graph's
        opaque ops): a manager that bounds what it keeps by what recent calls used counts them
        here (``pooled``)."""

    def stats(self) -> dict[str, int]:
        return {}

    def held_bytes(self) -> int:
        """Device and host bytes this manager keeps between calls (its patterns and buffers):
        memory a call's peak does not show, but that is the module's all the same."""
        return 0

    def clear(self) -> None:
        """Drop every kept pattern and buffer (the next call builds what it needs again)."""
