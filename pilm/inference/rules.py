"""What a step boundary shows a selection rule, what the rule decides, and the rule protocol
(the particle filters' weights, beam selection, DVTS subtrees and independent chains are rules)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .resampling import multinomial


@dataclass
class Boundary:
    """What a rule sees of one target at a boundary (N rows each): ``scores`` the aggregated
    PRM score of every chain (NaN without a PRM), ``stepped`` the rows that ended a step now,
    ``finished`` the rows that are finished (now or before), ``log_phi`` log phi of the rows
    that finished now (the target's potential, or log of the score without one), ``log_w``
    the weights so far, ``log_psi`` the log twist of each row at its previous boundary,
    ``alive`` rows still in the pool, ``going`` whether any row still runs, ``reference``
    whether row 0 is a conditional SMC reference, ``chains`` the token ids of each row (for
    rules that set ``reads_chains``)."""

    scores: Tensor
    stepped: Tensor
    finished: Tensor
    log_phi: Tensor
    log_w: Tensor
    log_psi: Tensor
    alive: Tensor
    going: bool
    reference: bool
    generator: torch.Generator
    chains: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class Decision:
    """What a rule decided for one target. ``log_psi`` (per row before selection; copied to
    the children), ``parents`` (local indices, ``None``: no selection), then per row after
    selection: ``log_w`` and ``alive`` (rows kept in the pool). ``log_z``: the factor added
    to log Z-hat (0 when none); ``ess``: the ESS of the weights the rule formed, before any
    selection (NaN for searches)."""

    log_w: Tensor
    log_psi: Tensor
    alive: Tensor
    parents: Tensor | None = None
    log_z: float = 0.0
    ess: float = math.nan


class Rule(ABC):
    """How a boundary weighs and selects one target's rows. ``weighs``: its weights define a
    target whose normaliser ``log_z`` estimates (a target whose every weight is 0 is
    extinct); ``importance``: the final weights are importance weights of that target (not
    the paper's fresh per-step scores)."""

    name: str = "rule"
    weighs: bool = False
    importance: bool = False
    reads_chains: bool = False  # it needs ``Boundary.chains`` (built only then)

    @abstractmethod
    def decide(self, b: Boundary) -> Decision: ...


def conditional_ancestors(log_w: Tensor, generator: torch.Generator) -> Tensor:
    """Conditional SMC: row 0 (the reference) keeps itself; the other N-1 draw their parents
    multinomially from all N (Andrieu et al. 2010; as used for upper bounds by Zhao et al. 2024)."""
    n = len(log_w)
    rest = multinomial(log_w, n - 1, generator) if n > 1 else torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), rest])
