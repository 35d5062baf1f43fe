"""Potentials that are likelihoods under a language model."""

from __future__ import annotations

from torch import Tensor

from ..models.base import LanguageModel
from .base import Potential, Sequences


class SuffixLikelihood(Potential):
    """phi(s) = p(suffix | prompt + s): the infilling potential.

    sigma(s) ∝ p0(s | prompt) p(suffix | prompt, s) is then the posterior over middles
    given the ending. Scored in one batched forward of ``model``. When ``model`` is the
    target's model, token ids are used as they are (an EOS inside s stays in the context);
    another model re-tokenises the prompt and completion text.
    """

    def __init__(self, model: LanguageModel, suffix: str):
        if not suffix:
            raise ValueError("SuffixLikelihood needs a non-empty suffix")
        self.model, self.suffix = model, suffix
        self.suffix_ids = model.encode(suffix)

    @property
    def name(self) -> str:
        return f"suffix({self.suffix!r})"

    def log_phi(self, seqs: Sequences) -> Tensor:
        if seqs.model is self.model:
            ctx = [self.model.context(seqs.prompt) + list(t) for t in seqs.tokens]
        else:
            prompt = self.model.encode_prompt(seqs.prompt_text)
            ctx = [self.model.context(prompt) + self.model.encode(t) for t in seqs.texts]
        return self.model.score([c + self.suffix_ids for c in ctx], [len(c) for c in ctx])
