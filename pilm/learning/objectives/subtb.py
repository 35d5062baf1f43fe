"""Modified subtrajectory balance (Hu et al. 2024, SPECS B.1), lambda = 1."""

from __future__ import annotations

import torch
from torch import Tensor

from .trajectory import PolicyBatch, log_flow


def subtb(batch: PolicyBatch) -> Tensor:
    """Mean over all state pairs i < j <= n (every prefix terminable) of

        [log R(z_{1:i}⊤) + sum_{k=i+1}^{j} log q(z_k | z_{<k}) + log q(⊤ | z_{1:j})
         - log R(z_{1:j}⊤) - log q(⊤ | z_{1:i})]^2 = (F_i - F_j)^2,

    from cumulative sums (``log_flow``), masked after the stop. It is zero exactly when
    q(z_{1:i}) q(⊤ | z_{1:i}) ∝ R(z_{1:i}⊤) on every visited prefix, so at its optimum
    q(z⊤) ∝ R(z⊤); the optimum does not depend on which trajectories are trained on
    (off-policy samples, tempered samples and replay are all valid)."""
    f = log_flow(batch)
    diff = f[:, :, None] - f[:, None, :]
    n = f.shape[1]
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    pairs = pairs & batch.states[:, :, None] & batch.states[:, None, :]
    count = pairs.sum().clamp(min=1)
    return torch.where(pairs, diff, 0.0).pow(2).sum() / count
