"""Twist functions psi_t: how promising each next token is for the final potential.

A twist returns log psi_t(s_{<t}, v) for every candidate next token v at once, shape
(n, V), so the twist-induced proposal q(v | s_{<t}) ∝ p0(v | s_{<t}) psi_t(s_{<t}, v)
costs no extra LM pass (Zhao et al. 2024, Twisted SMC). The optimal twist is
psi*_t(s_{1:t}) = E_{p0}[phi(s) | s_{1:t}]; with it twisted SMC has zero-variance weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import Tensor

Prefixes = Sequence[tuple[int, ...]]


class TwistFunction(ABC):
    """log psi_t for all next tokens, given the rows' prefixes and/or last hidden states.

    ``needs_prefixes`` tells the engine whether to build the token prefixes (a learned head
    reads only ``hidden``). ``condition`` is the twist's conditioning vector for the
    target (see ``condition_for``), or ``None``.
    """

    needs_prefixes: bool = False
    trained_for: dict | None = None  # ``Target.describe()`` of the one target it was trained on, if one
    output: str = "log"  # "log_sigmoid": psi in (0, 1), as FUDGE needs
    stateful: bool = False  # runs its own LM body: the engine calls begin/advance/reindex

    def begin(self, targets, n: int) -> None:
        """Start ``n`` rows on each target's prompt, target-major (stateful twists only)."""

    def advance(self, tokens: Tensor, hold: Tensor | None = None) -> None:
        """Append one token per row, in step with the model (stateful twists only)."""

    def reindex(self, idx: Tensor) -> None:
        """Select rows, in step with the model (stateful twists only)."""

    @abstractmethod
    def log_psi(self, prefixes: Prefixes | None, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        """log psi_t(prefix_i, v) for each row i and every token v: shape (n, V), float32."""

    def log_psi_at(self, prefixes: Prefixes | None, hidden: Tensor, tokens: Tensor,
                   condition: Tensor | None = None) -> Tensor:
        """log psi_t(prefix_i, tokens_i) of each row at one token, (n,): what objectives that
        read psi only at the drawn tokens need. Heads override it to skip the other V - 1."""
        return self.log_psi(prefixes, hidden, condition).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)

    def condition_for(self, target) -> Tensor | None:
        """The conditioning vector this twist uses for ``target`` (``None``: unconditional)."""
        return None
