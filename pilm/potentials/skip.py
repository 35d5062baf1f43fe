"""The infilling twist as a model of the ending across the rest of the middle (``SkipLookahead``).

For infilling, sigma(s | x, e) ∝ p0(s | x) p0(e | x, s) with s of T tokens, the optimal twist
is itself a likelihood of the ending: psi*_t(s_{1:t}) = E_{p0}[p0(e | x, s) | s_{1:t}] =
p0(e | x, s_{1:t}), the probability that e follows after T - t more tokens, whatever they are.
A skip model q estimates it by reading the prefix, T - t filler tokens standing for the tokens
still to come (so the ending sits at its true positions), then the ending:

    log psi_t(s_{1:t}) = log q(e | x, s_{1:t}, f^{T-t}).

q is normalised over endings, so maximum likelihood on pairs (s, e) drawn from the joint p0 fits
it to psi* (``pilm.learning.train_skip_model``: every prefix of every joint sample is a labelled
example, with no importance weights). phi stays p0(e | x, s), so Z-hat stays unbiased for any q.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from ..models.base import LanguageModel
from .base import Potential, Sequences, evaluate
from .likelihood import SuffixLikelihood


class SkipLookahead(Potential):
    """``suffix``'s phi, with the prefix score log q(e | x, s_{1:t}, f^{horizon - t}) under the
    skip model ``skip`` (a language model on the same tokenizer, e.g. LoRA-adapted) and the
    filler token id ``filler`` (module docstring). One scoring forward of every particle's
    context and ending a step."""

    has_prefix = costly_prefix = True

    def __init__(self, suffix: SuffixLikelihood, skip: LanguageModel, horizon: int, filler: int):
        if not isinstance(suffix, SuffixLikelihood):
            raise TypeError(f"SkipLookahead looks ahead for a SuffixLikelihood, got {type(suffix).__name__}")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        if skip.vocab_size != suffix.model.vocab_size:
            raise ValueError(f"the skip model's vocabulary ({skip.vocab_size}) is not the suffix model's "
                             f"({suffix.model.vocab_size}): it must share its tokenizer")
        self.suffix, self.skip, self.horizon, self.filler = suffix, skip, horizon, int(filler)

    @property
    def name(self) -> str:
        return f"{self.suffix.name} with a skip-model look-ahead"

    def factors(self) -> Iterator[tuple[Potential, float]]:
        yield from self.suffix.factors()

    def log_phi(self, seqs: Sequences) -> Tensor:
        return evaluate(self.suffix, seqs, final=True)

    def log_prefix(self, seqs: Sequences) -> Tensor:
        if seqs.model is not self.suffix.model:
            raise ValueError("SkipLookahead scores the token ids of its suffix model's targets")
        ctx = [self.skip.context(seqs.prompt) + list(s) + [self.filler] * max(0, self.horizon - len(s))
               for s in seqs.tokens]
        return self.skip.score([c + self.suffix.suffix_ids for c in ctx], [len(c) for c in ctx])
