"""SIXO: twists by density-ratio estimation (Lawson et al. 2022; a twist-learning baseline in Zhao et al. 2024)."""

from torch import Tensor
from torch.nn.functional import logsigmoid

from .batch import TwistBatch, sigma_weights


def _per_sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


def sixo(batch: TwistBatch, base: TwistBatch | None = None) -> Tensor:
    """Logistic classification of prefixes with logit log psi_t:
    L = -[ sum_k wbar_k mean_t log s(log psi_t(s^k_{1:t})) + mean_j mean_t log s(-log psi_t(s'^j_{1:t})) ]
    with s^k approximate sigma samples (twisted, SIS-weighted) and s'^j independent p0
    samples (``base``). The optimum is psi_t = sigma(s_{1:t}) / p0(s_{1:t}) = psi*_t / Z,
    psi* up to a constant, which leaves twisted SMC unchanged."""
    if base is None:
        raise ValueError("the sixo objective needs base-model samples (base)")
    w = sigma_weights(batch)
    positive = (w * _per_sequence_mean(logsigmoid(batch.log_psi), batch.mask)).sum()
    negative = _per_sequence_mean(logsigmoid(-base.log_psi), base.mask).mean()
    return -(positive + negative)
