"""The particle engine's host work per step, the model's forward stubbed out.

A stub model returns one fixed row of log-probabilities for every row, with no forward at
all, over a vocabulary of 256 tokens: what is timed is the sampler's own work per step (the
draw, the weights, the rule of each target, the row map and the bookkeeping), not the
vocabulary-sized arithmetic that runs on the device with a real model (on this CPU, the exp and
multinomial over 64 x 49,152 probabilities alone take ~70 ms a step). Timed at two horizons:
it must not grow with the sequence length.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.base import LanguageModel, ModelState
from ..models.device import seeded_generator


class StubModel(LanguageModel):
    """Every row's next-token distribution is one fixed random row (no forward)."""

    name = "stub"
    eos_token_id = None

    def __init__(self, vocab_size: int = 256, hidden: int = 576):
        self.vocab_size = vocab_size
        g = seeded_generator(0, "cpu")  # the stub computes on the CPU
        self._row = torch.log_softmax(torch.randn(vocab_size, generator=g), -1)
        self._hidden = torch.zeros(hidden)

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + int(i) % 90) for i in ids)

    def _state(self, n: int, length: int) -> ModelState:
        return ModelState(self._row.expand(n, -1), self._hidden.expand(n, -1), None, length)

    def start(self, prompt_ids, n: int) -> ModelState:
        return self._state(n, len(prompt_ids))

    def start_many(self, prompts: Sequence, n: int) -> ModelState:
        return self._state(n * len(prompts), len(prompts[0]))

    def advance(self, state: ModelState, tokens: Tensor, hold: Tensor | None = None) -> ModelState:
        return self._state(len(tokens), state.length + 1)

    def reindex(self, state: ModelState, idx: Tensor) -> ModelState:
        return self._state(len(idx), state.length)

    def score(self, sequences, starts) -> Tensor:
        return torch.zeros(len(sequences))


def host_ms_per_step(m: int, n: int, horizon: int, repeats: int = 3) -> float:
    """Milliseconds of host work per step of SMC (resampling at every step, no potential) on
    ``m`` targets x ``n`` particles, the best of ``repeats``."""
    from .. import smc
    from ..target import Target

    model = StubModel()
    targets = [Target(model, [1, 2, 3], max_new_tokens=horizon) for _ in range(m)]
    best = float("inf")
    for r in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        smc(targets if m > 1 else targets[0], n, ess_threshold=1.0, seed=r, progress=False)
        if r:
            best = min(best, (time.perf_counter() - t0) / horizon)
    return 1e3 * best


def host_work(short: int = 16, long: int = 64) -> dict:
    """The bench leg: host ms per step for 64 particles and for 16 targets x 64 at ``short``
    tokens, and how much it grows at ``long`` tokens (a ratio: 1 is flat)."""
    out = {}
    for m in (1, 16):
        at_short, at_long = host_ms_per_step(m, 64, short), host_ms_per_step(m, 64, long)
        out[f"host_ms_per_step_{m}x64"] = at_short
        out[f"host_growth_{m}x64"] = at_long / at_short
    return out
