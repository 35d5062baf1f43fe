"""Process rewards r(c, x_{<=t}) in [0, 1] at step ends: the protocol, aggregations, an LM
judge, functions, transformers step-tag PRMs, and learned value heads (twists)."""

from .base import AGGREGATIONS, PRMError, ProcessReward, StepBatch, aggregate, checked_scores
from .function import FunctionPRM
from .hub import StepTagPRM
from .judge import LMJudge
from .learned import TwistPRM, as_prm

__all__ = [
    "AGGREGATIONS", "FunctionPRM", "LMJudge", "PRMError", "ProcessReward", "StepBatch", "StepTagPRM", "TwistPRM",
    "aggregate", "as_prm", "checked_scores"
]
