"""Run records: what a sampler returns, serialisable to JSONL."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .resampling import normalized


@dataclass
class SMCResult:
    """One run of SMC (or importance sampling, which is SMC that never resamples).

    ``log_weights`` are the final unnormalised log weights (since the last resampling);
    ``log_z`` is log of the estimate Z-hat = prod_epochs mean_k w_k, unbiased for Z (so
    log_z itself is biased low, in expectation a lower bound on log Z). ``ess[t]`` is the
    ESS after step t+1's reweighting, before any resampling; ``ancestry[t][k]`` is the parent
    of particle k at step t+1 (the identity where no resampling happened);
    ``resampled_at`` lists the 1-based steps at which resampling happened.
    """

    samples: list[str]
    tokens: list[list[int]]
    log_weights: list[float]
    log_z: float
    ess: list[float]
    resampled_at: list[int]
    ancestry: list[list[int]]
    method: str = "smc"
    info: dict = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        return len(self.samples)

    @property
    def weights(self) -> list[float]:
        """Normalised weights of the final particles."""
        return normalized(torch.tensor(self.log_weights)).tolist()

    def top(self, k: int = 5) -> list[tuple[float, str]]:
        """The k distinct samples of largest total normalised weight, heaviest first."""
        mass: dict[str, float] = {}
        for w, s in zip(self.weights, self.samples):
            mass[s] = mass.get(s, 0.0) + w
        return sorted(((w, s) for s, w in mass.items()), reverse=True)[:k]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_jsonl(self, path: str | Path, *, append: bool = False) -> None:
        """Write this run as one JSON line (``append=True`` adds to an existing file)."""
        with open(path, "a" if append else "w") as f:
            f.write(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path, index: int = -1) -> SMCResult:
        """Read back run number ``index`` (default: the last) of a JSONL file."""
        return cls(**read_jsonl(path)[index])

    def __repr__(self) -> str:
        return (
            f"SMCResult(method={self.method!r}, n_particles={self.n_particles}, log_z={self.log_z:.4f}, "
            f"final_ess={self.ess[-1] if self.ess else math.nan:.1f}, resamples={len(self.resampled_at)})"
        )


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
