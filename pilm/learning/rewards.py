"""Rewards of trajectories: log R(z_{1:i} ⊤) = log p0(z_{1:i} ⊤ | x) + log phi(z_{1:i} ⊤).

p0, and any power of it among phi's factors, comes from one teacher-forced forward; the
other factors from one batched call of the potential on every distinct prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..potentials import ModelLikelihood
from ..potentials.base import Potential, Product, evaluate
from ..target import Target
from .replay import pad
from .rollout import step_logprobs, trajectory_lengths
from .tools import Tool, forced_mask


def split_likelihood(target: Target) -> tuple[float, Potential | None]:
    """phi = p0(s | x)^power · rest: the total power of the target model's own likelihood
    among phi's factors (``ModelLikelihood``, through products and tempering), which the
    teacher-forced forward giving p0 already scores, and the product of the other factors
    (None if none)."""
    own, rest = 0.0, []
    for f, e in ([] if target.potential is None else target.potential.factors()):
        if isinstance(f, ModelLikelihood) and f.model is target.model:
            own += e * f.power
        else:
            rest.append(f if e == 1.0 else f ** e)
    return own, (None if not rest else rest[0] if len(rest) == 1 else Product(*rest))


def prefix_log_rewards(target: Target, tokens: Tensor, *, every_prefix: bool, forced: Tensor | None = None,
                       floor: float = -math.inf) -> Tensor:
    """log R(z_{1:i}⊤) = log p0(z_{1:i} ⊤ | x) + log phi(z_{1:i} ⊤), (B, T+1), where ⊤ is the
    EOS token for i < T and nothing at i = T (the horizon). p0, and any power of it among
    phi's factors (tempering, or cancelling it as in the random-number task), comes from one
    teacher-forced forward; the other factors of phi from one batched call on every prefix
    (or only on each final sequence, other entries -inf, when ``every_prefix`` is False).
    A state followed by a tool's token (``forced``, (B, T)) is not terminable: -inf.

    At each trajectory's final state the other factors' log phi is floored at ``floor``
    (log p0 is not): R = p0 · max(phi, e^floor) there, a proper target (see ``finetune``)."""
    model, eos, horizon = target.model, target.stop_token_id, target.max_new_tokens
    b = len(tokens)
    n = trajectory_lengths(tokens, eos)
    with torch.no_grad():
        tok, stop = (x.cpu() for x in step_logprobs(model.prefix_logprobs(target.prompt_ids, tokens), tokens, n, eos))
    cum = torch.cat([torch.zeros(b, 1), torch.cumsum(tok, 1)], 1).double()  # log p0(z_{1:i})
    stop = stop.double()
    out = torch.full((b, horizon + 1), -math.inf, dtype=torch.float64)
    rows, lengths = tokens.tolist(), n.tolist()
    which = [(k, i) for k in range(b) for i in (range(lengths[k] + 1) if every_prefix else [lengths[k]])]
    if eos is None and every_prefix:
        which = [(k, i) for k, i in which if i == horizon]  # without EOS only the horizon stops
    if forced is not None:
        tool_next = forced.tolist()
        which = [(k, i) for k, i in which if i == lengths[k] or not tool_next[k][i]]
    seqs = [rows[k][:i] + ([eos] if i < horizon else []) for k, i in which]
    power, rest = split_likelihood(target)
    unique = list(dict.fromkeys(map(tuple, seqs)))  # trajectories share prefixes: score each once
    log_rest = dict.fromkeys(unique, 0.0)
    if rest is not None and unique:
        log_rest = dict(zip(unique, evaluate(rest, target.sequences(unique), final=True).double().tolist()))
    for (k, i), s in zip(which, seqs, strict=True):
        rest_k = max(log_rest[tuple(s)], floor) if i == lengths[k] else log_rest[tuple(s)]
        out[k, i] = (1.0 + power) * (cum[k, i] + stop[k, i]) + rest_k
    return out


def scored_batch(target: Target, tokens: Tensor, tool: Tool | None, every_prefix: bool,
                 min_log_reward: float) -> tuple[Tensor, Tensor]:
    """The untempered log R of ``tokens`` (B, T+1), log phi floored at each one's end, and
    which tokens the tool appended (B, T)."""
    forced = forced_mask(tokens, tool, target.stop_token_id)
    return prefix_log_rewards(target, tokens, every_prefix=every_prefix, forced=forced, floor=min_log_reward), forced


def scored_demonstrations(target: Target, rows: Sequence[Sequence[int]], tool: Tool | None, every_prefix: bool,
                           min_log_reward: float) -> tuple[Tensor, Tensor, Tensor]:
    """Demonstrations as padded tokens (cut at the horizon), their log R and tool mask."""
    tokens = pad([list(d)[: target.max_new_tokens] for d in rows], target.max_new_tokens)
    return (tokens, *scored_batch(target, tokens, tool, every_prefix, min_log_reward))
