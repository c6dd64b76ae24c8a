"""Communicator strategies (registry kind ``"communicator"``)."""

from ringattn.communicators import local  # noqa: F401  (registers)
from ringattn.communicators.base import Communicator

__all__ = ["Communicator"]
