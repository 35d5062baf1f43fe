"""Measuring inference: exact answers by enumeration, bounds on log Z, KL both ways."""

from . import exact
from .bounds import BoundsReport, bounds, distinct_ancestors, exact_sigma_samples
from .calibration import calibration_summary, fit_lookahead, twist_calibration
from .metrics import likelihood_and_diversity

__all__ = ["BoundsReport", "bounds", "calibration_summary", "distinct_ancestors", "exact", "exact_sigma_samples",
           "fit_lookahead", "likelihood_and_diversity", "twist_calibration"]
