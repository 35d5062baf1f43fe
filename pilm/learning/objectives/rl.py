"""Soft-Q / squared error in log space (the "RL" twist baseline of Zhao et al. 2024)."""

import torch
from torch import Tensor

from .batch import TwistBatch

LOG_FLOOR = -30.0  # log phi = -inf (hard constraints) would give an infinite square


def rl(batch: TwistBatch, base: TwistBatch | None = None) -> Tensor:
    """L = mean_{k,t} ( log psi_t(s_{1:t}) - y_t )^2 with the soft Bellman target
    y_t = sg[ log sum_v p0(v | s_{1:t}) psi_{t+1}(s_{1:t}, v) ] and y = log phi(s) at the
    last token (clamped below at LOG_FLOOR). psi* satisfies the recursion exactly, so the
    loss and its gradient are zero there. Samples from the twisted proposal."""
    if batch.log_p0_all is None:
        raise ValueError("the rl objective needs log p0 of every token (log_p0_all)")
    assert batch.log_psi_all is not None  # the trainer scores every token for rl
    soft_next = torch.logsumexp(batch.log_p0_all + batch.log_psi_all.detach(), -1)  # (K, T): value of s_{<t+1}
    target = torch.full_like(batch.log_p0, LOG_FLOOR)
    target[:, :-1] = soft_next[:, 1:]
    last = batch.lengths - 1
    target[torch.arange(len(last), device=last.device), last] = batch.log_phi.float()
    target = target.clamp(min=LOG_FLOOR)
    err = (batch.log_psi - target) ** 2
    return err[batch.mask].mean()
