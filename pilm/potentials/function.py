"""Potentials from plain Python functions of one sequence."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .base import Potential, Sequences


class FunctionPotential(Potential):
    """log phi(s) = fn(s) for a per-sequence function ``fn`` returning log phi (a float, -inf allowed).

    ``on="text"`` passes the decoded completion (terminal EOS removed), ``on="tokens"`` the
    tuple of token ids (EOS kept). ``prefix_fn``, if given, scores incomplete prefixes the
    same way and becomes the intermediate potential.
    """

    def __init__(
        self,
        fn: Callable[[object], float],
        on: Literal["text", "tokens"] = "text",
        *,
        prefix_fn: Callable[[object], float] | None = None,
        name: str | None = None,
    ):
        if on not in ("text", "tokens"):
            raise ValueError(f"on must be 'text' or 'tokens', got {on!r}")
        self.fn, self.on, self.prefix_fn = fn, on, prefix_fn
        self.has_prefix = prefix_fn is not None
        self._name = name or getattr(fn, "__name__", "function")

    @property
    def name(self) -> str:
        return self._name

    def _apply(self, fn, seqs: Sequences) -> Tensor:
        items = seqs.texts if self.on == "text" else seqs.tokens
        return torch.tensor([float(fn(x)) for x in items], dtype=torch.float32)

    def log_phi(self, seqs: Sequences) -> Tensor:
        return self._apply(self.fn, seqs)

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return self._apply(self.prefix_fn, seqs)


def log_indicator(ok: bool) -> float:
    """log 1[ok]: 0 if ok else -inf."""
    return 0.0 if ok else -math.inf
