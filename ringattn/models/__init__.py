"""Models built from ringattn layers."""

from ringattn.models.longnet import LongNet, LongNetConfig

__all__ = ["LongNet", "LongNetConfig"]
