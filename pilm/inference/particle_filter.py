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
from dataclasses import replace
from typing import cast, overload

import torch

from ..prm import ProcessReward, as_prm
from ..proposals import BaseProposal, Proposal, log_mean_exp
from ..target import Target
from ..twists.base import TwistFunction
from .batch import References, seeded_generators
from .boundaries import step_targets
from .chains import run_steps
from .resampling import Scheme, ess, multinomial
from .result import StepResult
from .rules import Decision, Resample, Rule, View, conditional_ancestors

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

    def decide(self, v: View) -> Decision:
        r = v.scores.clamp(_CLIP, 1 - _CLIP)
        log_w = (r.log() - (-r).log1p()) / self.tau
        if (v.scores[v.alive] == 0).all():
            log_w = torch.full_like(log_w, -math.inf)
        ess_now = ess(log_w) if torch.isfinite(log_w).any() else 0.0
        if not v.going or torch.isneginf(log_w).all():
            return Decision(log_w, v.log_psi, v.alive, ess=ess_now)
        parents = (conditional_ancestors(log_w, v.generator) if v.reference
                   else multinomial(log_w, len(log_w), v.generator))
        return Decision(torch.zeros_like(log_w), v.log_psi, v.alive, parents, float(log_mean_exp(log_w)), ess_now)


TwistedWeights = Resample  # the "twisted" weights are SMC's: psi_t / psi_{t-1}, phi / psi_{t-1} at the end


class AncestorSampling(Resample):
    """Twisted weights whose conditional sweeps give the reference a new past (particle Gibbs
    with ancestor sampling, Lindsten, Jordan & Schön 2014). When a boundary t resamples, the
    reference row's ancestor is drawn instead of kept: with x' its remaining steps, row i
    (not finished, with room for x' within the horizon) is chosen with probability

        ∝ w_t^i · gamma_T(x^i_{1:t}, x'_{t+1:T}) / gamma_t(x^i_{1:t})
        = w_t^i · p_M(x' | x^i_{1:t}) · phi(x^i_{1:t}, x') / psi_t(x^i_{1:t}),

    gamma_t = p_M psi_t being the filter's intermediate targets, and the reference continues
    as x^i_{1:t} followed by x'. Stitching assumes a step ends where its own tokens say, so
    that x^i's steps followed by x''s are the stitched chain's steps. One teacher-forced
    forward of the N stitched chains per resampling."""

    reads_model = True

    def __init__(self, targets, temperature: float, scheme: str | Scheme = "systematic", threshold: float = 0.5):
        super().__init__(scheme, threshold)
        self.targets, self.base = targets, BaseProposal(temperature)

    def decide(self, v: View) -> Decision:
        d = super().decide(v)
        ref = v.reference_tokens
        if d.parents is None or ref is None or len(ref) == int(v.lengths[0]):
            return d
        target, future = self.targets[v.index], list(ref[int(v.lengths[0]):])
        log_w, chains = self.weigh(v), v.chains
        ok = [i for i in range(len(log_w)) if v.stepped[i] and not v.finished[i] and torch.isfinite(log_w[i])
              and len(chains[i]) + len(future) <= target.max_new_tokens]
        stitched = [list(chains[i]) + future for i in ok]
        pad = max(map(len, stitched))
        tokens = torch.tensor([s + [-1] * (pad - len(s)) for s in stitched])
        lp = self.base.tempered(target.model.prefix_logprobs(target.prompt_ids, tokens).flatten(0, 1)).view(
            len(ok), pad + 1, -1)
        log_future = torch.stack([cast(torch.Tensor, sum(lp[j, len(chains[i]) + k, f] for k, f in enumerate(future)))
                                  for j, i in enumerate(ok)]).double().cpu()  # the weights live on the host
        logits = torch.full_like(log_w, -math.inf)
        logits[ok] = log_w[ok] + log_future + target.log_potential(stitched).double() - v.log_psi_now[ok]
        a = int(multinomial(logits, 1, v.generator)[0])
        parents = d.parents.clone()
        parents[0] = a
        return replace(d, parents=parents, reference=tuple(chains[a]) + tuple(future))


def make_rule(weights: str, *, tau: float, resample: str | Scheme | None, ess_threshold: float | None) -> Rule:
    if weights == "paper":
        if resample not in (None, "multinomial") or ess_threshold not in (None, 1.0, 1):
            raise ValueError("weights='paper' resamples multinomially at every step boundary, as the authors' code; "
                             "use weights='twisted' for ESS-adaptive resampling with another scheme")
        return PaperWeights(tau)
    if weights == "twisted":
        return Resample(resample or "systematic", 0.5 if ess_threshold is None else ess_threshold)
    raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")




@overload
def particle_filter(target: Target, prm: ProcessReward | TwistFunction | None, n_particles: int, *,
                    step: str | int | object | None = ..., weights: str = ..., temperature: float = ..., tau: float = ...,
                    aggregation: str = ..., resample: str | Scheme | None = ..., ess_threshold: float | None = ...,
                    on_extinction: str = ..., seed: int = ..., progress: bool = ..., reference: Sequence[int] | None = ...,
                    mask: bool = ..., proposal: Proposal | None = ...) -> StepResult: ...
