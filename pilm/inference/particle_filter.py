"""Step-level particle filtering with a process reward (Puri et al. 2025, Algorithm 1).

A reasoning chain x_1..x_T (steps, ``pilm.steps.Steps``) of the policy p_M (the model at
``temperature``: p_M(v) ∝ p0(v)^(1/temperature) token by token) is a state-space model
whose observations are scored by a process reward r_t = r(c, x_{<=t}) in [0, 1]. Two weight
rules, two different targets:

* ``weights="paper"`` is the authors' code: at every step boundary a particle weighs
  g(r_t) = exp(logit(r_t) / tau) of its *current* (aggregated) score, fresh, not a ratio;
  all N particles, finished ones included with their last score, are resampled
  multinomially at every boundary. When every chain has the same number of steps T this is
  the bootstrap filter of the Feynman-Kac model sigma(x) ∝ p_M(x) prod_t g(r_t(x)), and
  Z-hat = prod_t mean_k g(r_t^k) is unbiased for its normaliser. Where chains finish at
  different steps it is *not* a fixed distribution: a finished particle is weighed by
  g(r_last) again at every later boundary, so its mass depends on how long the others run.
* ``weights="twisted"`` is the principled form: r_t is a twist psi_t, the incremental
  weight at a boundary is psi_t / psi_{t-1} and phi / psi_{t-1} where a chain finishes, with
  phi the target's potential or, without one, the final aggregated score; resampling is
  ESS-adaptive. The target is sigma(x) ∝ p_M(x) phi(x) whatever the PRM (which only moves
  particles), and Z-hat is unbiased for Z = E_{p_M}[phi]; with psi_t = E[phi | x_{<=t}]
  every weight is Z at every boundary.

``particle_gibbs`` iterates a conditional particle filter with a reference chain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..prm import ProcessReward, as_prm
from ..proposals import log_mean_exp
from ..target import Target
from ..twists.base import TwistFunction
from .resampling import Scheme, ess, get_scheme, multinomial
from .result import StepResult
from .smc import seeded_generators
from .rules import Boundary, Decision, Rule, conditional_ancestors
from .stepwise import run_steps, step_targets

WEIGHTS = ("paper", "twisted")
_CLIP = 1e-6  # r is clipped to [1e-6, 1 - 1e-6] before the logit, as the peers clip: |logit| <= 13.8


class PaperWeights(Rule):
    """w = exp(logit(r_t) / tau) of the current score, multinomial resampling at every boundary
    (module docstring). A target whose every score is 0 is extinct."""

    name, weighs = "paper", True

    def __init__(self, tau: float = 1.0):
        if not tau > 0:
            raise ValueError(f"the weight temperature tau must be > 0, got {tau}")
        self.tau = tau

    def decide(self, b: Boundary) -> Decision:
        r = b.scores.clamp(_CLIP, 1 - _CLIP)
        log_w = (r.log() - (-r).log1p()) / self.tau
        if (b.scores[b.alive] == 0).all():
            log_w = torch.full_like(log_w, -math.inf)
        ess_now = ess(log_w) if torch.isfinite(log_w).any() else 0.0
        if not b.going or torch.isneginf(log_w).all():
            return Decision(log_w, b.log_psi, b.alive, ess=ess_now)
        parents = (conditional_ancestors(log_w, b.generator) if b.reference
                   else multinomial(log_w, len(log_w), b.generator))
        return Decision(torch.zeros_like(log_w), b.log_psi, b.alive, parents, float(log_mean_exp(log_w)), ess_now)


class TwistedWeights(Rule):
    """psi_t / psi_{t-1} at each boundary, phi / psi_{t-1} at a chain's end; resampling by
    ``scheme`` when ESS < ``threshold`` * N (module docstring)."""

    name, weighs, importance = "twisted", True, True

    def __init__(self, scheme: Scheme, threshold: float = 0.5):
        if not 0 <= threshold <= 1:
            raise ValueError(f"ess_threshold must be in [0, 1], got {threshold}")
        self.scheme, self.threshold = scheme, threshold

    def decide(self, b: Boundary) -> Decision:
        now = torch.where(b.finished, b.log_phi, b.scores.log())
        new_psi = torch.where(b.stepped, now, b.log_psi)
        incr = torch.where(torch.isneginf(b.log_psi), 0.0, new_psi - b.log_psi)
        log_w = b.log_w + torch.where(b.stepped, incr, 0.0)
        if torch.isneginf(log_w).all():
            return Decision(log_w, new_psi, b.alive)
        ess_now = ess(log_w)
        due = self.threshold >= 1 or ess_now < self.threshold * len(log_w)
        if not (b.going and due):
            return Decision(log_w, new_psi, b.alive, ess=ess_now)
        n = len(log_w)
        parents = conditional_ancestors(log_w, b.generator) if b.reference else self.scheme(log_w, n, b.generator)
        return Decision(torch.zeros_like(log_w), new_psi, b.alive, parents, float(log_mean_exp(log_w)), ess_now)


def make_rule(weights: str, *, tau: float, resample: str | Scheme | None, ess_threshold: float | None) -> Rule:
    if weights == "paper":
        if resample not in (None, "multinomial") or ess_threshold not in (None, 1.0, 1):
            raise ValueError("weights='paper' resamples multinomially at every step boundary, as the authors' code; "
                             "use weights='twisted' for ESS-adaptive resampling with another scheme")
        return PaperWeights(tau)
    if weights == "twisted":
        return TwistedWeights(get_scheme(resample or "systematic"), 0.5 if ess_threshold is None else ess_threshold)
    raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")


def particle_filter(
    target: Target | Sequence[Target],
    prm: ProcessReward | TwistFunction,
    n_particles: int,
    *,
    step: str | int | object | None = None,
    weights: str = "paper",
    temperature: float = 1.0,
    tau: float = 1.0,
    aggregation: str = "last",
    resample: str | Scheme | None = None,
    ess_threshold: float | None = None,
    on_extinction: str = "warn",
    seed: int = 0,
    progress: bool = False,
    reference: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
    mask: bool = False,
) -> StepResult | list[StepResult]:
    """Particle filtering over reasoning steps with process reward ``prm`` (module docstring).

    ``target``: one target or a list sharing one model (all their particles advance in one
    forward per token; one result per target). ``step``: the step delimiter (a string, a
    compiled regex or a token id; default: the target's ``Steps``, else "\\n").
    ``prm``: a ``pilm.prm.ProcessReward``, or a twist with psi in [0, 1] (a learned PRM).
    ``weights``: "paper" (``tau`` is the softmax temperature of the logits; multinomial
    resampling at every boundary) or "twisted" (``resample`` scheme, default systematic, when
    ESS < ``ess_threshold`` * N, default 0.5). ``aggregation``: how a chain's step scores
    combine (last | min | prod | mean). ``reference`` runs the conditional filter of
    ``particle_gibbs``. If every particle of a target scores 0 (extinction),
    ``on_extinction`` "warn" returns log_z = -inf with an ``ExtinctionWarning``, "raise"
    raises ``ImpossibleTargetError``, "return" returns silently. ``mask=True`` draws only
    tokens that keep the target's potential satisfiable (an answer format as a ``Regex`` or a
    ``Grammar``): with "twisted" weights the allowed mass enters the weights, so the target
    stays p_M phi and Z-hat unbiased; with "paper" weights (no carried weights) the policy is
    simply restricted to the format.
    """
    targets, single = step_targets(target, step)
    _check(n_particles, temperature, on_extinction)
    rule = make_rule(weights, tau=tau, resample=resample, ess_threshold=ess_threshold)
    refs = None
    if reference is not None:
        refs = [reference] if single else list(reference)
        if len(refs) != len(targets):
            raise ValueError(f"give one reference per target ({len(targets)}), got {len(refs)}")
    out = run_steps(targets, n_particles, as_prm(prm), rule, seeded_generators(seed, len(targets), targets[0].model.device),
                    temperature=temperature, aggregation=aggregation, references=refs,
                    method=f"particle filter ({weights})", on_extinction=on_extinction, progress=progress,
                    info={"seed": seed, "tau": tau, "mask": mask}, mask=mask)
    for r in out:
        r.method = f"pf-{weights}"
    return out[0] if single else out


def particle_gibbs(
    target: Target | Sequence[Target],
    prm: ProcessReward | TwistFunction,
    n_particles: int,
    *,
    iterations: int = 2,
    ancestor_sampling: bool = False,
    step: str | int | object | None = None,
    weights: str = "paper",
    temperature: float = 1.0,
    tau: float = 1.0,
    aggregation: str = "last",
    seed: int = 0,
    progress: bool = False,
    reference: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
    mask: bool = False,
) -> StepResult | list[StepResult]:
    """Particle Gibbs (Puri et al. 2025; Andrieu, Doucet & Holenstein 2010): a particle filter,
    then ``iterations - 1`` conditional filters, each with a reference chain drawn from the
    previous sweep's particles by their final weight; particle 0 of a conditional sweep
    follows the reference and always survives resampling, the other N-1 resample from all N.
    The conditional sweep leaves the filter's target invariant (sigma ∝ p_M prod_t g(r_t) for
    "paper" weights with a fixed number of steps, p_M phi for "twisted"), so the references
    form a Markov chain with stationary law sigma. Budget: N x ``iterations`` chains. Returns
    the last sweep, whose ``info["references"]`` lists the chain drawn after each sweep
    (token ids: the Markov chain; the last is a draw from the last sweep) and whose compute
    fields sum all sweeps. ``ancestor_sampling``
    (PGAS) is not implemented. ``reference`` (one complete chain per target) starts the
    chain there: the first sweep is already conditional. ``mask`` as in ``particle_filter``."""
    if ancestor_sampling:
        raise NotImplementedError("ancestor sampling (PGAS) is not implemented; use ancestor_sampling=False")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    targets, single = step_targets(target, step)
    refs = None if reference is None else ([reference] if single else list(reference))
    history: list[list[list[int] | None]] = []
    keys = ("tokens", "forwards", "prm_calls", "prm_lm_tokens", "seconds")
    spent = [dict.fromkeys(keys, 0.0) for _ in targets]
    results: list[StepResult] = []
    for it in range(iterations):
        results = particle_filter(targets, prm, n_particles, weights=weights, temperature=temperature, tau=tau,
                                  aggregation=aggregation, seed=seed + it, progress=progress, on_extinction="return",
                                  reference=refs, mask=mask)
        for total, r in zip(spent, results, strict=True):
            for k in keys:
                total[k] += r.info.get(k, 0.0)
        refs = [_draw_reference(r, g) for r, g in zip(results, seeded_generators(seed + 10_000 + it, len(targets)),
                                                        strict=True)]
        history.append(refs)
    for i, r in enumerate(results):
        r.method = "pg"
        r.info.update(spent[i])
        r.info.update({"iterations": iterations, "references": [h[i] for h in history]})
    return results[0] if single else results


def _draw_reference(result: StepResult, generator: torch.Generator) -> list[int] | None:
    """A chain drawn by final weight (``None`` if every weight is 0)."""
    w = torch.tensor(result.weights, dtype=torch.float64)
    if w.sum() <= 0:
        return None
    return result.tokens[int(torch.multinomial(w, 1, generator=generator))]


def _check(n: int, temperature: float, on_extinction: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"need at least one particle, got {n!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if on_extinction not in ("warn", "raise", "return"):
        raise ValueError(f"on_extinction must be 'warn', 'raise' or 'return', got {on_extinction!r}")
