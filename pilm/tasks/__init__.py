"""Ready-made targets from the literature, on the embedded model by default."""

from ..inference.joint import joint_samples
from . import arithmetic, arithmetic_chain, gsm8k, subjectivity
from .classifiers import sentiment, toxicity
from .continuation import tempered_continuation
from .infilling import ending_first, infilling
from .random_number import random_number
from .redteam import red_teaming

__all__ = [
    "arithmetic", "arithmetic_chain", "gsm8k", "ending_first", "infilling", "joint_samples", "random_number",
    "red_teaming", "sentiment", "subjectivity", "tempered_continuation", "toxicity"
]