@overload
def particle_filter(target: Sequence[Target], prm: ProcessReward | TwistFunction | None, n_particles: int, *,
                    step: str | int | object | None = ..., weights: str = ..., temperature: float = ..., tau: float = ...,
                    aggregation: str = ..., resample: str | Scheme | None = ..., ess_threshold: float | None = ...,
                    on_extinction: str = ..., seed: int = ..., progress: bool = ..., reference: References | None = ...,
                    mask: bool = ..., proposal: Proposal | None = ...) -> list[StepResult]: ...
def particle_filter(
    target: Target | Sequence[Target],
    prm: ProcessReward | TwistFunction | None,
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
    proposal: Proposal | None = None,
) -> StepResult | list[StepResult]:
    """Particle filtering over reasoning steps with process reward ``prm`` (module docstring).

    ``target``: one target or a list sharing one model (all their particles advance in one
    forward per token; one result per target). ``step``: the step delimiter (a string, a
    compiled regex or a token id; default: the target's ``Steps``, else "\\n").
    ``prm``: a ``pilm.prm.ProcessReward``, or a twist with psi in [0, 1] (a learned PRM), or
    ``None``: the potential's prefix score is psi (with a boundary after every token, as
    ``Steps(max_step_tokens=1)`` makes, this is token-level SMC, particle for particle).
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
    simply restricted to the format. ``proposal``: any ``pilm.proposals.Proposal`` to draw
    from instead of p_M (a twisted or masked proposal, a fine-tuned policy as a
    ``ModelProposal``): the weights carry p_M / q, so "twisted" weights keep the target p_M phi.
    """
    targets, single = step_targets(target, step)
    _check(n_particles, temperature, on_extinction)
    rule = make_rule(weights, tau=tau, resample=resample, ess_threshold=ess_threshold)
    refs = None
    if reference is not None:
        refs = [reference] if single else list(reference)
        if len(refs) != len(targets):
            raise ValueError(f"give one reference per target ({len(targets)}), got {len(refs)}")
    if proposal is not None and (mask or weights == "paper"):
        raise ValueError("a proposal is corrected by the weights: use weights='twisted', and build the mask into "
                         "the proposal (pilm.proposals.MaskedProposal) rather than mask=True")
    if prm is None and weights == "paper":
        raise ValueError("weights='paper' weighs particles by a process reward's scores, and prm is None: give a "
                         "prm, or use weights='twisted' (psi is then the potential's prefix score)")
    out = _filter(targets, prm, n_particles, rule, weights=weights, temperature=temperature, aggregation=aggregation,
                  seed=seed, references=refs, on_extinction=on_extinction, progress=progress, mask=mask,
                  proposal=proposal, method=f"pf-{weights}", info={"tau": tau})
    return out[0] if single else out


def _filter(targets, prm, n, rule: Rule, *, weights: str, temperature, aggregation, seed, references, on_extinction,
            progress, mask, proposal, method: str, info: dict) -> list[StepResult]:
    return run_steps(targets, n, None if prm is None else as_prm(prm), rule,
                     seeded_generators(seed, len(targets), targets[0].model.device), temperature=temperature,
                     aggregation=aggregation, references=references, method=method,
                     desc=f"particle filter ({weights})", on_extinction=on_extinction, progress=progress,
                     info={"seed": seed, **info, "mask": mask}, mask=mask, proposal=proposal)


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
    resample: str | Scheme | None = None,
    ess_threshold: float | None = None,
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
    fields sum all sweeps. ``ancestor_sampling=True`` is PGAS (``AncestorSampling``: at each
    resampling the reference draws a new past, which mixes far better where the reference's
    early steps would otherwise stay fixed); it weighs stitched chains by p_M phi, so it needs
    "twisted" weights and a target with a potential. ``reference`` (one complete chain per
    target) starts the chain there: the first sweep is already conditional. ``mask`` as in
    ``particle_filter``, and ``resample``, ``ess_threshold`` for "twisted" weights."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    targets, single = step_targets(target, step)
    _check(n_particles, temperature, "return")
    rule = make_rule(weights, tau=tau, resample=resample, ess_threshold=ess_threshold)
    if ancestor_sampling:
        if weights != "twisted" or any(t.potential is None for t in targets):
            raise ValueError("ancestor_sampling weighs stitched chains by p_M phi: use weights='twisted' on targets "
                             "with a potential")
        twisted = cast(Resample, rule)  # weights="twisted" makes a Resample
        rule = AncestorSampling(targets, temperature, twisted.scheme, twisted.threshold)
    refs: list | None = None if reference is None else ([reference] if single else list(reference))
    if refs is not None and len(refs) != len(targets):
        raise ValueError(f"give one reference per target ({len(targets)}), got {len(refs)}")
    history: list[list[list[int] | None]] = []
    keys = ("tokens", "forwards", "prm_calls", "prm_lm_tokens", "seconds")
    spent = [dict.fromkeys(keys, 0.0) for _ in targets]
    results: list[StepResult] = []
    for it in range(iterations):
        results = _filter(targets, prm, n_particles, rule, weights=weights, temperature=temperature,
                          aggregation=aggregation, seed=seed + it, references=refs, on_extinction="return",
                          progress=progress, mask=mask, proposal=None, method="pg", info={"tau": tau})
        for total, r in zip(spent, results, strict=True):
            for k in keys:
                total[k] += r.info.get(k, 0.0)
        refs = [_draw_reference(r, g) for r, g in zip(results, seeded_generators(seed + 10_000 + it, len(targets)),
                                                        strict=True)]
        history.append(refs)
    for i, r in enumerate(results):
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
