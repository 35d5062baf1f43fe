"""Tempered sentence continuation (Hu et al. 2024, §4.1): likely *and* diverse sentences.

The target is sigma(s) ∝ p0(s⊤ | x)^{1/T}, where ⊤ is the stop token (a period): T < 1
favours likely sentences more than sampling p0 does, yet stays a distribution, unlike beam
search (its mode-seeking limit, T -> 0). Sampling p0 token by token at temperature T is a
different distribution (the per-token normalisers do not cancel). ``ModelLikelihood`` with
power 1/T - 1 reweights p0 into p0^{1/T}, so every prefix's reward comes from one
teacher-forced forward when fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..learning.replay import edit_distance
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


def likelihood_and_diversity(target: Target, rows: Tensor | Sequence[Sequence[int]]) -> dict:
    """Scores of a set of completions (-1-padded rows) of ``target``'s prompt:
    ``max_log_p`` / ``mean_log_p``: log p0(s | x) (stop token included when present);
    ``distinct``: the fraction of distinct completions; ``pairwise_edit``: the mean token
    edit distance between two of them over the longer length (0 = identical, 1 = disjoint);
    ``finished``: the fraction ending at the stop token."""
    seqs = [tuple(t for t in row if t >= 0) for row in (rows.tolist() if isinstance(rows, Tensor) else rows)]
    with torch.no_grad():
        log_p = target.model.log_prob(target.prompt_ids, [list(s) for s in seqs]).double()
    pairs = [(a, b) for i, a in enumerate(seqs) for b in seqs[i + 1:]]
    edit = [edit_distance(a, b) / max(len(a), len(b), 1) for a, b in pairs]
    return {"max_log_p": float(log_p.max()), "mean_log_p": float(log_p.mean()),
            "distinct": len(set(seqs)) / len(seqs), "pairwise_edit": sum(edit) / max(len(edit), 1),
            "finished": sum(bool(s) and s[-1] == target.stop_token_id for s in seqs) / len(seqs)}
