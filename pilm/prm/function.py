"""A process reward from a Python function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .base import ProcessReward, StepBatch


class FunctionPRM(ProcessReward):
    """r = fn(question, steps) with ``on="text"`` (the question and the step texts so far),
    or r = fn(prompt_ids, tokens) with ``on="tokens"``; ``fn`` returns a probability."""

    def __init__(self, fn: Callable[..., float], on: Literal["text", "tokens"] = "text", name: str | None = None):
        super().__init__()
        if on not in ("text", "tokens"):
            raise ValueError(f"on must be 'text' or 'tokens', got {on!r}")
        self.fn, self.on = fn, on
        self._name = name or getattr(fn, "__name__", "function")

    @property
    def name(self) -> str:
        return f"FunctionPRM({self._name})"

    def score(self, batch: StepBatch) -> Tensor:
        if self.on == "text":
            values = [self.fn(q, s) for q, s in zip(batch.questions, batch.steps, strict=True)]
        else:
            values = [self.fn(p, t) for p, t in zip(batch.prompts, batch.tokens, strict=True)]
        return torch.tensor([float(v) for v in values], dtype=torch.float64)
