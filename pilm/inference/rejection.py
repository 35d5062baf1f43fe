"""Exact samples of sigma by rejection from the base model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import PotentialError, RejectionBudgetError
from ..models.device import seeded_generator
from ..target import Target
from .smc import run_smc


@dataclass
class RejectionResult:
    """Accepted samples (exact draws from sigma) and the cost of getting them.

    ``acceptance_rate`` = n_accepted / n_draws estimates Z = E_{p0}[phi] (unbiased), since
    each draw is accepted with probability phi. ``samples`` holds the first ``n`` accepted.
    """

    samples: list[str]
    tokens: list[list[int]]
    n_draws: int
    n_accepted: int
    info: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_draws if self.n_draws else math.nan


def rejection_sample(
    target: Target, n: int, *, seed: int = 0, max_draws: int = 10_000, batch_size: int = 64
) -> RejectionResult:
    """Draw s ~ p0 and accept it with probability phi(s) until ``n`` are accepted.

    Needs 0 <= phi <= 1 (log phi <= 0). Accepted samples are exact i.i.d. draws from sigma.
    Raises ``RejectionBudgetError`` (carrying the partial result) if ``max_draws`` proposals
    do not yield ``n`` acceptances.
    """
    generator = seeded_generator(seed, target.model.device)  # run_smc draws on the model's device
    accepted: list[list[int]] = []
    draws = 0
    while len(accepted) < n and draws < max_draws:
        k = min(batch_size, max_draws - draws)
        run = run_smc(target, k, generator, ess_threshold=0.0, use_prefix=False, on_extinction="return")
        log_phi = torch.tensor(run.log_weights)
        if (log_phi > 1e-6).any():  # float slack for phi computed as exactly 1
            raise PotentialError(
                f"rejection sampling needs phi <= 1, but potential {target.potential} gave phi = "
                f"{math.exp(float(log_phi.max())):.4g}; rescale it or use importance sampling / SMC"
            )
        u = torch.rand(k, generator=generator, dtype=torch.float64, device=generator.device).cpu()
        keep = (torch.log(u) < log_phi).nonzero().squeeze(1).tolist()
        accepted.extend(run.tokens[i] for i in keep)
        draws += k
    n_accepted, accepted = len(accepted), accepted[:n]
    result = RejectionResult(
        target.sequences(accepted).texts, accepted, draws, n_accepted, {"seed": seed, "max_draws": max_draws}
    )
    if n_accepted < n:
        rate = n_accepted / draws
        need = f"about {int(n / rate):,} draws" if rate > 0 else "an unknown number of draws (none accepted yet)"
        raise RejectionBudgetError(
            f"rejection sampling accepted {len(accepted)} of {n} samples in max_draws={max_draws:,} draws "
            f"(acceptance rate {rate:.3g}); {n} samples need {need}. Raise max_draws or use SMC.",
            partial=result,
        )
    return result
