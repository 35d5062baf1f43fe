"""A process reward from a Python function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .base import PRMError, ProcessReward, StepBatch


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
        wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
        if wrong:
            bad = wrong[0]
            raise PRMError(f"process reward {self.name} returned {bad!r} ({type(bad).__name__}); "
                           "its function must return a probability (a float in [0, 1])")
        return torch.tensor([float(v) for v in values], dtype=torch.float64)
