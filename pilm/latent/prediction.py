"""Predictions of a test set from rationales (or the direct form): the labels, the
estimate of p(Y | X), the votes, and accuracy with its Wilson interval."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ..evaluation.metrics import wilson
from .model import Example, LatentModel


@dataclass
class Prediction:
    """Predicted labels of a test set: ``probs`` (n, n_labels) = the estimate of p(Y | X)
    (mean of p(Y | X, Z) over the rationales, or the direct form's), ``votes`` (n, n_labels)
    the rationales' argmax counts and ``per_rationale`` (n, k, n_labels) each rationale's
    p(Y | X, Z) (both empty for the direct form), one sample ``rationale`` text per item, and
    accuracy with its 95% Wilson interval where the items have labels."""

    labels: list[str]
    probs: list[list[float]]
    votes: list[list[int]]
    rationales: list[str]
    accuracy: float | None
    ci: tuple[float, float] | None
    seconds: float
    per_rationale: list = field(default_factory=list)
    gold: list[str] = field(default_factory=list)
    label_set: tuple[str, ...] = ()

    def revote(self, vote: str) -> Prediction:
        """The same rationales and scores aggregated by the other ``vote`` (no model call)."""
        probs, votes = torch.tensor(self.probs), torch.tensor(self.votes)
        which = vote_for(probs, votes, vote)
        labels = [self.label_set[i] for i in which.tolist()]
        acc, ci = accuracy(labels, self.gold)
        return replace(self, labels=labels, accuracy=acc, ci=ci)


def vote_for(probs: torch.Tensor, votes: torch.Tensor, vote: str) -> torch.Tensor:
    if vote not in ("soft", "hard"):
        raise ValueError(f"vote must be 'soft' or 'hard', got {vote!r}")
    return (probs if vote == "soft" else votes + 1e-3 * probs).argmax(-1)  # hard ties go to the soft vote


def accuracy(labels: list[str], gold: list[str]) -> tuple[float | None, tuple[float, float] | None]:
    if not gold or not all(gold):
        return None, None
    correct = sum(a == b for a, b in zip(labels, gold, strict=True))
    return correct / len(gold), wilson(correct, len(gold))


def make_prediction(latent: LatentModel, items: list[Example], which, probs, votes, shown, t0) -> Prediction:
    labels = [latent.labels[i] for i in which.tolist()]
    gold = [ex.y for ex in items]
    acc, ci = accuracy(labels, gold)
    return Prediction(labels, probs.tolist(), votes, shown, acc, ci, time.perf_counter() - t0, gold=gold,
                      label_set=latent.labels)
