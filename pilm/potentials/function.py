"""Potentials from plain Python functions of one sequence."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import Tensor

from ..errors import PotentialError
from .base import Potential, Sequences


class FunctionPotential(Potential):
    """A potential whose ``fn`` returns **log** phi(s) of one sequence (a float; -inf where phi = 0).

    Not phi, and not a probability: a function returning a reward r makes phi = e^r (the
    target p0 e^r of KL-regularised RL), and one returning a probability P must return
    log P instead.

    ``on="text"`` passes the decoded completion (terminal EOS removed), ``on="tokens"`` the
    tuple of token ids (EOS kept). ``prefix_fn``, if given, scores incomplete prefixes the
    same way and becomes the intermediate potential.
    """

    def __init__(
        self,
        fn: Callable[[Any], float],  # of a str (on="text") or a tuple of ints (on="tokens")
        on: Literal["text", "tokens"] = "text",
        *,
        prefix_fn: Callable[[Any], float] | None = None,
        name: str | None = None,
    ):
        if on not in ("text", "tokens"):
            raise ValueError(f"on must be 'text' or 'tokens', got {on!r}")
        self.fn, self.on, self.prefix_fn = fn, on, prefix_fn
        self.has_prefix = prefix_fn is not None
        self._name = name or cast(str, getattr(fn, "__name__", "function"))

    @property
    def name(self) -> str:
        return self._name

    def _apply(self, fn, seqs: Sequences) -> Tensor:
        items = seqs.texts if self.on == "text" else seqs.tokens
        return torch.tensor([self._float(fn(x), x) for x in items], dtype=torch.float32)

    def _float(self, value, item) -> float:
        """``value`` as a float, or a ``PotentialError`` naming this potential (a bool or a
        string is refused too: True would silently mean log phi = 1)."""
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise PotentialError(
                f"potential {self.name} returned {type(value).__name__} {str(value)[:60]!r} for {str(item)[:60]!r}: "
                "its function must return log phi as a float (-inf where phi = 0; see log_indicator)") from None

    def log_phi(self, seqs: Sequences) -> Tensor:
        return self._apply(self.fn, seqs)

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return self._apply(self.prefix_fn, seqs)


def log_indicator(ok: bool) -> float:
    """log 1[ok]: 0 if ok else -inf."""
    return 0.0 if ok else -math.inf
