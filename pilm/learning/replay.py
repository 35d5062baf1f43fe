"""A reward-prioritised replay buffer with deduplication (Hu et al. 2024, GFlowNet fine-tuning)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Trajectory:
    """A stored trajectory: its tokens and the *untempered* log R of each prefix (a list of
    n+1 values, the last being log R of the whole; re-tempered when replayed)."""

    tokens: tuple[int, ...]
    log_r: list[float]

    @property
    def reward(self) -> float:
        return self.log_r[-1]


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


class ReplayBuffer:
    """Keeps the ``capacity`` highest-reward distinct trajectories.

    A new trajectory within ``tolerance`` x its length (edit distance) of a stored one is a
    near-duplicate: it replaces that one if its reward is higher and is dropped otherwise
    (``tolerance=0``: only exact duplicates). ``sample`` draws with replacement from
    softmax(log R / temperature) over the stored rewards (reward-prioritised replay).
    """

    def __init__(self, capacity: int = 50, tolerance: float = 0.25):
        if capacity < 1:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        self.capacity, self.tolerance = capacity, tolerance
        self.items: list[Trajectory] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Trajectory) -> None:
        for i, old in enumerate(self.items):
            if old.tokens == item.tokens or (
                self.tolerance > 0 and edit_distance(old.tokens, item.tokens) < self.tolerance * max(len(item.tokens), 1)
            ):
                if item.reward > old.reward:
                    self.items[i] = item
                return
        self.items.append(item)
        if len(self.items) > self.capacity:
            self.items.remove(min(self.items, key=lambda t: t.reward))

    def sample(self, n: int, generator: torch.Generator, temperature: float = 1.0) -> list[Trajectory]:
        if not self.items:
            raise ValueError("the replay buffer is empty")
        logits = torch.tensor([t.reward for t in self.items], dtype=torch.float64) / temperature
        idx = torch.multinomial(torch.softmax(logits, 0).to(generator.device), n, replacement=True, generator=generator).cpu()
        return [self.items[i] for i in idx.tolist()]

    def state(self) -> list[dict]:
        return [{"tokens": list(t.tokens), "log_r": t.log_r} for t in self.items]

    @classmethod
    def from_state(cls, state: list[dict], capacity: int, tolerance: float) -> ReplayBuffer:
        buf = cls(capacity, tolerance)
        buf.items = [Trajectory(tuple(d["tokens"]), list(d["log_r"])) for d in state]
        return buf


def pad(rows: Sequence[Sequence[int]], width: int) -> Tensor:
    """Token rows right-padded with -1 to ``width``, (B, width)."""
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def replay_tensors(items: Sequence[Trajectory], horizon: int) -> tuple[Tensor, Tensor]:
    """Stored trajectories as tokens (B, horizon), -1-padded, and log R (B, horizon+1), -inf-padded."""
    log_r = torch.full((len(items), horizon + 1), -torch.inf, dtype=torch.float64)
    for row, it in enumerate(items):
        log_r[row, : len(it.log_r)] = torch.tensor(it.log_r, dtype=torch.float64)
    return pad([it.tokens for it in items], horizon), log_r
