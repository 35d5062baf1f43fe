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

    @property
    def name(self) -> str:
        return f"regex({self.pattern!r})"

    def log_phi(self, seqs: Sequences) -> Tensor:
        return torch.tensor([log_indicator(self._re.fullmatch(t) is not None) for t in seqs.texts])

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return torch.tensor([log_indicator(self._re.fullmatch(t, partial=True) is not None) for t in seqs.texts])
