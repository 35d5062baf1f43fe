"""One fine-tuning step's work: draw a micro-batch for a target (demonstrations, or the
behaviour policy's mode) and score it with the objective, back-propagated; and the step's
summary record. ``finetune`` (``policy_trainer``) runs the loop around it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..models.base import LanguageModel, Trainable
from ..target import Target
from .behaviour import behaviour_batch, draw_mode
from .log_z import LogZ
from .objectives import FinetuneObjective
from .replay import ReplayBuffer
from .rollout import policy_batch
from .tools import Tool


@dataclass
class Micro:
    """One micro-batch: what was drawn and how, and its loss and mean untempered log R."""

    tokens: Tensor
    mode: str
    loss: float
    log_r: float


@dataclass
class PolicyRun:
    """What a step draws from and scores with."""

    objective: str
    spec: FinetuneObjective
    policy: LanguageModel
    log_z: LogZ
    targets: list[Target]
    prompts: Sequence[Sequence[int]]
    buffers: list[ReplayBuffer]
    demos: dict[int, tuple[Tensor, Tensor, Tensor]]
    generator: torch.Generator
    explore: tuple[float, float, float]
    batch_size: int
    tool: Tool | None
    temperature_range: tuple[float, float]
    min_log_reward: float
    seed: int
    process: int

    def draw(self, k: int, tau: float) -> tuple[str, Tensor, Tensor, Tensor]:
        """Tokens, untempered log R and tool mask of one micro-batch for target k, and how
        they were drawn (demonstrations for sft, else the behaviour policy's mode)."""
        mode = "data" if self.objective == "sft" else draw_mode(self.explore, self.generator, len(self.buffers[k]) > 0)
        if mode == "data":  # supervised: demonstrations drawn uniformly
            pick = torch.randint(len(self.demos[k][0]), (self.batch_size,), generator=self.generator,
                                 device=self.generator.device).cpu()
            return cast("tuple[str, Tensor, Tensor, Tensor]", (mode, *(x[pick] for x in self.demos[k])))
        return (mode, *behaviour_batch(
            mode, self.policy, self.targets[k], self.buffers[k], self.batch_size, self.generator, tau=tau,
            tool=self.tool, prompt_ids=self.prompts[k], temperature_range=self.temperature_range,
            every_prefix=self.spec.prefix_rewards, min_log_reward=self.min_log_reward))

    def score(self, drawn, k: int, tau: float, step: int, micro: int, grad_accum: int) -> Micro:
        """The objective's loss on a drawn micro-batch, back-propagated (scaled for accumulation)."""
        mode, tokens, log_r, forced = drawn
        target, prompt, spec = self.targets[k], self.prompts[k], self.spec
        cast(Trainable, self.policy).train(True)
        with torch.random.fork_rng():  # adapter dropout: seeded per micro-batch, so resume is exact
            torch.manual_seed(hash((self.seed, self.process, step, micro)) % 2**62)
            z = self.log_z(target, prompt) if spec.learns_log_z else None
            batch = policy_batch(self.policy, target, tokens, log_r / tau, z, forced, prompt)
            if spec.learns_log_z and step == 0 and micro == 0:
                batch.log_z = self.log_z.start_at_estimate(batch, target, prompt)
            loss = spec.loss(batch)
            (loss / grad_accum).backward()
        cast(Trainable, self.policy).train(False)
        return Micro(tokens, mode, loss.item(), float(batch.log_r_final.mean()) * tau)


def summary(micro: list[Micro]) -> dict:
    n = len(micro)
    return {"loss": sum(m.loss for m in micro) / n, "log_r": sum(m.log_r for m in micro) / n,
            "diversity": sum(len({tuple(r) for r in m.tokens.tolist()}) / len(m.tokens) for m in micro) / n,
            "tokens": sum(int((m.tokens >= 0).sum()) for m in micro), "modes": [m.mode for m in micro]}
