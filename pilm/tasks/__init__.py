"""Ready-made targets from the literature, on the embedded model by default."""

from .classifiers import sentiment, toxicity
from .infilling import infilling, joint_samples
from .random_number import random_number

__all__ = ["infilling", "joint_samples", "random_number", "sentiment", "toxicity"]
