"""Potentials that are likelihoods under a language model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from ..models.base import LanguageModel
from .base import Potential, Sequences


class SuffixLikelihood(Potential):
    """phi(s) = p(suffix | prompt + s): the infilling potential.

    sigma(s) ∝ p0(s | prompt) p(suffix | prompt, s) is then the posterior over middles
    given the ending. Scored in one batched forward of ``model``. When ``model`` is the
    target's model, token ids are used as they are (an EOS inside s stays in the context);
    another model re-tokenises the prompt and completion text.

    ``lookahead`` = alpha > 0 gives it a prefix score, the look-ahead twist
    log psi_t(s_{1:t}) = alpha · log p(suffix | prompt + s_{1:t}): "the ending could follow
    now", tempered. phi itself stays untempered, so Z-hat stays unbiased for any alpha; the
    twist only moves where the particles go. A sequence (a_1, a_2, ...) gives a power per
    prefix length t (the last one for longer prefixes), as ``pilm.evaluation.fit_lookahead``
    fits them. It costs one scoring forward of every particle's context and ending at every
    step (alpha = 0, the default: none, and no prefix score).
    """

    def __init__(self, model: LanguageModel, suffix: str | Sequence[int], lookahead: float | Sequence[float] = 0.0):
        if not len(suffix):
            raise ValueError("SuffixLikelihood needs a non-empty suffix")
        per_step = isinstance(lookahead, (list, tuple))
        powers: list = list(cast("Sequence[float]", lookahead)) if per_step else [lookahead]
        if not powers or not all(not isinstance(a, bool) and isinstance(a, (int, float)) and 0 <= a < float("inf")
                                 for a in powers):
            raise ValueError(f"lookahead must be a number >= 0 or a non-empty sequence of them, got {lookahead!r}")
        self.lookahead: float | tuple[float, ...] = tuple(map(float, powers)) if per_step else float(powers[0])
        self.has_prefix = self.costly_prefix = any(a > 0 for a in powers)
        if isinstance(suffix, str):
            self.suffix, self.suffix_ids = suffix, model.encode(suffix)
        else:  # token ids, e.g. an ending sampled from the model
            self.suffix_ids = [int(t) for t in suffix]
            self.suffix = model.decode(self.suffix_ids)
        self.model = model

    @property
    def name(self) -> str:
        ahead = self.lookahead
        if isinstance(ahead, tuple):
            return f"suffix({self.suffix!r})^lookahead a_t=({', '.join(f'{a:.2g}' for a in ahead)})"
        return f"suffix({self.suffix!r})" + (f"^lookahead {ahead:g}" if ahead else "")

    def log_phi(self, seqs: Sequences) -> Tensor:
        if seqs.model is self.model:
            ctx = [self.model.context(seqs.prompt) + list(t) for t in seqs.tokens]
        else:
            prompt = self.model.encode_prompt(seqs.prompt_text)
            ctx = [self.model.context(prompt) + self.model.encode(t) for t in seqs.texts]
        return self.model.score([c + self.suffix_ids for c in ctx], [len(c) for c in ctx])

    def log_prefix(self, seqs: Sequences) -> Tensor:
        """alpha · log p(suffix | prompt + prefix), alpha = a_t for a prefix of t tokens under
        per-step powers (the class docstring's look-ahead twist)."""
        if not isinstance(self.lookahead, tuple):
            return self.lookahead * self.log_phi(seqs)
        powers = self.lookahead
        alpha = torch.tensor([powers[min(max(len(t), 1), len(powers)) - 1] for t in seqs.tokens])
        return alpha.to(torch.float32) * self.log_phi(seqs).float()


class ModelLikelihood(Potential):
    """phi(s) = p(s | prompt)^power under ``model`` (EOS included when s ends with it).

    With the target's own model it reshapes p0 itself: ``power = 1/T - 1`` gives
    sigma ∝ p0^{1/T} (tempered sampling: T > 1 flattens, T < 1 sharpens), and
    ``power = -1`` cancels p0, so sigma ∝ the remaining potential (e.g. uniform over the
    strings a constraint allows, the random-number task of Hu et al. 2024).
    """

    def __init__(self, model: LanguageModel, power: float):
        self.model, self.power = model, float(power)

    @property
    def name(self) -> str:
        return f"likelihood^{self.power:g}"

    def log_phi(self, seqs: Sequences) -> Tensor:
        if seqs.model is not self.model:
            raise ValueError("ModelLikelihood scores the token ids of its own model's targets")
        return self.power * self.model.log_prob(seqs.prompt, seqs.tokens)


def suffix_of(potential: Potential | None) -> SuffixLikelihood | None:
    """The infilling factor p0(suffix | x, s) among ``potential``'s factors, if any."""
    if potential is None:
        return None
    return next((f for f, _ in potential.factors() if isinstance(f, SuffixLikelihood)), None)
