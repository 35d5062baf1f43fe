"""Exact answers by enumerating every completion: log Z, sigma, exact samples, KL.

See ``pilm.enumeration`` for how the tree is expanded and when it refuses.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import enumeration
from ..enumeration import MAX_SEQUENCES, Enumeration
from ..models.device import seeded_generator
from ..proposals import Proposal, TwistProposal
from ..target import Target
from ..twists.base import TwistFunction

__all__ = ["MAX_SEQUENCES", "Enumeration", "distribution", "enumerate_sampler", "enumerate_target", "log_z", "sample"]


def enumerate_target(target: Target, *, twist: TwistFunction | None = None, proposal_beta: float = 1.0,
                     proposal: Proposal | None = None, max_sequences: int = MAX_SEQUENCES) -> Enumeration:
    """Every completion of ``target`` with log p0 and log phi; with ``twist``, also log q(s) of
    the twist-induced proposal q ∝ p0 psi^proposal_beta that ``pilm.smc(..., twist=twist)``
    samples from (or of any ``proposal``), so ``kl_q_sigma()`` and ``kl_sigma_q()`` are exact."""
    if twist is not None:
        if proposal is not None:
            raise ValueError("give either a twist or a proposal, not both")
        proposal = TwistProposal(twist, proposal_beta)
    return enumeration.enumerate_target(target, proposal=proposal, max_sequences=max_sequences)


def log_z(target: Target, *, max_sequences: int = MAX_SEQUENCES) -> float:
    """log Z = log sum_s p0(s | x) phi(s), exactly."""
    return enumerate_target(target, max_sequences=max_sequences).log_z


def distribution(target: Target, *, max_sequences: int = MAX_SEQUENCES) -> dict[tuple[int, ...], float]:
    """sigma(s) for every completion s with sigma(s) > 0, keyed by token ids (EOS kept)."""
    e = enumerate_target(target, max_sequences=max_sequences)
    probs = torch.exp(e.log_sigma)
    return {s: float(p) for s, p in zip(e.tokens, probs) if p > 0}


def sample(target: Target, n: int, *, seed: int = 0, max_sequences: int = MAX_SEQUENCES) -> list[tuple[int, ...]]:
    """n exact i.i.d. draws from sigma, by enumeration."""
    e = enumerate_target(target, max_sequences=max_sequences)
    g = seeded_generator(seed, e.log_sigma.device)  # on the device of the tensor it draws from
    idx = torch.multinomial(torch.exp(e.log_sigma), n, replacement=True, generator=g)
    return [e.tokens[i] for i in idx.tolist()]


def enumerate_sampler(target: Target, sampler, *, max_sequences: int = MAX_SEQUENCES) -> Enumeration:
    """The enumeration of ``target`` with log q(s) of a model ``sampler`` (e.g. a fine-tuned
    policy, generating with the target's stopping rule) filled in, so
    ``kl_q_sigma()`` and ``kl_sigma_q()`` are exact."""
    e = enumerate_target(target, max_sequences=max_sequences)
    with torch.no_grad():
        log_q = sampler.log_prob(target.prompt_ids, e.tokens).double()
    return dataclasses.replace(e, log_q=log_q)
