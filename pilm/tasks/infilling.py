"""Infilling: a middle s given the beginning x and a fixed ending c.

sigma(s | x, c) ∝ p0(s | x) p0(c | x, s) (Zhao et al. 2024; Hu et al. 2024). Exact samples
come free by sampling the joint (``joint_samples``, from ``pilm.inference.joint``), which is
what a conditional twist and the bounds on log Z need.
"""

from __future__ import annotations

from ..models.base import LanguageModel
from ..models.registry import load_model
from ..potentials import SuffixLikelihood
from ..potentials.likelihood import suffix_of
from ..target import Target

DEFAULT_PROMPT = "Once upon a time, there was a little dog named Max."
DEFAULT_SUFFIX = " Max was never afraid of the dark again."


def infilling(
    model: LanguageModel | None = None, *, prompt: str = DEFAULT_PROMPT, suffix: str | list[int] = DEFAULT_SUFFIX,
    max_new_tokens: int = 10,
) -> Target:
    """The infilling target: phi(s) = p0(suffix | prompt, s) (``SuffixLikelihood``)."""
    model = model or load_model()
    return Target(model, prompt, SuffixLikelihood(model, suffix), max_new_tokens=max_new_tokens)


def ending_first(target: Target) -> list[int]:
    """A policy prompt for amortised infilling (``finetune(..., policy_prompt=ending_first)``,
    ``ModelProposal(policy, prompt=ending_first)``): the ending stated before the beginning,
    so one policy can infill many endings. The target (p0, the rewards) keeps its own prompt."""
    suffix = suffix_of(target.potential)
    if suffix is None:
        raise ValueError("ending_first needs an infilling target (a SuffixLikelihood potential)")
    ending = target.model.decode(suffix.suffix_ids).strip()
    beginning = target.model.decode(target.prompt_ids)
    return target.model.encode_prompt(f"The story ends with: {ending}\n\n{beginning}")
