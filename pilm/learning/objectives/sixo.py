"""SIXO: twists by density-ratio estimation (Lawson et al. 2022; a twist-learning baseline in Zhao et al. 2024)."""

from torch import Tensor
from torch.nn.functional import logsigmoid

from .batch import TwistBatch, sigma_weights


def sixo(batch: TwistBatch, base: TwistBatch | None = None) -> Tensor:
    """Logistic classification of prefixes with logit log psi_t:
    L = -[ sum_k wbar_k sum_t log s(log psi_t(s^k_{1:t})) + mean_j sum_t log s(-log psi_t(s'^j_{1:t})) ]
    with s^k approximate sigma samples (twisted, SIS-weighted) and s'^j independent p0
    samples (``base``). The optimum is psi_t = sigma(s_{1:t}) / p0(s_{1:t}) = psi*_t / Z,
    psi* up to a constant, which leaves twisted SMC unchanged. The sum over t is a sum, not
    a per-sequence mean: where sequences end at EOS, weighing each prefix by 1 / (its
    sequence's length) would weigh it by its future and move the optimum."""
    if base is None:
        raise ValueError("the sixo objective needs base-model samples (base)")
    w = sigma_weights(batch)
    positive = (w * (logsigmoid(batch.log_psi) * batch.mask).sum(1)).sum()
    negative = (logsigmoid(-base.log_psi) * base.mask).sum(1).mean()
    return -(positive + negative)
