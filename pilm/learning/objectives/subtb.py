"""Modified subtrajectory balance (Hu et al. 2024, GFlowNet fine-tuning), lambda = 1."""

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
    (off-policy samples, tempered samples and replay are all valid).

    A prefix with R = 0 (log R = -inf, e.g. a number not yet complete) carries no flow
    information and is left out. With a learned ``batch.log_z`` the root's flow log F = log Z
    joins every trajectory as one more state (before the empty prefix), so the first token's
    distribution stays constrained when the empty prefix has R = 0, and a trajectory that
    stops at once is balanced against it. (The alternative, flooring every prefix's log R at
    -100 as the reference code does, starts training with residuals of ~100 that swamp the
    balance between valid answers.) At the optimum log Z is the true one.
    """
    f = log_flow(batch)
    usable = batch.states & torch.isfinite(f)
    if batch.log_z is not None:
        f = torch.cat([batch.log_z.expand(len(f))[:, None], f], 1)
        usable = torch.cat([torch.ones_like(usable[:, :1]), usable], 1)
    f = torch.where(usable, f, 0.0)
    diff = f[:, :, None] - f[:, None, :]
    n = f.shape[1]
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool, device=f.device), diagonal=1)
    pairs = pairs & usable[:, :, None] & usable[:, None, :]
    count = pairs.sum().clamp(min=1)
    return torch.where(pairs, diff, 0.0).pow(2).sum() / count
