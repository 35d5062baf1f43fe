"""Critics: log psi of each row at a step boundary, the one protocol through which a
potential's prefix score, a twist and a process reward reach the samplers.

At a boundary the engine hands the critic the rows that just ended a step (``Stepped``); the
critic returns log psi_t for each (the engine puts log phi where a row finished: the
target's potential, or, for a target without one under a critic whose last score is phi, the
critic's own value). A learned value head is one object here: as a twist it proposes and its
psi at the drawn token is read back (``PrefixCritic``); as a process reward it scores steps
(``ProcessRewardCritic``), reading the hidden state the forward already made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from ..prm import ProcessReward, StepBatch, aggregate, checked_scores
from ..target import Target
from ..twists.residual import ResidualTwist

if TYPE_CHECKING:
    from .particles import Particles


@dataclass(frozen=True)
class Stepped:
    """The rows that reached a boundary: ``rows`` (global), ``finished`` (each row ended its
    sequence here), ``psi`` the proposal's log psi at each row's last draw and ``twisted``
    whether the proposal has a twist of its own (else zeros), ``hidden`` the state each row's
    last token was drawn from (when the critic reads it), ``last`` that token, ``steps`` the
    texts of each row's steps so far (under a step boundary)."""

    targets: Sequence[Target]
    particles: Particles
    rows: Tensor
    finished: Tensor
    psi: Tensor
    twisted: bool
    hidden: Tensor | None
    last: Tensor
    steps: list[list[str]] | None

    @property
    def groups(self) -> Tensor:
        return self.rows // self.particles.n

    def prefixes(self, where: Tensor | None = None) -> list[list[int]]:
        """The token ids of the rows (those ``where`` is set)."""
        rows = self.rows if where is None else self.rows[where]
        p = self.particles
        return [r[:k] for r, k in zip(p.tokens[rows].tolist(), p.lengths[rows].tolist(), strict=True)]


class Critic:
    """The protocol (module docstring). ``reads_hidden``: it needs ``Stepped.hidden``;
    ``scores_phi``: its value where a row finished is phi for a target without a potential.
    The default critic says psi = 1 (phi alone weighs, at the end)."""

    reads_hidden: bool = False
    scores_phi: bool = False

    def begin(self, targets: Sequence[Target], n: int) -> None:
        """Start ``n`` rows per target."""

    def log_psi(self, b: Stepped) -> Tensor:
        """log psi_t of each stepped row, float64."""
        return torch.zeros(len(b.rows), dtype=torch.float64)

    def scores(self, rows: int) -> Tensor:
        """Each row's aggregated score, for rules that read scores (NaN: none)."""
        return torch.full((rows,), math.nan, dtype=torch.float64)

    def select(self, parents: Tensor) -> None:
        """Row k becomes a copy of row ``parents[k]``."""


class PrefixCritic(Critic):
    """Token SMC's psi: the proposal's twist at the drawn token where it has one (twisted SMC),
    else the potential's prefix score (with ``prefix``; 1 without). A ``residual`` twist
    (``pilm.twists.ResidualTwist`` proposing from its head) also weighs by its look-ahead:
    log psi_t = head + a_t log L(s_{1:t}), L the potential's prefix score."""

    def __init__(self, prefix: bool = True, residual: ResidualTwist | None = None):
        self.prefix, self.residual = prefix, residual

    def begin(self, targets: Sequence[Target], n: int) -> None:
        self.scored = self.prefix and any(t.has_prefix_potential for t in targets)
        if self.residual is not None:
            self.residual.check(targets)

    def log_psi(self, b: Stepped) -> Tensor:
        if b.twisted:
            ahead = self.residual
            return b.psi.double() + (0.0 if ahead is None else _per_target(b, ahead.look_ahead))
        if not self.scored:
            return torch.zeros(len(b.rows), dtype=torch.float64)
        return _per_target(b, lambda target, prefixes: target.log_prefix_potential(prefixes).double())


def _per_target(b: Stepped, score) -> Tensor:
    """``score(target, prefixes)`` of each stepped row that goes on, one call per target, float64
    (0 where a row finished, or its target has no prefix score)."""
    out = torch.zeros(len(b.rows), dtype=torch.float64)
    for g in b.groups.unique().tolist():
        target, going = b.targets[g], (b.groups == g) & ~b.finished
        if target.has_prefix_potential and going.any():
            out[going] = score(target, b.prefixes(going))
    return out


class ProcessRewardCritic(Critic):
    """psi_t = a process reward's scores of a row's steps, combined by ``aggregation``
    (``pilm.prm.AGGREGATIONS``); one batched call per boundary. It keeps each row's scores
    (``history``) and counts the rows it scored (``calls``)."""

    scores_phi = True

    def __init__(self, prm: ProcessReward, aggregation: str = "last"):
        self.prm, self.aggregation = prm, aggregation
        self.reads_hidden = prm.reads_hidden
        self.history: list[list[float]] = []
        self.calls = 0

    def begin(self, targets: Sequence[Target], n: int) -> None:
        self.history, self.calls = [[] for _ in range(len(targets) * n)], 0
        self.prm.begin()

    def log_psi(self, b: Stepped) -> Tensor:
        groups = b.groups.tolist()
        batch = StepBatch(questions=[b.targets[g].question for g in groups],
                          prompts=[b.targets[g].prompt_ids for g in groups], steps=cast("list[list[str]]", b.steps),
                          tokens=[tuple(p) for p in b.prefixes()], hidden=b.hidden, last=b.last)
        for row, s in zip(b.rows.tolist(), checked_scores(self.prm, batch).tolist(), strict=True):
            self.history[row].append(s)
        self.calls += len(b.rows)
        return torch.tensor([aggregate(self.history[row], self.aggregation) for row in b.rows.tolist()],
                            dtype=torch.float64).log()

    def scores(self, rows: int) -> Tensor:
        return torch.tensor([aggregate(s, self.aggregation) if s else math.nan for s in self.history],
                            dtype=torch.float64)

    def select(self, parents: Tensor) -> None:
        self.history = [list(self.history[i]) for i in parents.tolist()]
