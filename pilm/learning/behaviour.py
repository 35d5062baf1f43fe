"""The behaviour policy of fine-tuning: which trajectories a micro-batch trains on.

On-policy draws, draws at a temperature ~ U[temperature_range], or replay from a
reward-prioritised, deduplicated buffer (Hu et al. 2024, GFlowNet fine-tuning); demonstrations seed
the buffers. Off-policy draws are only used by objectives valid on them (subtb, tb, sft).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor

from ..models.base import LanguageModel, Trainable
from ..target import Target
from .objectives import FinetuneObjective
from .replay import ReplayBuffer, Trajectory, replay_tensors
from .rewards import scored_batch
from .rollout import sample_trajectories, trajectory_lengths
from .tools import Tool, forced_mask

MODES = ("on-policy", "tempered", "replay")


def behaviour_batch(mode: str, policy: LanguageModel, target: Target, buffer: ReplayBuffer, n: int,
                    generator: torch.Generator, *, tau: float, temperature_range: tuple[float, float],
                    every_prefix: bool, min_log_reward: float, tool: Tool | None = None,
                    prompt_ids: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens (n, T), untempered log R (n, T+1) and the tool's tokens (n, T; all False without
    a tool) of one micro-batch drawn by ``mode``:
    "replay" (reward-prioritised at temperature ``tau``), "tempered" (the policy at a
    temperature ~ U[temperature_range]) or "on-policy". Fresh draws also enter ``buffer``."""
    if mode == "replay":
        tokens, log_r = replay_tensors(buffer.sample(n, generator, temperature=tau), target.max_new_tokens)
        return tokens, log_r, forced_mask(tokens, tool, target.stop_token_id)
    temperature = 1.0
    if mode == "tempered":
        lo, hi = temperature_range
        temperature = lo + (hi - lo) * float(torch.rand((), generator=generator, device=generator.device))
    cast(Trainable, policy).train(False)
    tokens = sample_trajectories(policy, target, n, generator, temperature, tool, prompt_ids)
    log_r, forced = scored_batch(target, tokens, tool, every_prefix, min_log_reward)
    remember(buffer, tokens, log_r, target.stop_token_id)
    return tokens, log_r, forced


def remember(buffer: ReplayBuffer, tokens: Tensor, log_r: Tensor, stop: int | None) -> None:
    """Add each trajectory (tokens and the log R of its n+1 states) to ``buffer``."""
    for row, r, length in zip(tokens.tolist(), log_r.tolist(), trajectory_lengths(tokens, stop).tolist(), strict=True):
        buffer.add(Trajectory(tuple(t for t in row if t >= 0), r[: length + 1]))


def demonstration_data(data, objective: str, n_targets: int) -> dict[int, Sequence[Sequence[int]]]:
    """``finetune(data=...)`` as {target index: token sequences}, checked."""
    demo_data = {} if not data else dict(data) if isinstance(data, Mapping) else {0: data}
    if objective == "sft" and not any(demo_data.values()):
        raise ValueError("objective='sft' trains on demonstrations: give data=[token sequences]")
    if any(not 0 <= k < n_targets for k in demo_data):
        raise ValueError(f"data keys are target indices in [0, {n_targets}), got {sorted(demo_data)}")
    return demo_data


def exploration(spec: FinetuneObjective, objective: str, explore) -> tuple[float, float, float]:
    if explore is None:
        return (0.25, 0.5, 0.25) if spec.off_policy else (1.0, 0.0, 0.0)
    explore = tuple(float(x) for x in explore)
    if len(explore) != 3 or min(explore) < 0 or not math.isclose(sum(explore), 1.0):
        raise ValueError(f"explore = (on-policy, tempered, replay) probabilities summing to 1, got {explore}")
    if not spec.off_policy and explore[0] < 1.0:
        raise ValueError(f"{objective} needs samples from the policy itself: tempered or replayed trajectories would "
                         "bias it (use explore=(1, 0, 0), or subtb/tb, which are valid off-policy)")
    return explore


def draw_mode(explore: tuple[float, float, float], generator: torch.Generator, can_replay: bool) -> str:
    probs = torch.tensor(explore if can_replay else (explore[0] + explore[2], explore[1], 0.0))
    return MODES[int(torch.multinomial(probs.to(generator.device), 1, generator=generator))]
