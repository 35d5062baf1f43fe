"""Process rewards: r(c, x_{<=t}) in [0, 1] for a reasoning chain cut into steps.

A process reward model (PRM) scores how promising a partial solution is after its latest
step. Puri et al. 2025 read it as the likelihood of an acceptance observation,
p(o_t = 1 | c, x_{<=t}) = r(c, x_{<=t}); read as a value, r(c, x_{<=t}) ~ P(correct | prefix)
is the optimal twist psi*_t = E[phi | prefix] of the target p_M phi with phi = 1[correct]
(Zhao et al. 2024). One protocol covers both readings: ``score`` takes every row of a batch
at a step boundary (one call per step) and returns one probability per row.

Per-step scores r_1 .. r_t of a chain combine by an ``AGGREGATIONS`` rule: "last" (the
current score; a PRM that reads the whole prefix already aggregates), "min", "prod" or
"mean".
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PilmError


class PRMError(PilmError, ValueError):
    """A process reward broke its contract (NaN, outside [0, 1], wrong shape)."""


@dataclass(frozen=True)
class StepBatch:
    """Rows to score at a step boundary. Per row: ``questions`` (the problem in words),
    ``prompts`` (the prompt's token ids), ``steps`` (the texts of the steps so far, the
    latest last), ``tokens`` (the completion's token ids so far). For PRMs that read the
    policy's own forward: ``hidden`` (rows, H), the hidden state from which the latest
    step's last token was drawn, and ``last`` (rows,), that token, so that a value head
    psi(s_{<t}, v) gives r = psi(s_{<t}, s_t) without another forward."""

    questions: list[str]
    prompts: list[tuple[int, ...]]
    steps: list[list[str]]
    tokens: list[tuple[int, ...]]
    hidden: Tensor | None = None
    last: Tensor | None = None

    def __len__(self) -> int:
        return len(self.steps)


class ProcessReward(ABC):
    """r(c, x_{<=t}) in [0, 1] for each row of a ``StepBatch``. ``reads_hidden``: it needs the
    policy's hidden states (a learned value head). ``lm_tokens`` counts the tokens it ran
    through a language model of its own (the compute a judge spends)."""

    reads_hidden: bool = False

    def __init__(self) -> None:
        self.lm_tokens = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def begin(self) -> None:
        """A run starts: a PRM that keeps state between calls (a judge's prompt cache) drops
        it, so that no run reuses another's work and each run's ``lm_tokens`` are its own."""

    @abstractmethod
    def score(self, batch: StepBatch) -> Tensor:
        """r(c, x_{<=t}) of every row, shape (rows,), in [0, 1]."""

    def __repr__(self) -> str:
        return self.name


def checked_scores(prm: ProcessReward, batch: StepBatch) -> Tensor:
    """``prm.score(batch)`` as float64, checked: the right shape, no NaN, nothing outside
    [0, 1]; otherwise a ``PRMError`` naming the PRM, how many rows broke it and an example."""
    out = torch.as_tensor(prm.score(batch)).double().reshape(-1)
    if out.shape != (len(batch),):
        raise PRMError(f"process reward {prm.name} returned {tuple(out.shape)} scores for {len(batch)} rows")
    bad = torch.isnan(out) | (out < 0) | (out > 1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise PRMError(
            f"process reward {prm.name} returned {float(out[i])} for {int(bad.sum())} of {len(batch)} rows "
            f"(e.g. after the steps {batch.steps[i]!r}): scores must be probabilities in [0, 1]")
    return out


def _mean(s: Sequence[float]) -> float:
    return sum(s) / len(s)


AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "last": lambda s: s[-1],
    "min": min,
    "prod": math.prod,
    "mean": _mean,
}


def aggregate(scores: Sequence[float], how: str) -> float:
    """One score for a chain from its per-step scores (``AGGREGATIONS``); 1 before any step."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[how](scores) if scores else 1.0
