"""Potentials phi: the protocol, combinators, and built-ins."""

from .base import Potential, Product, Sequences, Tempered, evaluate
from .classifiers import Sentiment, Toxicity
from .function import FunctionPotential
from .lexical import Grammar, JsonSchema, Language, Regex
from .likelihood import ModelLikelihood, SuffixLikelihood
from .rollouts import RolloutLookahead
from .skip import SkipLookahead
from .spec import SPEC_HELP, check_spec, parse_potential

__all__ = [
    "SPEC_HELP", "FunctionPotential", "Grammar", "JsonSchema", "Language", "ModelLikelihood", "Potential",
    "Product", "Regex", "RolloutLookahead", "Sentiment", "Sequences", "SkipLookahead", "SuffixLikelihood",
    "Tempered", "Toxicity", "check_spec", "evaluate", "parse_potential"
]
