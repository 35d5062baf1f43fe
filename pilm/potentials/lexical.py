"""Constraints on the text itself."""

from __future__ import annotations

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

    @property
    def name(self) -> str:
        return f"regex({self.pattern!r})"

    def log_phi(self, seqs: Sequences) -> Tensor:
        return torch.tensor([log_indicator(self._re.fullmatch(t) is not None) for t in seqs.texts])

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return torch.tensor([log_indicator(self._re.fullmatch(t, partial=True) is not None) for t in seqs.texts])

    def allowed_next(self, seqs: Sequences, stop: int | None) -> Tensor:
        """Token v is allowed after a prefix where the text of prefix + v can still full-match
        (the decoded text, so a token that completes a multi-byte character is judged on the
        character); the stop token where the prefix's text full-matches. The reference
        implementation: O(V) decodes and partial matches per distinct prefix, memoised per
        prefix; right for tabular models, slow for a 49k vocabulary."""
        model = seqs.model
        out = torch.zeros(len(seqs), model.vocab_size, dtype=torch.bool)
        for i, prefix in enumerate(seqs.tokens):
            key = (model.name, seqs.prompt, prefix, stop)
            row = self._masks.get(key)
            if row is None:
                row = torch.tensor([self._re.fullmatch(_text(model, prefix + (v,)), partial=True) is not None
                                    for v in range(model.vocab_size)])
                if stop is not None:
                    row[stop] = self._re.fullmatch(_text(model, prefix)) is not None
                self._masks[key] = row
            out[i] = row
        return out


def _text(model, tokens) -> str:
    eos = model.eos_token_id
    return model.decode([t for t in tokens if t != eos])
