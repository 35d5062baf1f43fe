"""A learned residual on top of a look-ahead: log psi_t = a_t · log L(s_{1:t}) + head(s_{<t}, s_t).

L is the target's own prefix score (the look-ahead: ``Toxicity(prefix=True)``'s classifier
score of the prefix, ``SuffixLikelihood(lookahead=...)``'s ending likelihood, a skip model's
``SkipLookahead``), a_t a power per prefix length t (fitted, e.g. ``pilm.evaluation.fit_lookahead``,
or 1), and ``head`` any twist (a ``Twist`` on the hidden state the forward already made, with
``init="base"`` so that it starts at 0 and training starts at the look-ahead alone). Training
moves only the head, so it learns what the look-ahead misses: log psi*_t - a_t log L_t.

Twisted SMC needs psi only at the drawn tokens to weigh, and q ∝ p0 psi over every next token
to propose. The look-ahead of every next token costs V prefix scores per row (a classifier
run on V texts, a model on V sequences), so by default (``propose="head"``) the proposal is
q ∝ p0 · exp(head) and L^a enters the weights after the draw (the critic adds a_t log L_t at
the boundary): any q > 0 where p0 psi > 0 keeps Z-hat unbiased. With a cheap prefix score
(a table, a lexical rule) ``propose="all"`` proposes from q ∝ p0 · L^a · exp(head) itself, the
locally optimal proposal once psi = psi*, so with the exact residual every weight is Z and
Z-hat = Z exactly (Zhao et al. 2024, Proposition 3.1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from .base import Prefixes, TwistFunction

CONFIG_NAME = "residual_config.json"


class ResidualTwist(nn.Module, TwistFunction):
    """log psi_t(s_{1:t}) = powers[t-1] · log L(s_{1:t}) + head(s_{<t}, s_t), with L the prefix
    score of each row's target (module docstring). ``powers``: one a_t for every prefix length
    t = 1..T (a float: the same for all); ``propose``: "head" (q ∝ p0 exp(head), L after the
    draw) or "all" (q ∝ p0 L^a exp(head): every next token's prefix score, for cheap ones)."""

    def __init__(self, head: TwistFunction, powers: float | Sequence[float] = 1.0, *,
                 propose: Literal["head", "all"] = "head"):
        super().__init__()
        if propose not in ("head", "all"):
            raise ValueError(f"propose must be 'head' or 'all', got {propose!r}")
        if head.stateful:
            raise ValueError(f"a residual's head reads the model's hidden state or the prefixes; {type(head).__name__} "
                             "runs a body of its own, which a residual does not step or train")
        if head.output != "log":
            raise ValueError("a residual adds to log L: its head must output log psi (output='log'), "
                             f"not {head.output!r}")
        values = (float(powers),) if isinstance(powers, (int, float)) else tuple(float(a) for a in powers)
        if not values or not all(math.isfinite(a) and a >= 0 for a in values):
            raise ValueError(f"powers must be finite and >= 0 (one per prefix length, or one for all), got {powers!r}")
        self.head, self.powers, self.propose = head, values, propose
        self.uniform = isinstance(powers, (int, float))
        self.needs_prefixes = head.needs_prefixes or propose == "all"
        self.stateful = propose == "all"  # it follows the rows' targets
        self.trained_for = head.trained_for
        self._targets: list = []
        self._groups: Tensor | None = None

    @property
    def prefix_powers(self) -> ResidualTwist | None:
        """Itself where the look-ahead weighs after the draw (``propose="head"``): the critic then
        adds ``power(t) · log L`` to the head's log psi at each drawn token."""
        return self if self.propose == "head" else None

    def power(self, t: int) -> float:
        """a_t for a prefix of t tokens (t >= 1)."""
        if self.uniform:
            return self.powers[0]
        if not 1 <= t <= len(self.powers):
            raise ValueError(f"this residual has powers for prefixes of 1 to {len(self.powers)} tokens, not {t}")
        return self.powers[t - 1]

    def check(self, targets) -> None:
        """Refuse targets it cannot twist: no prefix score to look ahead with, or a horizon
        beyond its powers."""
        for t in targets:
            if not t.has_prefix_potential:
                raise ValueError(f"a residual twist adds to the target's prefix score, and {t.potential} has none "
                                 "(give the potential a look-ahead: Toxicity(prefix=True), or --lookahead on the command line)")
            if self.propose == "all" and t.potential.costly_prefix:
                raise ValueError(f"propose='all' scores the look-ahead of every next token, and {t.potential}'s prefix "
                                 "score runs a model: use propose='head'")
            if not self.uniform and t.max_new_tokens > len(self.powers):
                raise ValueError(f"this residual has powers for {len(self.powers)} tokens; the target draws "
                                 f"{t.max_new_tokens}")

    def look_ahead(self, target, prefixes: Sequence[Sequence[int]]) -> Tensor:
        """a_t · log L(prefix) of each (non-empty) prefix of ``target``, float64: 0 where a_t = 0."""
        powers = torch.tensor([self.power(len(p)) for p in prefixes], dtype=torch.float64)
        if not len(prefixes):
            return powers
        log_l = target.log_prefix_potential([list(p) for p in prefixes]).double()
        return torch.where(powers > 0, powers * log_l, 0.0)

    # -- stepping (propose="all": each row's target, for its look-ahead) ----------------------
    def begin(self, targets, n: int) -> None:
        self.check(targets)
        self._targets = list(targets)
        self._groups = torch.arange(len(targets)).repeat_interleave(n)

    def reindex(self, idx: Tensor) -> None:
        if self._groups is not None:
            self._groups = self._groups[idx.cpu()]

    def log_psi(self, prefixes: Prefixes | None, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        out = self.head.log_psi(prefixes, hidden, condition)
        if self.propose == "head":
            return out
        assert prefixes is not None and self._groups is not None  # needs_prefixes; begin() came first
        vocab = out.shape[-1]
        ahead = torch.stack([self.look_ahead(self._targets[int(g)], [tuple(p) + (v,) for v in range(vocab)])
                             for p, g in zip(prefixes, self._groups.tolist(), strict=True)])
        return out + ahead.to(out.device, out.dtype)

    def log_psi_at(self, prefixes: Prefixes | None, hidden: Tensor, tokens: Tensor,
                   condition: Tensor | None = None) -> Tensor:
        """The head at the drawn tokens (what training reads; the look-ahead is added apart)."""
        return self.head.log_psi_at(prefixes, hidden, tokens, condition)

    def condition_for(self, target) -> Tensor | None:
        return self.head.condition_for(target)

    # -- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """The head (its own format) and ``residual_config.json`` (powers, proposal) in ``directory``."""
        save = getattr(self.head, "save_pretrained", None)
        if save is None:
            raise TypeError(f"a residual twist saves its head, and {type(self.head).__name__} cannot be saved")
        self.head.trained_for = self.trained_for  # what train_twist set on the residual travels with the head
        directory = Path(save(directory))
        (directory / CONFIG_NAME).write_text(json.dumps({
            "powers": self.powers[0] if self.uniform else list(self.powers), "propose": self.propose}))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, model) -> ResidualTwist:
        """A residual saved by ``save_pretrained`` whose head is a ``Twist``, on ``model``."""
        from .head import Twist

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory} holds no residual twist ({CONFIG_NAME} is missing)")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        return cls(Twist.from_pretrained(directory, model), cfg["powers"], propose=cfg["propose"])
