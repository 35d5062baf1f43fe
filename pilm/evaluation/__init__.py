"""Measuring inference: exact answers by enumeration (bounds and KL come next)."""

from . import exact

__all__ = ["exact"]
