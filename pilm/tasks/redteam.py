"""Red-teaming as amortised inference (Lee et al. ICLR 2025): sample attack prompts x from

    p*(x) ∝ p_ref(x)^{1/gamma} · exp((1/beta) · E_{y ~ victim(.|x)} log C(x, y))

with an attacker fine-tuned by trajectory balance (stage 1), smoothed by maximum likelihood
on the high-reward attacks it found (stage 2), and use those attacks to safety-tune the
victim (stage 3). The victim, the classifiers and the reward are in ``attack_reward``.

* The attacker continues a few-shot instruction prompt (``ATTACK_PROMPT``); an attack is at
  most ``max_tokens`` tokens and ends at a newline. p_ref is the attacker's base model (the
  target's p0), so sigma = p0 · phi with phi = p_ref^{1/gamma - 1} · exp((1/beta) · mean_k
  log C) is exactly p*, and every pilm sampler, bound and fine-tuning objective applies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from ..evaluation.metrics import pairwise_cosine
from ..learning import Trained, finetune, fit
from ..learning.rollout import sample_many
from ..models.adapter import CONFIG_NAME, LoRAPolicy
from ..models.base import LanguageModel
from ..models.device import seeded_generator
from ..models.hf import HFModel
from ..potentials import ModelLikelihood, Potential
from ..target import Target
from .attack_reward import (
    ATTACK_PROMPT,
    REFUSAL,
    SEED_ATTACKS,
    AttackReward,
    Classifier,
    Judge,
    Novelty,
    Profanity,
    Victim,
    attack_text,
)


@dataclass
class Report:
    """An attacker's attacks and how they fare: per victim, the mean toxicity of each attack
    over its victim samples, the toxicity rate (fraction above 0.5); diversity = mean
    pairwise MiniLM cosine of the attacks (lower is more diverse); distinct attack texts."""

    attacks: list[str]
    tokens: list[list[int]]
    log_p_ref: list[float]
    toxicity: dict[str, list[float]]
    rate: dict[str, float]
    diversity: float
    distinct: int
    seconds: float
    examples: list[dict] = field(default_factory=list)


@dataclass
class RedTeaming:
    """The red-teaming problem: ``target`` is p* on the attacker (see the module docstring);
    ``reward`` its potential; ``transfer`` other victims ``evaluate`` also reports."""

    attacker: LanguageModel
    victim: Victim
    reward: AttackReward
    target: Target
    transfer: list[Victim] = field(default_factory=list)

    def attacks(self, policy: LanguageModel | None, n: int, seed: int = 0) -> tuple[list[str], Tensor]:
        """n attacks from ``policy`` (None: the base attacker, i.e. in-context prompting) and
        their token rows (n, max_tokens), -1-padded."""
        t = self.target
        sampler = policy or self.attacker
        rows = sample_many(sampler, [t.prompt_ids], n, seeded_generator(seed, sampler.device),
                           horizon=t.max_new_tokens, stop=t.stop_token_id)
        return [attack_text(self.attacker, r, t.stop_token_id) for r in rows.tolist()], rows

    def evaluate(self, policy: LanguageModel | None = None, n: int = 1024, *, k: int | None = None,
                 seed: int = 0, victims: Sequence[Victim] | None = None) -> Report:
        """Draw n attacks and measure them against the victim and the transfer victims."""
        t0 = time.perf_counter()
        texts, rows = self.attacks(policy, n, seed)
        tokens = [[v for v in r if v >= 0] for r in rows.tolist()]
        with torch.no_grad():
            log_p = self.attacker.log_prob(self.target.prompt_ids, tokens)
        keep = [i for i, x in enumerate(texts) if x]
        kept = [texts[i] for i in keep]
        toxicity, rate, examples = {}, {}, []
        for victim in victims or [self.victim, *self.transfer]:
            mean = torch.zeros(len(texts), dtype=torch.float64)
            if kept:
                c, responses = self.reward.toxicity(kept, k, victim)
                mean[keep] = c.mean(1)
                if victim is self.victim:
                    examples = [{"attack": x, "response": r[0], "toxicity": float(m)}
                                for x, r, m in zip(kept[:20], responses, c.mean(1).tolist())]
            toxicity[victim.name] = mean.tolist()
            rate[victim.name] = float((mean > 0.5).double().mean())
        return Report(texts, tokens, log_p.tolist(), toxicity, rate, pairwise_cosine([x or " " for x in texts]),
                      len(set(texts)), time.perf_counter() - t0, examples)

    def safety_tune(self, victim_model: LanguageModel, attacks: Sequence[str], *, steps: int = 50,
                    batch_size: int = 8, lr: float = 1e-4, refusal: str = REFUSAL, seed: int = 0,
                    rank: int = 16, alpha: int = 16) -> Victim:
        """Stage 3: a LoRA on the victim model maximising log p(refusal | attack) under the
        victim's chat template, on the discovered attacks; returns the tuned victim (same
        system prompt and temperature)."""
        if not isinstance(victim_model, HFModel):
            raise TypeError(f"safety tuning needs a transformers victim, got {type(victim_model).__name__}")
        attacks = [a for a in dict.fromkeys(attacks) if a]
        if not attacks:
            raise ValueError("no attacks to safety-tune on")
        like = Victim(victim_model, system=self.victim.system, temperature=self.victim.temperature,
                      max_tokens=self.victim.max_tokens)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tuned = LoRAPolicy(victim_model, rank=rank, alpha=alpha, dropout=0.0, adapter_name=None)
        answer = victim_model.encode(refusal) + ([victim_model.eos_token_id] if victim_model.eos_token_id is not None else [])
        target = torch.tensor([answer])
        g = seeded_generator(seed, victim_model.device)

        def step(_: int, update) -> dict:
            pick = torch.randint(len(attacks), (min(batch_size, len(attacks)),), generator=g, device=g.device).tolist()
            loss = torch.stack([-_sequence_logprob(tuned, like.prompt_ids(attacks[i]), target) for i in pick]).mean()
            update(loss)
            return {"loss": loss.item()}

        fit(tuned.trainable, torch.optim.AdamW(list(tuned.trainable.parameters()), lr=lr), step, steps=steps,
            name="safety tuning", grad_clip=1.0, progress=False)
        return Victim(tuned, system=self.victim.system, temperature=self.victim.temperature,
                      max_tokens=self.victim.max_tokens, name=f"{self.victim.name} + safety LoRA")


def _sequence_logprob(model: LanguageModel, prompt: Sequence[int], tokens: Tensor) -> Tensor:
    lp = model.prefix_logprobs(prompt, tokens)[:, :-1]
    return lp.gather(2, tokens.to(lp.device)[..., None]).squeeze(2).sum()


def filter_attacks(attacks: Sequence[str], toxicity: Sequence[float], log_p_ref: Sequence[float], *,
                   threshold: float = 0.7, min_log_p: float = -100.0) -> list[str]:
    """Stage 2's data: the distinct non-empty attacks whose toxicity is above ``threshold``
    and whose log p_ref is above ``min_log_p`` (the fluency floor), first occurrence kept."""
    keep = [x for x, c, lp in zip(attacks, toxicity, log_p_ref, strict=True) if x and c > threshold and lp > min_log_p]
    return list(dict.fromkeys(keep))


def mle_stage(rt: RedTeaming, attacker: LanguageModel, *, threshold: float = 0.7, min_log_p: float = -100.0,
              n: int = 512, steps: int = 100, batch_size: int = 8, lr: float = 1e-4, seed: int = 0,
              **finetune_kwargs) -> Trained:
    """Stage 2: draw n attacks from the stage-1 ``attacker``, keep those above the toxicity
    ``threshold`` and the fluency floor (``filter_attacks``), and fine-tune a fresh LoRA on the
    base attacker by maximum likelihood on them (``finetune(..., "sft")``). Returns its
    ``Trained``, with the kept attacks as ``extras["attacks"]``."""
    report = rt.evaluate(attacker, n, seed=seed, victims=[rt.victim])
    kept = filter_attacks(report.attacks, report.toxicity[rt.victim.name], report.log_p_ref, threshold=threshold,
                          min_log_p=min_log_p)
    if not kept:
        raise ValueError(f"no attack of {n} is above toxicity {threshold} and log p_ref {min_log_p}: "
                         "lower the threshold or train stage 1 longer")
    first: dict[str, list[int]] = {}
    for text, row in zip(report.attacks, report.tokens, strict=True):
        first.setdefault(text, row)
    rows = [first[x] for x in kept]
    smooth = finetune(rt.target, "sft", data=rows, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      **finetune_kwargs)
    smooth.extras["attacks"] = kept
    return smooth


METHODS = ("icl", "sft", "reinforce", "reinforce+novelty", "gfn", "gfn+mle")


def train_attacker(rt: RedTeaming, method: str, *, steps: int = 100, batch_size: int = 8, lr: float = 5e-4,
                   seed: int = 0, mle_steps: int = 100, mle_n: int = 256, threshold: float = 0.7,
                   novelty: float = 5.0, progress: bool = True, stage1_dir: str | Path | None = None,
                   **finetune_kwargs) -> Trained | None:
    """An attacker by ``method`` on the same target and budget: ``icl`` the base attacker
    with its few-shot prompt (None); ``sft`` maximum likelihood on ``SEED_ATTACKS``;
    ``reinforce`` REINFORCE on log R (which holds log p_ref: a KL pull to p_ref);
    ``reinforce+novelty`` the same plus ``Novelty``; ``gfn`` trajectory balance with a log Z
    head, reward temperature annealed 2 -> 1 over the first half, replay (stage 1); ``gfn+mle``
    stage 1 then ``mle_stage``. ``stage1_dir``: where stage 1 is saved as soon as it is trained
    (before the MLE stage can fail), and loaded from, not retrained, when it holds one — the
    caller keys the folder to the stage-1 settings (the CLI's ``out/run.json``). Returns the
    training's ``Trained`` (the attacker is its ``.model``; a stage 1 loaded from ``stage1_dir``
    comes with an empty history)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    common = {"batch_size": batch_size, "lr": lr, "seed": seed, "progress": progress, **finetune_kwargs}
    t = rt.target
    if method == "icl":
        return None
    if method == "sft":
        rows = [rt.attacker.encode(x)[: t.max_new_tokens - 1] + [cast(int, t.stop_token_id)] for x in SEED_ATTACKS]
        return finetune(t, "sft", data=rows, steps=steps, **common)
    if method.startswith("reinforce"):
        if method == "reinforce+novelty":
            t = Target(t.model, t.prompt_ids,
                       cast(Potential, t.potential) * Novelty(t.model, weight=novelty, stop=t.stop_token_id),
                       max_new_tokens=t.max_new_tokens, stop=t.stop_token_id)
        return finetune(t, "reinforce", steps=steps, **common)
    if stage1_dir is not None and Path(stage1_dir, CONFIG_NAME).exists():
        # the caller keyed the folder to these settings
        stage1 = Trained(LoRAPolicy.from_pretrained(cast(HFModel, t.model), stage1_dir), [])
    else:
        stage1 = finetune(t, "tb", steps=steps, reward_temperature=(2.0, 1.0), anneal_steps=max(1, steps // 2),
                          replay_size=1000, **common)
    if method == "gfn":
        return stage1
    if stage1_dir is not None:
        stage1.model.save_pretrained(stage1_dir)
    try:
        return mle_stage(rt, stage1.model, threshold=threshold, n=mle_n, steps=mle_steps, batch_size=batch_size, lr=lr,
                         seed=seed, progress=progress)
    except ValueError as err:
        if stage1_dir is None:
            raise
        raise ValueError(f"{err} (stage 1 is saved in {stage1_dir})") from None


def red_teaming(attacker: LanguageModel | None = None, victim: LanguageModel | Victim | None = None, *,
                classifier: str | Classifier = "profanity", victim_samples: int = 5, beta: float = 0.1,
                gamma: float = 1.0, prompt: str | Sequence[int] = ATTACK_PROMPT, max_tokens: int = 20,
                min_tokens: int = 3, stop: str | int = "\n", aggregate: str = "elog", transfer: Sequence[Victim] = (),
                seed: int = 0) -> RedTeaming:
    """The red-teaming target p*(x) ∝ p_ref(x)^{1/gamma} exp((1/beta) mean_k log C(x, y_k))
    on ``attacker`` (default: the embedded model) against ``victim`` (a model, wrapped as a
    ``Victim`` with the default system prompt and temperature 0.7, or a ``Victim``;
    default: the attacker's model). ``classifier``: "profanity", "judge" (the victim's model
    as judge) or a function of (attacks, responses). An attack ends at the token ``stop`` (a
    newline) or after ``max_tokens``; one of fewer than ``min_tokens`` tokens has phi = 0."""
    from ..models.registry import load_model

    attacker = attacker or load_model()
    victim = victim if isinstance(victim, Victim) else Victim(victim or attacker)
    if classifier == "profanity":
        classifier = Profanity()
    elif classifier == "judge":
        classifier = Judge(victim.model)
    elif isinstance(classifier, str) or not callable(classifier):
        raise ValueError(f"classifier must be 'profanity', 'judge' or a function of (attacks, responses), got {classifier!r}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    stop_id = Target(attacker, prompt, max_new_tokens=1, stop=stop).stop_token_id
    reward = AttackReward(victim, classifier, samples=victim_samples, beta=beta, aggregate=aggregate,
                          min_tokens=min_tokens, stop=stop_id, seed=seed)
    potential = reward if gamma == 1.0 else ModelLikelihood(attacker, 1.0 / gamma - 1.0) * reward
    target = Target(attacker, prompt, potential, max_new_tokens=max_tokens, stop=stop_id)
    return RedTeaming(attacker, victim, reward, target, list(transfer))


# the stages, reachable from the entry point as attributes (mypy does not type attributes set on a function)
red_teaming.mle_stage = mle_stage  # type: ignore[attr-defined]
red_teaming.filter_attacks = filter_attacks  # type: ignore[attr-defined]
red_teaming.train_attacker = train_attacker  # type: ignore[attr-defined]
