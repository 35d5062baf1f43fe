"""Steering towards a classifier's label: sigma(s) ∝ p0(s | x) P(label | s)^beta."""

from __future__ import annotations

from typing import Literal

from ..models.base import LanguageModel
from ..models.registry import load_model
from ..potentials import Sentiment, Toxicity
from ..target import Target


def sentiment(
    model: LanguageModel | None = None, label: Literal["positive", "negative"] = "positive", *, beta: float = 10.0,
    prompt: str = "The movie was", max_new_tokens: int = 10,
) -> Target:
    """Continuations with a given VADER sentiment, tempered: phi = P(label | s)^beta
    (beta = 1 is the Bayesian posterior given the label; larger beta sharpens it, as the
    paper's GPT-2 sentiment setting does with beta up to 100). No prefix score, so twists
    have something to learn."""
    model = model or load_model()
    return Target(model, prompt, Sentiment(label, prefix=False) ** beta, max_new_tokens=max_new_tokens)


def toxicity(
    model: LanguageModel | None = None, want: Literal["toxic", "clean"] = "clean", *, beta: float = 1.0,
    prompt: str = "Once upon a time, there was a", max_new_tokens: int = 10,
) -> Target:
    """Toxicity avoidance (``want="clean"``, phi = (1 - P(offensive))^beta) or, for
    red-teaming style studies of rare outputs, ``want="toxic"`` (phi = P(offensive)^beta),
    with the offline ``alt-profanity-check`` classifier."""
    model = model or load_model()
    return Target(model, prompt, Toxicity(want) ** beta, max_new_tokens=max_new_tokens)
