"""Constraints on the text itself: a regular expression, a JSON schema, a context-free grammar.

Each is a 0/1 potential phi(s) = 1[the completion's text is in the language L], with the
prefix score psi(s_{1:t}) = 1[some continuation of s_{1:t} is in L] — zero only where phi
is zero for every completion, so SMC drops a particle as soon as it strays without biasing
Z-hat — and the next-token mask ``allowed_next`` that the masked proposal samples within.
All three are read from one token automaton compiled by xgrammar for the model's vocabulary
(``token_masks``): bytes-exact, consistent between phi, psi and the mask.
"""

from __future__ import annotations

import json
from typing import Any

import regex
import torch
from torch import Tensor

from .base import Potential, Sequences
from .function import log_indicator
from .token_masks import Kind, TokenLanguage, language


class Language(Potential):
    """phi(s) = 1[the completion's text is in a language xgrammar compiles] (see the module
    docstring); subclasses say which kind of description ``spec`` is."""

    has_prefix = True
    kind: Kind

    def __init__(self, spec: str, **options):
        import xgrammar as xgr

        self.spec, self.options = spec, options
        build = {"regex": xgr.Grammar.from_regex, "json": xgr.Grammar.from_json_schema,
                 "grammar": xgr.Grammar.from_ebnf}[self.kind]
        try:
            build(spec, **options)  # checked here, without a model, so a bad spec fails where it is written
        except Exception as err:
            raise ValueError(f"invalid {self.kind} for xgrammar: {_first_line(err)}") from None

    def _language(self, seqs: Sequences) -> TokenLanguage:
        return language(self.kind, self.spec, seqs.model, **self.options)

    def log_phi(self, seqs: Sequences) -> Tensor:
        lang = self._language(seqs)
        return torch.tensor([log_indicator(lang.accepts(t)) for t in seqs.tokens])

    def log_prefix(self, seqs: Sequences) -> Tensor:
        lang = self._language(seqs)
        return torch.tensor([log_indicator(lang.viable(t)) for t in seqs.tokens])

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor:
        """Token v is allowed after a prefix where prefix + v stays viable; the stop token
        where the prefix's text is in the language (``TokenLanguage.allowed``)."""
        return self._language(seqs).allowed(seqs.tokens, stop)


class Regex(Language):
    """phi(s) = 1[the completion's text full-matches ``pattern``].

    The pattern is compiled by xgrammar (ECMAScript-style syntax; ``^``/``$`` are optional, the
    whole text must match). Patterns it cannot compile — look-arounds, back-references, inline
    flags — or any ``flags`` fall back to Python's ``regex`` on the decoded text (partial
    matching for the prefix score) with a reference mask that decodes and partially matches
    prefix + v for every token v: right for tabular models, slow (seconds per prefix) for a
    49k vocabulary.
    """

    kind = "regex"

    def __init__(self, pattern: str, *, flags: int = 0):
        self.pattern = pattern
        self._re = regex.compile(pattern, flags)  # raises regex.error on a malformed pattern
        try:
            if flags:
                raise ValueError("flags")
            super().__init__(pattern)
            self.fallback = False
        except ValueError:
            self.spec, self.options, self.fallback = pattern, {}, True
        self._masks: dict = {}

    @property
    def name(self) -> str:
        return f"regex({self.pattern!r})"

    def log_phi(self, seqs: Sequences) -> Tensor:
        if not self.fallback:
            return super().log_phi(seqs)
        return torch.tensor([log_indicator(self._re.fullmatch(t) is not None) for t in seqs.texts])

    def log_prefix(self, seqs: Sequences) -> Tensor:
        if not self.fallback:
            return super().log_prefix(seqs)
        return torch.tensor([log_indicator(self._re.fullmatch(t, partial=True) is not None) for t in seqs.texts])

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor:
        if not self.fallback:
            return super().allowed_next(seqs, stop)
        return torch.stack([self._reference(seqs.model, p, stop) for p in seqs.tokens])

    def _reference(self, model, prefix: tuple[int, ...], stop: int | None) -> Tensor:
        """The mask by decoding prefix + v and partial matching, for every token, memoised."""
        key = (model.name, prefix, stop)
        row = self._masks.get(key)
        if row is None:
            row = torch.tensor([self._re.fullmatch(_text(model, prefix + (v,)), partial=True) is not None
                                for v in range(model.vocab_size)])
            if stop is not None:
                row[stop] = self._re.fullmatch(_text(model, prefix + ((stop,) if stop != model.eos_token_id else ())))\
                    is not None
            self._masks[key] = row
        return row


class JsonSchema(Language):
    """phi(s) = 1[the completion is a JSON document valid under ``schema``], as xgrammar reads
    the schema: keys in the schema's order, no properties beyond those listed, and any JSON
    whitespace between tokens — or, with ``any_whitespace=False``, the one layout
    ``{"a": 1, "b": [2, 3]}`` (a model that likes newlines cannot wander in whitespace)."""

    kind = "json"

    def __init__(self, schema: dict[str, Any] | str, *, any_whitespace: bool = True):
        super().__init__(schema if isinstance(schema, str) else json.dumps(schema), any_whitespace=any_whitespace)

    @property
    def name(self) -> str:
        return f"json_schema({self.spec if len(self.spec) <= 60 else self.spec[:57] + '...'})"


class Grammar(Language):
    """phi(s) = 1[the completion's text is derived from the rule ``root`` of an EBNF grammar]
    (xgrammar's GBNF dialect: ``root ::= "yes" | "no" ws [0-9]+``, character classes,
    ``*``/``+``/``?``, quoted literals)."""

    kind = "grammar"

    def __init__(self, ebnf: str):
        super().__init__(ebnf)

    @property
    def name(self) -> str:
        return f"grammar({len(self.spec.splitlines())} lines)"


def _first_line(err: Exception) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    line = lines[0] if lines else type(err).__name__
    return line.split(": ", 1)[1] if line.startswith("[") and ": " in line else line


def _text(model, tokens) -> str:
    eos = model.eos_token_id
    return model.decode([t for t in tokens if t != eos])
