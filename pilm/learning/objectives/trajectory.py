"""The per-state tensors every fine-tuning objective reads (GFlowNet view of generation).

A trajectory from prompt x is z_1..z_n followed by the stop action ⊤ (the EOS token, or
the horizon T, where stopping is forced). State i is the prefix z_{1:i}, i = 0..n; every
state is terminable, with reward R(z_{1:i}⊤). For a pilm target, R(s) = sigma~(s) =
p0(s | x) phi(s) (optionally tempered, R^{1/tau}): the objectives below all have
q(z⊤) ∝ R(z⊤), i.e. q = sigma, at their optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PolicyBatch:
    """B trajectories, horizon T (shapes below).

    ``log_q`` (B, T): log q(z_i | z_{<i}) of each token the policy chose (with gradients;
    0 past n). ``log_stop`` (B, T+1): log q(⊤ | z_{1:i}) (with gradients; 0 at i = T, where
    the horizon stops every trajectory). ``log_r`` (B, T+1): log R(z_{1:i}⊤), detached; -inf
    where R = 0 except at the final state, which is finite (floored); only the final state's
    value is needed unless an objective uses every prefix. ``states`` (B, T+1):
    True for i <= n. ``log_z`` (B,): a learned log Z (trajectory balance), else None.
    """

    log_q: Tensor
    log_stop: Tensor
    log_r: Tensor
    states: Tensor
    log_z: Tensor | None = None

    @property
    def lengths(self) -> Tensor:
        """n, the number of tokens before the stop action, (B,)."""
        return self.states.sum(1) - 1

    def at_end(self, x: Tensor) -> Tensor:
        """x[b, n_b] for a (B, T+1) tensor."""
        return x.gather(1, self.lengths[:, None]).squeeze(1)

    @property
    def log_q_total(self) -> Tensor:
        """log q(z⊤) = sum_i log q(z_i | z_{<i}) + log q(⊤ | z), (B,)."""
        return self.log_q.sum(1) + self.at_end(self.log_stop)

    @property
    def log_r_final(self) -> Tensor:
        """log R(z⊤) of each trajectory, (B,)."""
        return self.at_end(self.log_r)


def log_flow(batch: PolicyBatch) -> Tensor:
    """F_i = log R(z_{1:i}⊤) - log q(⊤ | z_{1:i}) - sum_{k<=i} log q(z_k | z_{<k}), (B, T+1).

    With every state terminable, the flow through state i is F(z_{1:i}) =
    R(z_{1:i}⊤) / q(⊤ | z_{1:i}); subtrajectory balance between states i < j says
    F_i = F_j (Hu et al. 2024, modified subtrajectory balance)."""
    cum = torch.cat([batch.log_q.new_zeros(len(batch.log_q), 1), torch.cumsum(batch.log_q, 1)], 1)
    return batch.log_r - batch.log_stop - cum
