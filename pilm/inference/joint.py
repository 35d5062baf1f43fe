"""Exact posterior samples for infilling by sampling the joint (the "BDMC" trick).

Draw s ~ p0(. | x) with the target's stopping rule, then c ~ p0(. | x, s) for m tokens:
s is an exact draw from sigma(. | x, c) ∝ p0(s | x) p0(c | x, s) for *that* c.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models.base import LanguageModel
from ..models.device import seeded_generator
from ..target import Target
from .smc import run_smc


def joint_samples(
    model: LanguageModel, prompt: str | Sequence[int], *, max_new_tokens: int, suffix_tokens: int, n: int, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """n pairs (middle, suffix) from the joint p0(s, c | x): each middle is an exact sample
    of sigma(. | x, c) for its own suffix c. Suffixes have exactly ``suffix_tokens`` tokens
    (truncated sampling, no EOS forced)."""
    g = seeded_generator(seed, model.device)  # on the device it draws from
    middles = run_smc(Target(model, prompt, max_new_tokens=max_new_tokens), n, g, ess_threshold=0.0).tokens
    prompt_ids = list(model.encode_prompt(prompt))
    # every ending in one batched decode: one target per middle, one row each
    endings = run_smc([Target(model, prompt_ids + m, max_new_tokens=suffix_tokens) for m in middles], 1, g,
                      ess_threshold=0.0)
    return [(m, e.tokens[0]) for m, e in zip(middles, endings)]
