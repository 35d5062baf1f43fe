"""Independent chains: greedy chain of thought, self-consistency and best-of-N.

Each draws chains of the policy p_M (the model at ``temperature``) independently, with no
resampling, so the particles are i.i.d. samples of p_M and every answer selection
(``StepResult.answer``) is a plain estimator over them: majority vote (self-consistency,
Wang et al. 2023), the chain with the highest aggregated process reward (best-of-N), or
the answer with the largest total score (weighted best-of-N, search-and-learn's
``find_answer_with_largest_sum``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from ..prm import ProcessReward, as_prm
from ..target import Target
from ..twists.base import TwistFunction
from .batch import seeded_generators
from .boundaries import step_targets
from .chains import run_steps
from .result import StepResult
from .rules import Decision, Rule, View


class Independent(Rule):
    """No weighting and no selection: every chain runs to its end on its own."""

    name = "independent"

    def decide(self, b: View) -> Decision:
        return Decision(b.log_w, b.log_psi, b.alive)


@overload
def sample_chains(target: Target, n: int, prm: ProcessReward | TwistFunction | None, *, temperature: float,
                  aggregation: str = ..., step=..., seed: int = ..., method: str, progress: bool = ...) -> StepResult: ...
@overload
def sample_chains(target: Sequence[Target], n: int, prm: ProcessReward | TwistFunction | None, *, temperature: float,
                  aggregation: str = ..., step=..., seed: int = ..., method: str, progress: bool = ...) -> list[StepResult]: ...
def sample_chains(target: Target | Sequence[Target], n: int, prm: ProcessReward | TwistFunction | None, *,
                  temperature: float, aggregation: str = "last", step=None, seed: int = 0, method: str,
                  progress: bool = False) -> StepResult | list[StepResult]:
    """``n`` independent chains per target, scored by ``prm`` at every step if one is given."""
    targets, single = step_targets(target, step)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"need at least one chain, got {n!r}")
    out = run_steps(targets, n, None if prm is None else as_prm(prm), Independent(),
                    seeded_generators(seed, len(targets), targets[0].model.device), temperature=temperature,
                    aggregation=aggregation, method=method, progress=progress, info={"seed": seed})
    return out[0] if single else out


def greedy(target: Target | Sequence[Target], *, step=None, progress: bool = False) -> StepResult | list[StepResult]:
    """One greedy chain of thought per target (temperature 0)."""
    return sample_chains(target, 1, None, temperature=0.0, step=step, method="greedy", progress=progress)


def self_consistency(target: Target | Sequence[Target], n: int, *, temperature: float = 1.0, step=None, seed: int = 0,
                     progress: bool = False) -> StepResult | list[StepResult]:
    """``n`` independent chains, no process reward; answer with ``.answer("vote")``."""
    return sample_chains(target, n, None, temperature=temperature, step=step, seed=seed, method="sc",
                         progress=progress)


def best_of_n(target: Target | Sequence[Target], prm: ProcessReward | TwistFunction, n: int, *,
              temperature: float = 1.0, aggregation: str = "last", step=None, seed: int = 0,
              progress: bool = False) -> StepResult | list[StepResult]:
    """``n`` independent chains scored by ``prm`` after every step; answer with
    ``.answer("argmax")`` (best-of-N) or ``.answer("weighted_vote")`` (weighted best-of-N)."""
    return sample_chains(target, n, prm, temperature=temperature, aggregation=aggregation, step=step, seed=seed,
                         method="bon", progress=progress)
