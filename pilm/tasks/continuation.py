"""Tempered sentence continuation (Hu et al. 2024, §4.1): likely *and* diverse sentences.

The target is sigma(s) ∝ p0(s⊤ | x)^{1/T}, where ⊤ is the stop token (a period): T < 1
favours likely sentences more than sampling p0 does, yet stays a distribution, unlike beam
search (its mode-seeking limit, T -> 0). Sampling p0 token by token at temperature T is a
different distribution (the per-token normalisers do not cancel). ``ModelLikelihood`` with
power 1/T - 1 reweights p0 into p0^{1/T}, so every prefix's reward comes from one
teacher-forced forward when fine-tuning.
"""

from __future__ import annotations

from ..models.base import LanguageModel
from ..models.registry import load_model
from ..potentials import ModelLikelihood
from ..target import Target

PROMPTS = (  # whole sentences: the completion is the next one
    "The old lighthouse keeper climbed the stairs one last time.",
    "The train stopped in the middle of the desert.",
    "My grandmother kept a jar of buttons on the kitchen shelf.",
    "The first thing the robot learned to say was hello.",
    "Nobody in the village remembered who had planted the oak.",
    "At the bottom of the lake there was a door.",
)


def tempered_continuation(prompt: str, model: LanguageModel | None = None, *, temperature: float = 0.5,
                          stop: str = ".", max_new_tokens: int = 20) -> Target:
    """sigma(s) ∝ p0(s | prompt)^{1/temperature}, completions ending at ``stop``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    model = model or load_model()
    return Target(model, prompt, ModelLikelihood(model, 1.0 / temperature - 1.0), max_new_tokens=max_new_tokens,
                  stop=stop)
