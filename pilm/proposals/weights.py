"""The weight formulas every sampler, bound and objective takes from here.

SMC at step t targets pi_t(s_{1:t}) ∝ p0(s_{1:t}) psi_t(s_{1:t}). A row that draws s_t from
the proposal q gets the incremental weight

    alpha_t = p0(s_t | s_{<t}) psi_t(s_{1:t}) / ( psi_{t-1}(s_{<t}) q(s_t | s_{<t}) ),

and the twist-induced proposal is q(v | s_{<t}) ∝ p0(v | s_{<t}) psi_t(s_{<t}, v)^beta; with
beta = 1 its alpha_t = sum_v p0(v) psi_t(s_{<t}, v) / psi_{t-1} does not depend on the drawn
token (Zhao et al. 2024, Twisted SMC). Without resampling the product of the alpha_t
telescopes to the importance weight w = p0(s) phi(s) / q(s) of the whole sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def incremental_log_weight(log_p0: Tensor, log_psi_new: Tensor, log_psi_prev: Tensor, log_q: Tensor) -> Tensor:
    """log alpha_t = log p0(s_t | s_{<t}) + log psi_t(s_{1:t}) - log psi_{t-1}(s_{<t}) - log q(s_t | s_{<t}).

    A row already at weight 0 (psi_{t-1} = 0) stays at 0 instead of becoming NaN.
    """
    incr = log_p0.double() + log_psi_new.double() - log_psi_prev.double() - log_q.double()
    return torch.where(torch.isneginf(log_psi_prev), torch.zeros_like(incr), incr)


def twisted_log_q(log_p0: Tensor, log_psi: Tensor | None, beta: float = 1.0) -> Tensor:
    """log q(v | s_{<t}) ∝ log p0(v | s_{<t}) + beta log psi_t(s_{<t}, v), normalised over v
    (rows where every token has psi = 0 fall back to p0: their weight is 0 anyway)."""
    if log_psi is None or beta == 0:
        return log_p0
    logits = log_p0 + beta * log_psi
    dead = torch.isneginf(logits.amax(-1, keepdim=True))  # NaN or +inf is not dead: its NaN log q is refused later
    return torch.where(dead, log_p0, torch.log_softmax(logits, dim=-1))


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/K) sum_k exp(log_w_k), in float64: one epoch's factor of log Z-hat (-inf if every
    weight is 0)."""
    log_w = log_w.double()
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def sequence_log_weight(log_p0: Tensor, log_q: Tensor, mask: Tensor, log_phi: Tensor) -> Tensor:
    """log w = sum_t [log p0(s_t | s_{<t}) - log q(s_t | s_{<t})] + log phi(s): the importance
    weight of whole sequences for sigma, from per-step (K, T) tensors (``mask``: real steps)."""
    return ((log_p0 - log_q) * mask).sum(-1) + log_phi
