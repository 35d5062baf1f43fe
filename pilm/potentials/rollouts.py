"""A look-ahead twist through the rest of the horizon: the optimal twist estimated by rollouts.

The optimal twist of sigma ∝ p0 phi is psi*_t(s_{1:t}) = E_{p0}[phi(s) | s_{1:t}] (Zhao et
al., ICML 2024, eq. 5): with it, every intermediate target of SMC is sigma's marginal. Without
a learned model of it, it can be estimated where it is needed, by Monte Carlo:

    psi-hat_t(s_{1:t}) = (1/R) sum_{j=1}^R phi(s_{1:t} r_j),    r_j ~ p0(. | x, s_{1:t}),

each rollout r_j running to the horizon (or EOS). psi-hat is unbiased for psi* but random.
SMC keeps each particle's prefix score and divides the next one by it, so the scores telescope
along every lineage to phi(s) / psi-hat_0 = phi(s): Z-hat stays unbiased and the samples
target sigma, for any R (the rollouts are auxiliary variables of an extended Feynman-Kac
model; Naesseth et al. 2015, nested SMC, make the same argument). R buys a twist closer to
psi*, at the price of R · (T - t) sampled tokens and R scorings of phi per particle and step.

A prefix's rollouts are drawn from a generator seeded by (``seed``, prompt, prefix), so
psi-hat is a fixed (pseudo-random) function of the prefix alone: a twist like any other,
whatever else is in the batch, and a run is reproducible. ``tokens`` counts the rollout tokens
drawn, the look-ahead's cost.

Where every rollout of a prefix has phi = 0 while the prefix may still complete with phi > 0,
psi-hat = 0 would kill a particle that sigma keeps and bias Z-hat downwards. ``floor`` (a log
value) then stands in; without one that is an error, naming the prefix. A potential with its
own prefix score (a grammar) keeps its -inf: those prefixes cannot complete at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import PotentialError
from ..models.base import LanguageModel
from ..models.device import derived_seed, seeded_generator
from ..models.draws import categorical, uniforms
from .base import Potential, Sequences, evaluate


class RolloutLookahead(Potential):
    """phi unchanged, with the prefix score log psi-hat_t = power · log (1/R) sum_j phi(s_{1:t} r_j)
    over ``rollouts`` = R continuations drawn from the target's own model to ``horizon`` new
    tokens (the target's ``max_new_tokens``) or the ``stop`` token (the target's; default: the
    model's EOS); see the module docstring. ``floor`` is log psi-hat before the power where every
    rollout scored phi = 0. At most ``max_rows`` rollouts decode in one batch."""

    has_prefix = costly_prefix = True

    def __init__(self, potential: Potential, horizon: int, rollouts: int = 4, *, power: float = 1.0,
                 floor: float | None = None, stop: int | None = None, seed: int = 0, max_rows: int = 512):
        for name, value in (("horizon", horizon), ("rollouts", rollouts), ("max_rows", max_rows)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power < math.inf:
            raise ValueError(f"power must be a number > 0, got {power!r}")
        if floor is not None and not -math.inf < floor < math.inf:
            raise ValueError(f"floor must be a finite log value, got {floor!r}")
        self.potential, self.horizon, self.rollouts = potential, horizon, rollouts
        self.power, self.floor, self.stop, self.seed, self.max_rows = float(power), floor, stop, int(seed), max_rows
        self.tokens = 0  # rollout tokens drawn so far

    @property
    def name(self) -> str:
        power = "" if self.power == 1 else f"^{self.power:g}"
        return f"{self.potential.name} with a {self.rollouts}-rollout look-ahead{power}"

    def factors(self) -> Iterator[tuple[Potential, float]]:
        yield from self.potential.factors()  # phi is the wrapped potential's

    def log_phi(self, seqs: Sequences) -> Tensor:
        return evaluate(self.potential, seqs, final=True)

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor | None:
        return self.potential.allowed_next(seqs, stop)

    def min_new_tokens(self, model, horizon: int) -> float:
        return self.potential.min_new_tokens(model, horizon)

    def log_prefix(self, seqs: Sequences) -> Tensor:
        if not len(seqs):
            return torch.zeros(0)
        where = {t: i for i, t in enumerate(dict.fromkeys(seqs.tokens))}  # resampled particles share prefixes
        distinct = list(where)  # each is rolled out once
        per = max(1, self.max_rows // self.rollouts)
        completions = [c for lo in range(0, len(distinct), per)
                       for c in self._roll_out(Sequences(seqs.model, seqs.prompt, distinct[lo: lo + per]))]
        log_phi = evaluate(self.potential, Sequences(seqs.model, seqs.prompt, completions), final=True)
        once = torch.logsumexp(log_phi.view(len(distinct), self.rollouts), 1) - math.log(self.rollouts)
        log_psi = once[[where[t] for t in seqs.tokens]]
        dead = torch.zeros(len(seqs), dtype=torch.bool)
        if self.potential.has_prefix:  # its -inf: no completion of the prefix has phi > 0
            dead = torch.isneginf(evaluate(self.potential, seqs, final=False))
        zero = torch.isneginf(log_psi) & ~dead
        if zero.any():
            if self.floor is None:
                i = int(zero.nonzero()[0])
                raise PotentialError(
                    f"phi was 0 on all {self.rollouts} rollouts of {int(zero.sum())} prefixes (e.g. {seqs.texts[i]!r}), "
                    "and psi = 0 there would bias Z-hat: give RolloutLookahead a floor= (a log value) or more rollouts")
            log_psi = log_psi.masked_fill(zero, self.floor)
        return (log_psi * self.power).masked_fill(dead, -math.inf)

    def _roll_out(self, seqs: Sequences) -> list[tuple[int, ...]]:
        """R completions of every prefix, prefix-major: one batched decode of all n · R rows."""
        model: LanguageModel = seqs.model
        r, eos = self.rollouts, model.eos_token_id if self.stop is None else self.stop
        prefixes = [list(t) for t in seqs.tokens]
        room = torch.tensor([self.horizon - len(p) for p in prefixes]).repeat_interleave(r)
        out = [tuple(p) for p in prefixes for _ in range(r)]
        done = room <= 0
        if bool(done.all()):
            return out
        generators = [seeded_generator(derived_seed(self.seed, (tuple(seqs.prompt), tuple(p))), model.device)
                      for p in prefixes]
        state = model.start_many([model.context(seqs.prompt) + p for p in prefixes], r)
        steps, kept = [], []  # each step's draws, and which rows took theirs
        while True:
            u = uniforms([r] * len(generators), generators, state.logprobs.device)
            drawn = categorical(state.logprobs, u).cpu()
            steps.append(drawn)
            kept.append(~done)
            room -= (~done).long()
            done = done | (room <= 0) | ((drawn == eos) if eos is not None else False)
            if bool(done.all()):
                break
            state = model.advance(state, drawn.to(state.logprobs.device), hold=done.to(state.logprobs.device))
        tokens, took = torch.stack(steps, 1), torch.stack(kept, 1)  # (rows, steps); a row's draws are a prefix
        self.tokens += int(took.sum())
        return [tuple(p) + tuple(row[:k]) for p, row, k in zip(out, tokens.tolist(), took.sum(1).tolist(), strict=True)]
