"""The tensors every twist objective reads, and the weights they share.

Shapes: K sampled sequences, T steps, V tokens. Position t (0-based) of row k holds the
step that drew ``tokens[k, t]`` from the prefix s_{<t+1}; ``mask`` marks real steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...proposals.weights import sequence_log_weight


@dataclass
class TwistBatch:
    """Sampled sequences with what the objectives need.

    ``log_psi_all[k, t, v]`` = log psi_{t+1}(s^k_{<t+1}, v) from the twist being trained
    (carries gradients); ``log_p0``/``log_q`` are per drawn token; ``log_phi`` per sequence;
    ``log_p0_all`` (only for objectives that need it) is log p0 of every next token.
    Objectives that read psi only at the drawn tokens (ctl, sixo, fudge) can be given
    ``log_psi_drawn`` (K, T) instead of ``log_psi_all``: a V-times smaller computation.
    ``log_psi_offset`` (K, T, no gradient) is added to psi at the drawn tokens: a residual
    twist's look-ahead a_t log L(s_{1:t}) (``pilm.twists.ResidualTwist``).
    """

    tokens: Tensor
    mask: Tensor
    log_p0: Tensor
    log_q: Tensor
    log_phi: Tensor
    log_psi_all: Tensor | None
    log_p0_all: Tensor | None = None
    log_psi_drawn: Tensor | None = None
    log_psi_offset: Tensor | None = None

    @property
    def log_psi(self) -> Tensor:
        """log psi_t(s_{1:t}) at the drawn tokens, (K, T), 0 at padding."""
        picked = self.log_psi_drawn
        if picked is None:
            assert self.log_psi_all is not None  # a batch carries one of the two
            picked = self.log_psi_all.gather(-1, self.tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if self.log_psi_offset is not None:
            picked = picked + self.log_psi_offset
        return picked.masked_fill(~self.mask, 0.0)

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)


def masked_softmax(log_w: Tensor, mask: Tensor, dim: int = 0) -> Tensor:
    """Softmax over ``dim`` among masked-in entries; all-out (or all -inf) slices give zeros."""
    log_w = log_w.masked_fill(~mask, -torch.inf)
    ok = torch.isfinite(log_w).any(dim, keepdim=True)
    return torch.where(ok, torch.softmax(torch.where(ok, log_w, 0.0), dim), 0.0).masked_fill(~mask, 0.0)


def sis_log_weights(batch: TwistBatch) -> Tensor:
    """log w^k = log p0(s^k) + log phi(s^k) - log q(s^k): the final importance weight of
    sequence k for sigma (detached; ``pilm.proposals.weights.sequence_log_weight``)."""
    return sequence_log_weight(batch.log_p0, batch.log_q, batch.mask, batch.log_phi).detach()


def sigma_weights(batch: TwistBatch) -> Tensor:
    """Self-normalised weights wbar_k ∝ w^k of the sequences as samples of sigma, (K,)."""
    return masked_softmax(sis_log_weights(batch), torch.ones_like(batch.log_phi, dtype=torch.bool))


def sigma_weights_per_step(batch: TwistBatch) -> Tensor:
    """wbar_k renormalised at each t among the sequences still running: (K, T)."""
    log_w = sis_log_weights(batch)[:, None].expand_as(batch.mask)
    return masked_softmax(log_w, batch.mask)


def twist_weights_per_step(batch: TwistBatch) -> Tensor:
    """Self-normalised SIS weights of truncated samples for pi_t ∝ p0 psi_t:
    w_t^k ∝ p0(s^k_{1:t}) psi_t(s^k_{1:t}) / q(s^k_{1:t}) with the learned psi (detached), (K, T)."""
    log_w = torch.cumsum((batch.log_p0 - batch.log_q) * batch.mask, 1) + batch.log_psi.detach()
    return masked_softmax(log_w, batch.mask)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, stable (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
