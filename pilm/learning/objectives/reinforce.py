"""REINFORCE on the ELBO with a leave-one-out baseline (reverse KL; the RL baseline of the papers)."""

from __future__ import annotations

from torch import Tensor

from .trajectory import PolicyBatch


def reinforce(batch: PolicyBatch) -> Tensor:
    """Minimises KL(q || sigma) = log Z - E_q[log R(z⊤) - log q(z⊤)].

    With R = p0 phi, log R - log q = log phi - log(q / p0): reward minus a KL penalty to p0
    (coefficient 1, the KL-regularised RL objective whose optimum is q = sigma). Gradient
    estimate: -mean_b (f_b - mean_{b' != b} f_{b'}) grad log q(z_b⊤) with f = log R - log q
    (the leave-one-out baseline of RLOO / VIMCO-style; E_q[grad log q] = 0 removes the
    direct term). Needs on-policy samples (B >= 2 from one prompt)."""
    f = (batch.log_r_final - batch.log_q_total).detach()
    b = len(f)
    if b < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per step")
    baseline = (f.sum() - f) / (b - 1)
    return -((f - baseline) * batch.log_q_total).mean()
