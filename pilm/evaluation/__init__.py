"""Measuring inference: exact answers by enumeration, bounds on log Z, KL both ways."""

from . import exact
from .bounds import BoundsReport, bounds, distinct_ancestors, exact_sigma_samples

__all__ = ["BoundsReport", "bounds", "distinct_ancestors", "exact", "exact_sigma_samples"]
