"""Communicator strategies (registry kind ``"communicator"``)."""

from ringattn.communicators import all_gather, local, ring  # noqa: F401  (registers)
from ringattn.communicators.base import Communicator

__all__ = ["Communicator"]
