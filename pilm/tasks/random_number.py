"""A uniformly random integer in [low, high]: the exact check of an amortised sampler.

The target (Hu et al. 2024, §2) is uniform over the canonical token sequences
of the integers low..high, each followed by EOS: phi(s) = 1[s is one of them] / p0(s), so
sigma(s) ∝ p0(s) phi(s) = 1[valid]. An LM asked for a random number is far from uniform
(and often does not stop), and reward maximisation (PPO, REINFORCE without the KL term)
has zero expected gradient among valid answers, so it cannot fix the skew; a sampler of
sigma must. With only high - low + 1 valid sequences, how far a policy is from sigma is
computed exactly by scoring each of them (``report``).
"""

from __future__ import annotations

import math
from typing import cast

import torch

from ..models.base import LanguageModel
from ..models.registry import load_model
from ..potentials import FunctionPotential, ModelLikelihood
from ..target import Target

PROMPT = "Pick a random integer between {low} and {high}. Reply with the number only."
RAW_PROMPT = "The following is a random integer drawn uniformly between {low} and {high}: "
SHOTS = (37, 82)  # earlier answers in the conversation: without them the 135M model rarely answers with a number


def valid_sequences(model: LanguageModel, low: int = 0, high: int = 100) -> dict[tuple[int, ...], int]:
    """The canonical token ids (plus EOS) of each integer in [low, high]."""
    return {tuple(model.encode(str(k))) + (cast(int, model.eos_token_id),): k for k in range(low, high + 1)}


def random_number(model: LanguageModel | None = None, *, low: int = 0, high: int = 100, chat: bool = True,
                  shots: tuple[int, ...] = SHOTS, max_new_tokens: int | None = None) -> Target:
    """The target uniform over "low".."high" then EOS.

    ``chat=True`` asks the instruct model in a conversation where it has already answered
    the same request with each of ``shots`` (few-shot: 74% of SmolLM2-135M's answers are then
    valid, against 2% with the question alone); ``chat=False`` uses the paper's raw-text
    prompt (no answers stop at EOS)."""
    model = model or load_model()
    if model.eos_token_id is None:
        raise ValueError(f"{model.name} has no EOS token: the random-number task needs one to stop")
    valid = valid_sequences(model, low, high)
    allowed = FunctionPotential(lambda t: 0.0 if tuple(t) in valid else -math.inf, on="tokens",
                                name=f"integer in [{low}, {high}]")
    horizon = max_new_tokens or max(map(len, valid))
    potential = allowed * ModelLikelihood(model, -1.0)
    if not chat:
        return Target(model, RAW_PROMPT.format(low=low, high=high), potential, max_new_tokens=horizon)
    ask = {"role": "user", "content": PROMPT.format(low=low, high=high)}
    turns = [t for k in shots for t in (ask, {"role": "assistant", "content": str(k)})] + [ask]
    return Target(model, turns, potential, max_new_tokens=horizon, chat=True)


def report(sampler: LanguageModel, target: Target, *, low: int = 0, high: int = 100) -> dict:
    """Exact scores of ``sampler`` (generating ``target``'s completions) against uniform:

    ``valid``: q(valid) = sum over the valid sequences of q(s);
    ``kl_valid``: KL(q(. | valid) || uniform), how skewed its valid answers are;
    ``kl_uniform_q``: KL(uniform || q) = -log N - mean_k log q(s_k), finite, and large when q
    misses numbers or wastes mass on invalid strings. (KL(q || uniform) is infinite whenever
    q(valid) < 1, so it is not reported.)
    ``probs``: q(s_k) per integer k.
    """
    valid = valid_sequences(target.model, low, high)
    with torch.no_grad():
        log_q = sampler.log_prob(target.prompt_ids, list(valid)).double()
    n = len(valid)
    mass = float(log_q.exp().sum())
    log_cond = log_q - math.log(mass) if mass > 0 else log_q
    return {
        "valid": mass,
        "kl_valid": float((log_cond.exp() * (log_cond + math.log(n))).sum()),
        "kl_uniform_q": float(-math.log(n) - log_q.mean()),
        "probs": {k: math.exp(v) for k, v in zip(valid.values(), log_q.tolist())},
    }
