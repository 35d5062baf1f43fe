"""Ready-made targets from the literature, on the embedded model by default."""

from .classifiers import sentiment, toxicity
from .infilling import infilling, joint_samples

__all__ = ["infilling", "joint_samples", "sentiment", "toxicity"]
