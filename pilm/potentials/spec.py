"""Potentials from short command-line specs such as ``regex:'^[^e]*$'``."""

from __future__ import annotations

from ..models.base import LanguageModel
from .base import Potential
from .classifiers import Sentiment
from .likelihood import SuffixLikelihood
from .lexical import Regex

SPEC_HELP = (
    "regex:PATTERN (completion must full-match), sentiment:positive|negative[:BETA], "
    "suffix:TEXT (infilling: likelihood of TEXT after the completion)"
)


def parse_potential(spec: str, model: LanguageModel) -> Potential:
    """A potential from ``KIND:ARGUMENT``; raises ``ValueError`` listing the known kinds."""
    kind, sep, arg = spec.partition(":")
    if kind == "regex" and sep:
        return Regex(arg)
    if kind == "sentiment" and sep:
        label, _, beta = arg.partition(":")
        potential: Potential = Sentiment(label)
        return potential ** float(beta) if beta else potential
    if kind == "suffix" and sep and arg:
        return SuffixLikelihood(model, arg)
    raise ValueError(f"unknown potential spec {spec!r}; known: {SPEC_HELP}")
