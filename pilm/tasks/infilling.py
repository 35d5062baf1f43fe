"""Infilling: a middle s given the beginning x and a fixed ending c.

sigma(s | x, c) ∝ p0(s | x) p0(c | x, s) (Zhao et al. 2024; Hu et al. 2024). Exact samples
come free by sampling the joint: draw s ~ p0(. | x) with the target's stopping rule, then
c ~ p0(. | x, s) for m tokens; s is an exact draw from sigma(. | x, c) for *that* c (the
"BDMC" trick), which is what a conditional twist and the bounds on log Z need.
"""

from __future__ import annotations

import torch

from ..inference.smc import run_smc
from ..models.base import LanguageModel
from ..models.registry import load_model
from ..potentials import SuffixLikelihood
from ..target import Target

DEFAULT_PROMPT = "Once upon a time, there was a little dog named Max."
DEFAULT_SUFFIX = " Max was never afraid of the dark again."


def infilling(
    model: LanguageModel | None = None, *, prompt: str = DEFAULT_PROMPT, suffix: str | list[int] = DEFAULT_SUFFIX,
    max_new_tokens: int = 10,
) -> Target:
    """The infilling target: phi(s) = p0(suffix | prompt, s) (``SuffixLikelihood``)."""
    model = model or load_model()
    potential = SuffixLikelihood(model, suffix if isinstance(suffix, str) else model.decode(suffix))
    if not isinstance(suffix, str):
        potential.suffix_ids = list(suffix)
    return Target(model, prompt, potential, max_new_tokens=max_new_tokens)


def ending_first(target: Target) -> list[int]:
    """A policy prompt for amortised infilling (``finetune(..., policy_prompt=ending_first)``,
    ``ModelProposal(policy, prompt=ending_first)``): the ending stated before the beginning,
    so one policy can infill many endings. The target (p0, the rewards) keeps its own prompt."""
    suffix = next((p for p in _parts(target.potential) if isinstance(p, SuffixLikelihood)), None)
    if suffix is None:
        raise ValueError("ending_first needs an infilling target (a SuffixLikelihood potential)")
    ending = target.model.decode(suffix.suffix_ids).strip()
    beginning = target.model.decode(target.prompt_ids)
    return target.model.encode_prompt(f"The story ends with: {ending}\n\n{beginning}")


def _parts(potential) -> tuple:
    return getattr(potential, "parts", (potential,))


def joint_samples(
    model: LanguageModel, prompt: str, *, max_new_tokens: int, suffix_tokens: int, n: int, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """n pairs (middle, suffix) from the joint p0(s, c | x): each middle is an exact sample
    of sigma(. | x, c) for its own suffix c. Suffixes have exactly ``suffix_tokens`` tokens
    (truncated sampling, no EOS forced)."""
    g = torch.Generator().manual_seed(seed)
    middles = run_smc(Target(model, prompt, max_new_tokens=max_new_tokens), n, g, ess_threshold=0.0).tokens
    pairs = []
    prompt_ids = list(model.encode_prompt(prompt))
    for middle in middles:
        cont = run_smc(Target(model, prompt_ids + middle, max_new_tokens=suffix_tokens), 1, g, ess_threshold=0.0)
        pairs.append((middle, cont.tokens[0]))
    return pairs
