"""Potentials from text classifiers that ship offline."""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from ..extras import require
from .base import Potential, Sequences


@functools.cache
def _vader():
    return require("vaderSentiment.vaderSentiment", "the Sentiment potential (VADER)").SentimentIntensityAnalyzer()


class Sentiment(Potential):
    """phi(s) = P(label | s) from VADER: P(positive) = (1 + c) / 2 with c in (-1, 1) the
    compound score, P(negative) = 1 - P(positive). Temper with ``Sentiment(...) ** beta``.

    With ``prefix=True`` (default) the same probability of the prefix text is the
    intermediate potential: a heuristic twist that resamples towards prefixes already
    carrying the sentiment; a number alpha makes it P(label | prefix)^alpha (a look-ahead
    power). It leaves sigma and the unbiasedness of Z-hat unchanged (it is never 0, since
    |c| < 1).
    """

    def __init__(self, label: Literal["positive", "negative"] = "positive", *, prefix: bool | float = True):
        if label not in ("positive", "negative"):
            raise ValueError(f"sentiment label must be 'positive' or 'negative', got {label!r}")
        self.label = label
        self.prefix = prefix_power(prefix)
        self.has_prefix = self.prefix > 0

    @property
    def name(self) -> str:
        return f"sentiment({self.label})"

    def probability(self, texts: list[str]) -> Tensor:
        """P(label | text) for each text, float64."""
        c = torch.tensor([_vader().polarity_scores(t)["compound"] for t in texts], dtype=torch.float64)
        return (1 + c) / 2 if self.label == "positive" else (1 - c) / 2

    def log_phi(self, seqs: Sequences) -> Tensor:
        return torch.log(self.probability(seqs.texts)).float()

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return self.prefix * self.log_phi(seqs)


def prefix_power(prefix: bool | float) -> float:
    """A classifier's look-ahead power: ``True`` is 1, ``False`` 0 (no prefix score)."""
    value = float(prefix)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"prefix must be True, False or a finite power >= 0, got {prefix!r}")
    return value


@functools.cache
def _profanity():
    return require("profanity_check", "the Toxicity potential (alt-profanity-check)").predict_prob


class Toxicity(Potential):
    """phi(s) = P(offensive | s) (``want="toxic"``) or 1 - P(offensive | s) (``want="clean"``),
    from ``alt-profanity-check``: a linear SVM on bag-of-words features with calibrated
    probabilities, trained on ~200k labelled comments. It is the best toxicity classifier
    that ships offline on PyPI: small, fast (~20k texts/s) and a real probability, so
    ``Toxicity(...) ** 1`` keeps Bayesian semantics (exact samples by rejection). It judges
    words, not intent. No prefix score by default; ``prefix=True`` scores the prefix text the
    same way, and a number alpha makes that P(. | prefix)^alpha (a look-ahead power).
    """

    def __init__(self, want: Literal["toxic", "clean"] = "clean", *, prefix: bool | float = False):
        if want not in ("toxic", "clean"):
            raise ValueError(f"toxicity target must be 'toxic' or 'clean', got {want!r}")
        self.want, self.prefix = want, prefix_power(prefix)
        self.has_prefix = self.prefix > 0

    @property
    def name(self) -> str:
        return f"toxicity({self.want})"

    def probability(self, texts: list[str]) -> Tensor:
        p = torch.as_tensor(_profanity()(list(texts)), dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        return p if self.want == "toxic" else 1 - p

    def log_phi(self, seqs: Sequences) -> Tensor:
        return torch.log(self.probability(seqs.texts)).float()

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return self.prefix * self.log_phi(seqs)
