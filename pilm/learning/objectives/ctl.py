"""Contrastive Twist Learning (Zhao et al., ICML 2024)."""

import torch
from torch import Tensor

from .batch import TwistBatch, masked_softmax, sigma_weights_per_step, twist_weights_per_step


def ctl(batch: TwistBatch, base: TwistBatch | None = None, positives: TwistBatch | None = None) -> Tensor:
    """L(theta) = mean_t KL( sigma(s_{1:t}) || pi_t^theta(s_{1:t}) ), pi_t ∝ p0 psi_t^theta.

    Its gradient is EBM maximum likelihood at each t:
    -grad L = mean_t { E_sigma[grad log psi_t] - E_{pi_t}[grad log psi_t] }. One set of K
    twist-induced samples serves both expectations ("ebm_one_sample"): positives weighted by
    the final SIS weights for sigma (with the true phi), negatives by the SIS weights for
    pi_t (with the learned psi_t); both detached and renormalised among the sequences still
    running at t. At psi* the twisted proposal is sigma, both weight sets are uniform, and
    the gradient is exactly zero.

    ``positives``: samples of sigma drawn elsewhere (e.g. a replay pool of a large SMC run's
    resampled particles), weighted uniformly among those running at t; they replace the
    batch's SIS positives, which on a rare event hold few effective samples. The mean then runs
    over the steps where both sets have sequences. The negatives' weights are still
    self-normalised over the batch, biased at small batches; no longer cancelled by the same
    bias in the positives, it shows more at small batches.
    """
    negative = _expect(twist_weights_per_step(batch), batch.log_psi)
    if positives is None:
        positive, steps = _expect(sigma_weights_per_step(batch), batch.log_psi), batch.mask.any(0)
    else:
        positive, steps = uniform_term(positives)
        width = min(len(positive), len(negative))
        positive, negative = positive[:width], negative[:width]
        steps = steps[:width] & batch.mask.any(0)[:width]
    per_step = positive - negative
    return -per_step[steps].mean()


def uniform_term(positives: TwistBatch) -> tuple[Tensor, Tensor]:
    """Per step t, the mean log psi_t over the sequences of ``positives`` still running at t
    (samples of sigma weigh alike), and which steps have any, each (T,)."""
    uniform = masked_softmax(torch.zeros(positives.mask.shape, device=positives.mask.device), positives.mask)
    return _expect(uniform, positives.log_psi), positives.mask.any(0)


def _expect(weights: Tensor, log_psi: Tensor) -> Tensor:
    """sum_k weights[k, t] log psi[k, t] per t, where a sequence of weight 0 adds nothing even
    at log psi = -inf (a residual twist whose look-ahead rules the prefix out)."""
    return torch.where(weights > 0, weights * log_psi, 0.0).sum(0)
