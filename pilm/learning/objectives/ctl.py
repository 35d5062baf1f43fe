"""Contrastive Twist Learning (Zhao et al., ICML 2024)."""

from torch import Tensor

from .batch import TwistBatch, sigma_weights_per_step, twist_weights_per_step


def ctl(batch: TwistBatch, base: TwistBatch | None = None) -> Tensor:
    """L(theta) = mean_t KL( sigma(s_{1:t}) || pi_t^theta(s_{1:t}) ), pi_t ∝ p0 psi_t^theta.

    Its gradient is EBM maximum likelihood at each t:
    -grad L = mean_t { E_sigma[grad log psi_t] - E_{pi_t}[grad log psi_t] }. One set of K
    twist-induced samples serves both expectations ("ebm_one_sample"): positives weighted by
    the final SIS weights for sigma (with the true phi), negatives by the SIS weights for
    pi_t (with the learned psi_t); both detached and renormalised among the sequences still
    running at t. At psi* the twisted proposal is sigma, both weight sets are uniform, and
    the gradient is exactly zero.
    """
    diff = sigma_weights_per_step(batch) - twist_weights_per_step(batch)
    per_step = (diff * batch.log_psi).sum(0)
    steps = batch.mask.any(0)
    return -per_step[steps].mean()
