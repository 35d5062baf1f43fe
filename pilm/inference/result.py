"""Run records: what a sampler returns, serialisable to JSONL."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from ..models.device import seeded_generator
from ..prm.base import aggregate
from .resampling import multinomial, normalized

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class Record:
    """What run records share: a particle count and one JSON line per run."""

    samples: list[str]

    @property
    def n_particles(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict:
        return asdict(cast("DataclassInstance", self))  # every record is a dataclass

    def to_jsonl(self, path: str | Path, *, append: bool = True) -> None:
        """Add this run to ``path`` as one JSON line (``append=False`` starts the file afresh);
        the command line's ``--out`` does the same, so runs from both collect in one file."""
        with open(path, "a" if append else "w") as f:
            f.write(json.dumps(self.to_dict()) + "\n")


@dataclass
class SMCResult(Record):
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
    def weights(self) -> list[float]:
        """Normalised weights of the final particles."""
        return normalized(torch.tensor(self.log_weights)).tolist()

    def draw(self, n: int, *, seed: int = 0) -> list[list[int]]:
        """``n`` particles' tokens drawn by weight, with replacement (multinomial resampling,
        seeded): approximate samples of sigma, e.g. a replay pool for ``train_twist(positives=)``.
        A run whose weights are all 0 (extinct) has nothing to draw: ``ValueError``."""
        log_w = torch.tensor(self.log_weights, dtype=torch.float64)
        if not bool(torch.isfinite(log_w).any()):
            raise ValueError("this run has no particle of positive weight to draw (it went extinct)")
        picks = multinomial(log_w, n, torch.Generator(device="cpu").manual_seed(seed))  # host weights
        return [list(self.tokens[i]) for i in picks.tolist()]

    def top(self, k: int = 5) -> list[tuple[float, str]]:
        """The k distinct samples of largest total normalised weight, heaviest first."""
        mass: dict[str, float] = {}
        for w, s in zip(self.weights, self.samples):
            mass[s] = mass.get(s, 0.0) + w
        return sorted(((w, s) for s, w in mass.items()), reverse=True)[:k]

    @classmethod
    def from_jsonl(cls, path: str | Path, index: int = -1) -> SMCResult:
        """Read back run number ``index`` (default: the last) of a JSONL file."""
        return cls(**read_jsonl(path)[index])

    def __repr__(self) -> str:
        return (
            f"SMCResult(method={self.method!r}, n_particles={self.n_particles}, log_z={self.log_z:.4f}, "
            f"final_ess={self.ess[-1] if self.ess else math.nan:.1f}, resamples={len(self.resampled_at)})"
        )


def read_jsonl(path: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """Every record of a JSONL file (none for a missing file with ``missing_ok``, as a
    resumable experiment starts)."""
    if missing_ok and not Path(path).exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


SELECTIONS = ("argmax", "sample", "vote", "weighted_vote")


@dataclass
class StepResult(Record):
    """One step-level run on one target (particle filter, particle Gibbs, PRM search, voting).

    Per particle: ``samples`` (text), ``tokens``, ``steps`` (the text of each step), ``scores``
    (the process reward after each step), ``answers`` (the final answer each states, canonical,
    or ``None``), ``log_weights`` (final, unnormalised) and ``alive`` (still in the pool; a
    search discards rows). ``log_z``: log Z-hat of the run's target when its weights are
    importance weights or the paper's per-step potentials (``importance`` says which), NaN for
    searches. ``ess`` and ``resampled_at`` are per step boundary, and ``ancestry[b][k]`` is the
    parent of particle k at boundary b+1 (the identity where nothing was selected). ``info`` holds the settings
    and this target's share of the compute: policy ``tokens``, ``forwards``, ``prm_calls``,
    ``prm_lm_tokens`` (tokens a judge ran), ``seconds``, and ``cut_steps`` (steps cut at
    ``max_step_tokens``).
    """

    samples: list[str]
    tokens: list[list[int]]
    steps: list[list[str]]
    scores: list[list[float]]
    answers: list[str | None]
    log_weights: list[float]
    alive: list[bool]
    log_z: float
    ess: list[float]
    resampled_at: list[int]
    aggregation: str = "last"
    importance: bool = False
    method: str = "particle filter"
    info: dict = field(default_factory=dict)
    ancestry: list[list[int]] = field(default_factory=list)

    @property
    def weights(self) -> list[float]:
        """Normalised final weights (0 for discarded rows)."""
        lw = torch.tensor(self.log_weights, dtype=torch.float64)
        lw[~torch.tensor(self.alive, dtype=torch.bool)] = -math.inf
        if torch.isneginf(lw).all():
            return [0.0] * len(lw)
        return normalized(lw).tolist()

    @property
    def aggregated(self) -> list[float]:
        """Each particle's per-step scores combined by ``aggregation`` (NaN without scores)."""
        return [aggregate(s, self.aggregation) if s else math.nan for s in self.scores]

    def answer(self, select: str = "weighted_vote", *, seed: int = 0) -> str | None:
        """The run's answer. ``"argmax"``: the particle with the highest aggregated score
        (the peers' default); ``"sample"``: one particle drawn by its final weight;
        ``"vote"``: the most frequent answer (majority, ties to the first seen);
        ``"weighted_vote"``: the answer with the largest total weight, where a particle weighs
        its normalised importance weight when the run has them (a self-normalised estimate
        of sigma's answer distribution, Feng et al. 2025) and its aggregated score otherwise
        (search-and-learn's weighted best-of-N). Particles without an answer are skipped;
        ``None`` if none has one."""
        if select not in SELECTIONS:
            raise ValueError(f"unknown selection {select!r}; choose one of {', '.join(SELECTIONS)}")
        rows = [k for k in range(self.n_particles) if self.alive[k]]
        if select == "argmax":
            scores = self.aggregated
            if all(math.isnan(scores[k]) for k in rows):
                raise ValueError("argmax selection needs process-reward scores; this run has none (use 'vote')")
            return self.answers[max(rows, key=lambda k: scores[k])]
        if select == "sample":
            w = torch.tensor(self.weights, dtype=torch.float64)
            if w.sum() <= 0:
                return None
            return self.answers[int(torch.multinomial(w, 1, generator=seeded_generator(seed, w.device)))]
        if select == "vote":
            weight = dict.fromkeys(rows, 1.0)
        elif self.importance:
            weight = dict(zip(range(self.n_particles), self.weights))
        else:
            agg = self.aggregated
            weight = {k: (1.0 if math.isnan(agg[k]) else agg[k]) for k in rows}
        totals: dict[str, float] = {}
        for k in rows:
            if (answer := self.answers[k]) is not None:
                totals[answer] = totals.get(answer, 0.0) + weight[k]
        return max(totals, key=totals.__getitem__) if totals else None
