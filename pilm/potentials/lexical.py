"""Constraints on the text itself."""

from __future__ import annotations

import functools

import regex
import torch
from torch import Tensor

from .base import Potential, Sequences
from .function import log_indicator


class Regex(Potential):
    """phi(s) = 1[the completion's text full-matches ``pattern``].

    Prefix score: psi(s_{1:t}) = 1[some continuation of the text could still full-match]
    (``regex``'s partial matching), so particles that can no longer satisfy the pattern are
    dropped as soon as they stray, and psi = 0 only where phi = 0 for every completion.
    """

    has_prefix = True

    def __init__(self, pattern: str, *, flags: int = 0):
        self.pattern = pattern
        self._re = regex.compile(pattern, flags)
        self._masks: dict = {}
        self._automata: dict = {}  # model name -> llguidance masks (or None: use the reference path)

    def _fast(self, model):
        if model.name not in self._automata:
            self._automata[model.name] = _llguidance(self.pattern, model)
        return self._automata[model.name]

    @property
    def name(self) -> str:
        return f"regex({self.pattern!r})"

    def log_phi(self, seqs: Sequences) -> Tensor:
        return torch.tensor([log_indicator(self._re.fullmatch(t) is not None) for t in seqs.texts])

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return torch.tensor([log_indicator(self._re.fullmatch(t, partial=True) is not None) for t in seqs.texts])

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor:
        """Token v is allowed after a prefix where the text of prefix + v can still full-match
        (the decoded text, so a token that completes a multi-byte character is judged on the
        character); the stop token where the prefix's text full-matches. On a transformers
        tokenizer, llguidance's token automaton computes it (``token_masks``) when it is
        installed and compiles the pattern; otherwise the reference implementation here:
        O(V) decodes and partial matches per distinct prefix, memoised; right for tabular
        models, slow (seconds per prefix) for a 49k vocabulary."""
        model = seqs.model
        fast = self._fast(model)
        if fast is None:
            return torch.stack([self._reference(model, p, stop) for p in seqs.tokens])
        out, dead = fast.allowed(seqs.tokens, stop)
        extra = _not_text(model)
        for i, prefix in enumerate(seqs.tokens):
            if i in dead:
                out[i] = self._reference(model, prefix, stop)
            elif extra:
                out[i, extra] |= self._reference(model, prefix, stop, extra)
        return out

    def _reference(self, model, prefix: tuple[int, ...], stop: int | None, tokens: list[int] | None = None) -> Tensor:
        """The mask by decoding prefix + v and partial matching, for every token (or ``tokens``), memoised."""
        key = (model.name, prefix, stop, tokens is None)
        row = self._masks.get(key)
        if row is None:
            row = torch.tensor([self._re.fullmatch(_text(model, prefix + (v,)), partial=True) is not None
                                for v in (range(model.vocab_size) if tokens is None else tokens)])
            if stop is not None and tokens is None:
                row[stop] = self._re.fullmatch(_text(model, prefix)) is not None
            self._masks[key] = row
        return row


def _llguidance(pattern: str, model):
    """llguidance masks for ``model``'s tokenizer, or None (not installed, no tokenizer, or
    a pattern it cannot compile, e.g. look-arounds)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    try:
        from .token_masks import RegexMasks

        return RegexMasks(pattern, tokenizer, model.vocab_size, model.eos_token_id)
    except (ImportError, ValueError):
        return None


@functools.cache
def _not_text(model) -> list[int]:
    """Tokens llguidance does not treat as text: special and added tokens, lone bytes ("\ufffd")."""
    tokenizer = model.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(tokenizer.get_added_vocab().values())
    return [v for v in range(model.vocab_size) if v in special or "\ufffd" in model.decode([v])]


def _text(model, tokens) -> str:
    eos = model.eos_token_id
    return model.decode([t for t in tokens if t != eos])
