"""Potentials from short command-line specs such as ``regex:'^[^e]*$'``."""

from __future__ import annotations

from collections.abc import Callable

from ..models.base import LanguageModel
from .base import Potential
from .classifiers import Sentiment, Toxicity
from .likelihood import SuffixLikelihood
from .lexical import Regex

SPEC_HELP = (
    "regex:PATTERN (completion must full-match), sentiment:positive|negative[:BETA], "
    "toxicity:clean|toxic[:BETA], suffix:TEXT (infilling: likelihood of TEXT after the completion)"
)


def _classifier(cls):
    def build(arg: str, model: LanguageModel) -> Potential:
        label, _, beta = arg.partition(":")
        potential = cls(label)
        return potential ** float(beta) if beta else potential

    return build


_KINDS: dict[str, Callable[[str, LanguageModel], Potential]] = {
    "regex": lambda arg, model: Regex(arg),
    "sentiment": _classifier(Sentiment),
    "toxicity": _classifier(Toxicity),
    "suffix": lambda arg, model: SuffixLikelihood(model, arg),
}


def check_spec(spec: str) -> None:
    """Raise ``ValueError`` listing the known kinds unless ``spec`` is ``KIND:ARGUMENT`` of a known kind."""
    kind, sep, arg = spec.partition(":")
    if kind not in _KINDS or not sep or not arg:
        raise ValueError(f"unknown potential spec {spec!r}; known: {SPEC_HELP}")


def parse_potential(spec: str, model: LanguageModel) -> Potential:
    """A potential from ``KIND:ARGUMENT`` (see ``SPEC_HELP``)."""
    check_spec(spec)
    kind, _, arg = spec.partition(":")
    return _KINDS[kind](arg, model)
