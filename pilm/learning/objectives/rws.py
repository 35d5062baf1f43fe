"""Forward KL through self-normalised importance weights (RWS wake-phase q update; the DPG family)."""

from __future__ import annotations

import torch
from torch import Tensor

from .trajectory import PolicyBatch


def rws(batch: PolicyBatch) -> Tensor:
    """Minimises KL(sigma || q) = E_sigma[log sigma - log q]: gradient -E_sigma[grad log q],
    estimated with the samples from q and weights wbar_b ∝ R(z_b⊤) / q(z_b⊤) normalised
    over the batch (biased for finite B, consistent). Optimum q = sigma; mass-covering
    where reverse KL is mode-seeking. Needs on-policy samples."""
    w = torch.softmax((batch.log_r_final - batch.log_q_total).detach(), 0)
    return -(w * batch.log_q_total).sum()
