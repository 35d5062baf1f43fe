"""What a boundary shows a rule, what the rule decides, the rule protocol, and ``Resample``,
the SMC rule (the paper's weights, PRM beam, DVTS and independent chains are rules too, beside
the samplers that use them).

A rule sees one target's N rows (``View``) and returns a ``Decision``: new weights, the
parents of a selection (or none) and the factor it adds to log Z-hat.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..proposals import log_mean_exp
from .resampling import Scheme, ess, get_scheme, multinomial


@dataclass(frozen=True)
class View:
    """One target's N rows at a boundary: ``log_w`` the weights so far (the draws' p_M / q
    included), ``log_psi`` log psi at each row's previous boundary, ``log_psi_now`` at this
    one (log phi where a row finished now; the previous value where it did not step),
    ``scores`` the critic's aggregated process reward (NaN without one), ``stepped`` the rows
    that reached this boundary, ``finished`` (now or before), ``alive`` (still in the pool),
    ``going`` whether any row still runs, ``reference`` whether row 0 is a conditional SMC
    reference, the rows' ``tokens`` and ``lengths``, the target's ``index`` in the batch and its
    reference's ``reference_tokens``."""

    log_w: Tensor
    log_psi: Tensor
    log_psi_now: Tensor
    scores: Tensor
    stepped: Tensor
    finished: Tensor
    alive: Tensor
    going: bool
    reference: bool
    generator: torch.Generator
    tokens: Tensor
    lengths: Tensor
    index: int = 0
    reference_tokens: tuple[int, ...] | None = None

    @functools.cached_property
    def chains(self) -> list[tuple[int, ...]]:
        """The token ids of each row."""
        return [tuple(row[:k]) for row, k in zip(self.tokens.tolist(), self.lengths.tolist(), strict=True)]


@dataclass
class Decision:
    """What a rule decided for one target. ``log_psi`` (per row before selection; copied to
    the children), ``parents`` (local indices, ``None``: no selection), then per row after
    selection: ``log_w`` and ``alive`` (rows kept in the pool). ``log_z``: the factor added
    to log Z-hat (0 when none); ``ess``: the ESS of the weights the rule formed, before any
    selection (NaN for searches); ``reference``: the tokens row 0 follows from now on, where
    ancestor sampling gave the reference a new past."""

    log_w: Tensor
    log_psi: Tensor
    alive: Tensor
    parents: Tensor | None = None
    log_z: float = 0.0
    ess: float = math.nan
    reference: tuple[int, ...] | None = None


class Rule(ABC):
    """How a boundary weighs and selects one target's rows. ``weighs``: its weights define a
    target whose normaliser ``log_z`` estimates (a target whose every weight is 0 is
    extinct); ``importance``: the final weights are importance weights of that target (not
    the paper's fresh per-step scores), so a row at weight 0 draws no more; ``reads_model``:
    it runs the model itself (teacher-forced log-probs over the vocabulary)."""

    name: str = "rule"
    weighs: bool = False
    importance: bool = False
    reads_model: bool = False

    @abstractmethod
    def decide(self, v: View) -> Decision: ...


class Resample(Rule):
    """SMC: w *= psi_t / psi_{t-1} at each boundary (phi / psi_{t-1} where a row finished), and
    when ESS < ``threshold`` * N (1: at every boundary, decided without comparing floats; 0:
    never, importance sampling) the rows are resampled by ``scheme``, the log-mean weight
    joins log Z-hat and the weights reset. With a ``reference`` (conditional SMC, Andrieu et
    al. 2010) row 0 keeps itself and the other N-1 draw their ancestors multinomially."""

    name, weighs, importance = "twisted", True, True

    def __init__(self, scheme: str | Scheme = "systematic", threshold: float = 0.5):
        if not 0 <= threshold <= 1:
            raise ValueError(f"ess_threshold must be in [0, 1], got {threshold}")
        self.scheme, self.threshold = get_scheme(scheme), threshold

    def decide(self, v: View) -> Decision:
        log_w = self.weigh(v)
        if torch.isneginf(log_w).all():
            return Decision(log_w, v.log_psi_now, v.alive)
        ess_now = ess(log_w)
        due = self.threshold >= 1 or ess_now < self.threshold * len(log_w)
        if not (v.going and due):
            return Decision(log_w, v.log_psi_now, v.alive, ess=ess_now)
        n = len(log_w)
        parents = conditional_ancestors(log_w, v.generator) if v.reference else self.scheme(log_w, n, v.generator)
        return Decision(torch.zeros_like(log_w), v.log_psi_now, v.alive, parents, float(log_mean_exp(log_w)), ess_now)

    @staticmethod
    def weigh(v: View) -> Tensor:
        """log w after this boundary: w *= psi_t / psi_{t-1} for the rows that stepped (a row
        already at weight 0 stays at 0 instead of becoming NaN)."""
        incr = torch.where(torch.isneginf(v.log_psi), 0.0, v.log_psi_now - v.log_psi)
        return v.log_w + torch.where(v.stepped, incr, 0.0)


def conditional_ancestors(log_w: Tensor, generator: torch.Generator) -> Tensor:
    """Conditional SMC: row 0 (the reference) keeps itself; the other N-1 draw their parents
    multinomially from all N (Andrieu et al. 2010; as used for upper bounds by Zhao et al. 2024)."""
    n = len(log_w)
    rest = multinomial(log_w, n - 1, generator) if n > 1 else torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), rest])
