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
from collections.abc import Callable
from typing import Any, cast

import regex
import torch
from torch import Tensor

from . import shortest
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
        build = cast("Callable[..., object]", {"regex": xgr.Grammar.from_regex, "json": xgr.Grammar.from_json_schema,
                                               "grammar": xgr.Grammar.from_ebnf}[self.kind])
        try:
            build(spec, **options)  # checked here, without a model, so a bad spec fails where it is written
        except Exception as err:
            raise ValueError(f"invalid {self.kind} for xgrammar: {_first_line(err)}") from None

    def _language(self, seqs: Sequences) -> TokenLanguage | PythonRegexLanguage:
        return language(self.kind, self.spec, seqs.model, **self.options)

    def min_new_tokens(self, model, horizon: int) -> float:
        """The fewest tokens of ``model`` an accepted text needs, searched breadth-first over the
        token automaton up to the horizon (``TokenLanguage.min_tokens``)."""
        return language(self.kind, self.spec, model, **self.options).min_tokens(horizon)

    def log_phi(self, seqs: Sequences) -> Tensor:
        lang = self._language(seqs)
        return torch.tensor([log_indicator(lang.accepts(t)) for t in seqs.tokens])

    def log_prefix(self, seqs: Sequences) -> Tensor:
        lang = self._language(seqs)
        return torch.tensor([log_indicator(lang.viable(t)) for t in seqs.tokens])

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor:
        """Token v is allowed after a prefix where prefix + v stays viable; the stop token
        where the prefix's text is in the language (``TokenLanguage.allowed``)."""
        return self._language(seqs).allowed(seqs.tokens, stop, seqs.model.device)


class Regex(Language):
    """phi(s) = 1[the completion's text full-matches ``pattern``].

    The pattern is compiled by xgrammar (ECMAScript-style syntax; ``^``/``$`` are optional, the
    whole text must match). Patterns it cannot compile — look-arounds, back-references, inline
    flags — or any ``flags`` fall back to Python's ``regex`` on the decoded text
    (``PythonRegexLanguage``).
    """

    kind = "regex"

    def __init__(self, pattern: str, *, flags: int = 0):
        self.pattern = pattern
        self._re = regex.compile(pattern, flags)  # raises regex.error on a malformed pattern
        self._fallbacks: dict[str, PythonRegexLanguage] = {}
        self.spec, self.options, self.fallback = pattern, {}, bool(flags)
        if not self.fallback:
            try:
                super().__init__(pattern)
            except ValueError:
                self.fallback = True

    @property
    def name(self) -> str:
        return f"regex({self.pattern!r})"

    def min_new_tokens(self, model, horizon: int) -> float:
        """ceil(minimum width / most characters of the pattern's class in one token)
        (``pilm.potentials.shortest``), or the token automaton's search where that says more;
        0 under flags that widen what a character can be."""
        if self._re.flags & (regex.IGNORECASE | regex.VERBOSE | regex.FULLCASE):
            return 0
        bound = shortest.min_new_tokens(self.pattern, model, horizon)
        return bound if self.fallback or bound > horizon else max(bound, super().min_new_tokens(model, horizon))

    def _language(self, seqs: Sequences) -> TokenLanguage | PythonRegexLanguage:
        if not self.fallback:
            return super()._language(seqs)
        model = seqs.model
        if model.name not in self._fallbacks:
            self._fallbacks[model.name] = PythonRegexLanguage(self._re, model)
        return self._fallbacks[model.name]


class PythonRegexLanguage:
    """``TokenLanguage``'s three answers from Python's ``regex`` on the decoded text (EOS
    dropped): partial matching says whether a prefix is viable, and the mask decodes and
    partially matches prefix + v for every token v, memoised per prefix — right for tabular
    models, seconds per prefix on a 49k vocabulary."""

    _masks: dict[tuple[tuple[int, ...], int | None], Tensor]  # (prefix, stop) -> the prefix's allowed tokens

    def __init__(self, compiled: regex.Pattern, model):
        self._re, self._model, self._masks = compiled, model, {}

    def _text(self, tokens) -> str:
        eos = self._model.eos_token_id
        return self._model.decode([t for t in tokens if t != eos])

    def viable(self, tokens) -> bool:
        return self._re.fullmatch(self._text(tokens), partial=True) is not None

    def accepts(self, tokens) -> bool:
        return self._re.fullmatch(self._text(tokens)) is not None

    def allowed(self, prefixes, stop: int | None, device: torch.device | str = "cpu") -> Tensor:
        return torch.stack([self._row(tuple(p), stop) for p in prefixes]).to(device)

    def _row(self, prefix: tuple[int, ...], stop: int | None) -> Tensor:
        row = self._masks.get((prefix, stop))
        if row is None:
            row = torch.tensor([self.viable(prefix + (v,)) for v in range(self._model.vocab_size)])
            if stop is not None:
                row[stop] = self.accepts(prefix + ((stop,) if stop != self._model.eos_token_id else ()))
            self._masks[(prefix, stop)] = row
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
