"""DPG-style forward KL to the twist-induced proposal (a twist-learning baseline in Zhao et al. 2024)."""

import torch
from torch import Tensor

from .batch import TwistBatch, sigma_weights


def dpg(batch: TwistBatch, base: TwistBatch | None = None) -> Tensor:
    """L = KL(sigma || q^psi) + const = -E_sigma[ sum_t log q^psi(s_t | s_{<t}) ], with
    q^psi(v | s_{<t}) = softmax_v(log p0 + log psi_t). Its gradient
    E_sigma[ grad log psi_t(s_{1:t}) - sum_v q^psi(v | s_{<t}) grad log psi_t(s_{<t}, v) ]
    takes the inner expectation exactly over the vocabulary. sigma is approximated by the
    SIS-weighted twisted samples. Zero in expectation at psi*, where q^psi = sigma."""
    if batch.log_p0_all is None:
        raise ValueError("the dpg objective needs log p0 of every token (log_p0_all)")
    assert batch.log_psi_all is not None  # the trainer scores every token for dpg
    log_q = torch.log_softmax(batch.log_p0_all + batch.log_psi_all, -1)
    picked = log_q.gather(-1, batch.tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_sequence = (picked * batch.mask).sum(1)
    return -(sigma_weights(batch) * per_sequence).sum()
