"""Potentials from short command-line specs such as ``regex:'^[^e]*$'``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import regex

from ..models.base import LanguageModel
from .base import Potential
from .classifiers import Sentiment, Toxicity
from .lexical import Grammar, JsonSchema, Regex
from .likelihood import SuffixLikelihood

SPEC_HELP = (
    "regex:PATTERN (completion must full-match), json:SCHEMA|FILE (a JSON document valid under the "
    "schema), grammar:EBNF|FILE (derived from the grammar's root rule), sentiment:positive|negative[:BETA], "
    "toxicity:clean|toxic[:BETA], suffix:TEXT (infilling: likelihood of TEXT after the completion); "
    "--lookahead ALPHA gives suffix:, sentiment: and toxicity: a look-ahead prefix score"
)


def _classifier(cls):
    def build(arg: str, model: LanguageModel | None, prefix: float | None = None) -> Potential:
        label, _, beta = arg.partition(":")
        potential = cls(label) if prefix is None else cls(label, prefix=prefix)
        if not beta:
            return potential
        try:
            value = float(beta)
        except ValueError:
            raise ValueError(f"BETA must be a number >= 0, got {beta!r}") from None
        return potential ** value

    return build


def _regex(arg: str, model: LanguageModel | None) -> Potential:
    try:
        return Regex(arg)
    except regex.error as err:
        raise ValueError(f"invalid regular expression: {err}") from None


def _inline_or_file(arg: str, inline: bool, what: str) -> str:
    """The argument itself when it is ``inline`` text, else the text of the file it names (a
    schema or grammar is long)."""
    if inline:
        return arg
    if not Path(arg).is_file():
        raise ValueError(f"no file {arg} (nor an inline {what})")
    return Path(arg).read_text()


_KINDS: dict[str, Callable[[str, LanguageModel | None], Potential]] = {
    "regex": _regex,
    "json": lambda arg, model: JsonSchema(_inline_or_file(arg, arg.lstrip()[:1] in ("{", "["), "JSON schema")),
    "grammar": lambda arg, model: Grammar(_inline_or_file(arg, "::=" in arg, "EBNF grammar with a root ::= rule")),
    "sentiment": _classifier(Sentiment),
    "toxicity": _classifier(Toxicity),
}


def check_spec(spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` is ``KIND:ARGUMENT`` of a known kind with a valid
    argument (a pattern that compiles, a known label, a numeric BETA), all checked without
    loading a model."""
    kind, sep, arg = spec.partition(":")
    if (kind not in _KINDS and kind != "suffix") or not sep:
        raise ValueError(f"unknown potential spec {spec!r}; known: {SPEC_HELP}")
    if not arg:
        raise ValueError(f"potential spec {spec!r}: nothing after '{kind}:'; known: {SPEC_HELP}")
    if kind != "suffix":  # the rest need no model to be built, so build them to check them
        try:
            _KINDS[kind](arg, None)
        except ValueError as err:
            raise ValueError(f"potential spec {spec!r}: {err}") from None


LOOKAHEAD_KINDS = ("suffix", "sentiment", "toxicity")
"""The spec kinds ``--lookahead`` gives a prefix score."""


def parse_potential(spec: str, model: LanguageModel, *, lookahead: float = 0.0) -> Potential:
    """A potential from ``KIND:ARGUMENT`` (see ``SPEC_HELP``); ``lookahead`` alpha > 0: a
    ``suffix:`` potential's look-ahead prefix score alpha log p(suffix | x, prefix)
    (``SuffixLikelihood``), or a classifier's alpha log P(label | prefix) (tempered by BETA
    with phi); 0 leaves each kind its default."""
    check_spec(spec)
    kind, _, arg = spec.partition(":")
    if kind == "suffix":  # the one kind built with the model
        return SuffixLikelihood(model, arg, lookahead=lookahead)
    if kind in LOOKAHEAD_KINDS and lookahead:
        return _classifier({"sentiment": Sentiment, "toxicity": Toxicity}[kind])(arg, model, lookahead)
    return _KINDS[kind](arg, model)
