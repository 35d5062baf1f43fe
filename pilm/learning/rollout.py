"""Rollouts of a policy, and the per-step log-probabilities of trajectories.

A trajectory z = z_1..z_n ⊤ of the fine-tuning objectives is a completion followed by the
stop action ⊤ (the stop token, or nothing at the horizon T). ``sample_trajectories`` draws
them with the batched decode step every sampler shares; ``step_logprobs`` reads log p of
every drawn token and of stopping at every state off one teacher-forced forward, and
``policy_batch`` assembles the objectives' tensors from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..inference.particles import check_drawn, draw, to_host
from ..models.base import LanguageModel, decode_step
from ..proposals import BaseProposal
from ..target import Target
from .objectives import PolicyBatch
from .tools import Tool, tool_output


def sample_trajectories(policy: LanguageModel, target: Target, n: int, generator: torch.Generator,
                        temperature: float = 1.0, tool: Tool | None = None,
                        prompt_ids: Sequence[int] | None = None) -> Tensor:
    """n completions of ``target``'s prompt from ``policy`` at ``temperature`` (0: greedy),
    under no_grad with one batched forward per token and the KV cache (finished rows leave
    the batch), as a (n, T) tensor right-padded with -1. Each ends at the target's stop
    token (EOS by default) or at the horizon T. With a ``tool``, a row takes the tokens the
    tool appends before drawing again (see ``pilm.learning.tools``). ``prompt_ids``: the
    policy's own prompt, if not the target's (an amortised policy told what to condition on)."""
    with torch.no_grad():
        state = policy.start(target.prompt_ids if prompt_ids is None else prompt_ids, n)
        return _decode(policy, state, target.max_new_tokens, target.stop_token_id, generator, temperature, tool)


def sample_many(policy: LanguageModel, prompts: Sequence[Sequence[int]], n: int, generator: torch.Generator, *,
                horizon: int, stop: int | None, temperature: float = 1.0) -> Tensor:
    """n completions of each prompt (rows prompt-major: prompt i's are rows i*n .. i*n+n-1),
    all in one batched decode (prompts of different lengths left-padded), each ending at
    ``stop`` or at ``horizon``: a (len(prompts) * n, horizon) tensor right-padded with -1."""
    with torch.no_grad():
        return _decode(policy, policy.start_many(prompts, n), horizon, stop, generator, temperature, None)


def _decode(policy: LanguageModel, state, horizon: int, eos: int | None, generator: torch.Generator,
            temperature: float, tool: Tool | None) -> Tensor:
    proposal = BaseProposal(temperature)
    n = state.n
    tokens = torch.full((n, horizon), -1, dtype=torch.long)
    rows = torch.arange(n)
    pending: list[list[int]] = [[] for _ in range(n)]
    for t in range(horizon):
        log_q = proposal.propose(state, None).log_q
        on_device = draw(log_q, rows, [generator])
        drawn, read = to_host(on_device, {"lq": log_q.gather(1, on_device.unsqueeze(1)).squeeze(1)})
        check_drawn(rows, read["lq"])  # a policy whose log-probs went NaN stops here
        if tool is not None:
            for j, r in enumerate(rows.tolist()):
                if pending[r]:
                    drawn[j] = pending[r].pop(0)
                elif int(drawn[j]) != eos:
                    pending[r] = tool_output(tool, tokens[r, :t].tolist() + [int(drawn[j])], eos)
        tokens[rows, t] = drawn
        going = drawn != eos if eos is not None else torch.ones_like(drawn, dtype=torch.bool)
        if t + 1 == horizon or not going.any():
            break
        keep = going.nonzero().squeeze(1)
        rows = rows[keep]
        state = decode_step(policy, state, keep, drawn[keep])
    return tokens


def trajectory_lengths(tokens: Tensor, eos: int | None) -> Tensor:
    """n = number of tokens before the stop action: before the EOS, or all of them."""
    real = tokens >= 0
    stop = (tokens == eos) if eos is not None else torch.zeros_like(real)
    return real.sum(1) - stop.sum(1)


def step_logprobs(lp: Tensor, tokens: Tensor, lengths: Tensor, stop_id: int | None) -> tuple[Tensor, Tensor]:
    """From log p(. | x, z_{1:i}), (B, T+1, V): log p of each drawn token before the stop,
    (B, T), and of the stop token at each state i <= n, (B, T+1); 0 elsewhere and at i = T
    (the horizon stops with probability 1)."""
    horizon, tokens, lengths = tokens.shape[1], tokens.to(lp.device), lengths.to(lp.device)
    steps = torch.arange(horizon, device=lp.device)[None, :] < lengths[:, None]
    tok = lp[:, :horizon].gather(2, tokens.clamp(min=0)[..., None]).squeeze(2).masked_fill(~steps, 0.0)
    stop = torch.zeros_like(lp[..., 0])
    if stop_id is not None:
        stop = torch.cat([lp[:, :horizon, stop_id], torch.zeros_like(lp[:, :1, 0])], 1)
    states = torch.arange(horizon + 1, device=lp.device)[None, :] <= lengths[:, None]
    return tok, stop.masked_fill(~states, 0.0)


def policy_batch(policy: LanguageModel, target: Target, tokens: Tensor, log_r: Tensor,
                 log_z: Tensor | None = None, forced: Tensor | None = None,
                 prompt_ids: Sequence[int] | None = None) -> PolicyBatch:
    """Assemble the objectives' tensors: log q of the policy given ``prompt_ids`` (default:
    the target's prompt), with gradients, from one forward; tokens a tool appended
    (``forced``, (B, T)) are not the policy's and count 0 in log q."""
    eos, horizon = target.stop_token_id, target.max_new_tokens
    n = trajectory_lengths(tokens, eos)
    prompt = target.prompt_ids if prompt_ids is None else prompt_ids
    log_q, log_stop = step_logprobs(policy.prefix_logprobs(prompt, tokens), tokens, n, eos)
    device = log_q.device  # the policy's: the rewards and masks join it there
    if forced is not None:
        log_q = log_q.masked_fill(forced.to(device), 0.0)
    states = torch.arange(horizon + 1, device=device)[None, :] <= n.to(device)[:, None]
    return PolicyBatch(log_q, log_stop, log_r.to(device).float().masked_fill(~states, 0.0), states, log_z)
