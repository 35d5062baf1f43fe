"""Enumerating every completion of a target: log p0, log phi and (optionally) log q of each.

The tree of completions is expanded level by level through the model protocol (one
batched forward per level), so it works for tabular models and for transformers models
with very short horizons alike. A target with ``steps`` (``pilm.steps.Steps``) also ends a
completion where a step-level sampler ends its chain: after ``max_steps`` steps (a step cut
at ``max_step_tokens`` counts) or at a step that states the final answer. Zero-probability branches are pruned. It refuses, before
computing anything more, once the count of sequences would pass ``max_sequences`` or the
prefixes of the next level would not fit the device's memory (``LanguageModel.max_rows``).
``sequence_bound`` bounds the count before anything runs: sum_{t=1..T} V^t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .errors import TooLargeError
from .models.base import decode_step
from .target import Target

MAX_SEQUENCES = 2_000_000
_POTENTIAL_BATCH = 4096


def sequence_bound(target: Target) -> int:
    """An upper bound on the completions of ``target``, known before any forward:
    sum_{t=1..T} V^t (every token allowed at every step; pruning can only lower it)."""
    v, horizon = target.model.vocab_size, target.max_new_tokens
    return sum(v**t for t in range(1, horizon + 1))


@dataclass
class Enumeration:
    """Every completion with log p0(s | x) and log phi(s) (float64)."""

    tokens: list[tuple[int, ...]]
    log_p0: Tensor
    log_phi: Tensor
    log_q: Tensor | None = None  # log q(s) of the proposal enumerated alongside, if any

    @property
    def log_sigma_unnormalized(self) -> Tensor:
        return self.log_p0 + self.log_phi

    @property
    def log_z(self) -> float:
        return float(torch.logsumexp(self.log_sigma_unnormalized, 0))

    @property
    def log_sigma(self) -> Tensor:
        """log sigma(s) for every enumerated s."""
        return self.log_sigma_unnormalized - self.log_z

    def kl_sigma_q(self) -> float:
        """KL(sigma || q) = sum_s sigma(s) [log sigma(s) - log q(s)] (inclusive; +inf if q
        misses part of sigma's support)."""
        sigma = torch.exp(self.log_sigma)
        on = sigma > 0
        return float((sigma[on] * (self.log_sigma[on] - cast(Tensor, self.log_q)[on])).sum())  # q was enumerated

    def kl_q_sigma(self) -> float:
        """KL(q || sigma) = sum_s q(s) [log q(s) - log sigma(s)] (exclusive; mode-seeking)."""
        log_q = cast(Tensor, self.log_q)  # q was enumerated alongside
        q = torch.exp(log_q)
        on = q > 0
        return float((q[on] * (log_q[on] - self.log_sigma[on])).sum())


def enumerate_target(target: Target, *, proposal=None, max_sequences: int = MAX_SEQUENCES) -> Enumeration:
    """All completions of ``target`` with their log p0 and log phi (see module docstring);
    with ``proposal`` (a ``pilm.proposals.Proposal``, stepped like a sampler steps it), also
    log q(s) of that proposal (``pilm.exact.enumerate_target(twist=...)`` builds the
    twist-induced one that ``pilm.smc(..., twist=twist)`` samples from)."""
    model, horizon, eos = target.model, target.max_new_tokens, target.stop_token_id
    fit = model.max_rows(len(target.prompt_ids) + horizon + 1)
    state = model.start(target.prompt_ids, 1)
    if proposal is not None:
        proposal.begin([target], 1)
    prefixes: list[tuple[int, ...]] = [()]
    prefix_lp = torch.zeros(1, dtype=torch.float64)
    prefix_lq = torch.zeros(1, dtype=torch.float64)
    done_tokens: list[tuple[int, ...]] = []
    done_lp: list[Tensor] = []
    done_lq: list[Tensor] = []
    for t in range(1, horizon + 1):
        lp = prefix_lp[:, None] + state.logprobs.double().cpu()
        if proposal is not None:
            with torch.no_grad():
                log_q = proposal.propose(state, prefixes if proposal.needs_prefixes else None).log_q
            lq = prefix_lq[:, None] + log_q.double().cpu()
        parent, token = torch.isfinite(lp).nonzero(as_tuple=True)
        if len(done_tokens) + len(parent) > max_sequences:
            raise TooLargeError(
                f"exact enumeration of {target.model.name} with max_new_tokens={horizon} reaches more than "
                f"{max_sequences:,} sequences at step {t} ({len(done_tokens) + len(parent):,}); "
                "use a smaller vocabulary or horizon, or raise max_sequences"
            )
        finished = token == eos if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        if t == horizon:
            finished[:] = True
        par, tok = parent.tolist(), token.tolist()
        if target.steps is not None:  # the step rules end a chain too (Target.is_complete, as the samplers)
            finished |= torch.tensor([not done and target.is_complete(prefixes[p] + (v,))
                                      for p, v, done in zip(par, tok, finished.tolist(), strict=True)], dtype=torch.bool)
        for i in finished.nonzero().squeeze(1).tolist():
            done_tokens.append(prefixes[par[i]] + (tok[i],))
        done_lp.append(lp[parent[finished], token[finished]])
        if proposal is not None:
            done_lq.append(lq[parent[finished], token[finished]])
        keep = ~finished
        if not keep.any():
            break
        if fit is not None and int(keep.sum()) > fit:
            raise TooLargeError(
                f"exact enumeration of {target.model.name} would advance {int(keep.sum()):,} prefixes at step {t + 1}; "
                f"at most {fit:,} fit in the device's memory: use a smaller vocabulary or horizon"
            )
        prefixes = [prefixes[par[i]] + (tok[i],) for i in keep.nonzero().squeeze(1).tolist()]
        prefix_lp = lp[parent[keep], token[keep]]
        if proposal is not None:
            prefix_lq = lq[parent[keep], token[keep]]
        state = decode_step(model, state, parent[keep], token[keep], *([proposal] if proposal is not None else []))
    log_phi = torch.cat([target.log_potential(done_tokens[i : i + _POTENTIAL_BATCH]).double()
                         for i in range(0, len(done_tokens), _POTENTIAL_BATCH)])
    return Enumeration(done_tokens, torch.cat(done_lp), log_phi, torch.cat(done_lq) if proposal is not None else None)
