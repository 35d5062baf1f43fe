"""Trajectory balance with a learned log Z (Malkin et al. 2022; as used by Lee et al. 2025 for red-teaming)."""

from __future__ import annotations

from torch import Tensor

from .trajectory import PolicyBatch


def tb(batch: PolicyBatch) -> Tensor:
    """Mean over trajectories of (log Z_theta + log q(z⊤) - log R(z⊤))^2.

    Zero exactly when q(z⊤) = R(z⊤) / Z_theta for every trajectory, i.e. q ∝ R and
    Z_theta = Z = sum_z R(z⊤). Off-policy samples are valid. ``batch.log_z`` is the learned
    scalar (or a head on the prompt's state, for many prompts)."""
    if batch.log_z is None:
        raise ValueError("trajectory balance needs batch.log_z (a learned log Z)")
    return (batch.log_z + batch.log_q_total - batch.log_r_final).pow(2).mean()
