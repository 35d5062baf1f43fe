"""Sequential Monte Carlo over token sequences, every particle of every target in one batch.

Target sigma(s) ∝ p0(s | x) phi(s). Step t targets pi_t(s_{1:t}) ∝ p0(s_{1:t}) psi_t(s_{1:t})
with psi_t the twist if one is given, else the potential's prefix score (1 if it has none),
psi_0 = 1, and psi = phi at a particle's last token (s_t = EOS or t = T). A twist replaces
the prefix score rather than multiplying it: the optimal twist E[phi | s_{1:t}] already
accounts for everything the prefix says, and only then are the weights constant. A particle
drawing s_t from the proposal q gets the incremental weight (``pilm.proposals.weights``)

    alpha_t = p0(s_t | s_{<t}) psi_t(s_{1:t}) / ( psi_{t-1}(s_{<t}) q(s_t | s_{<t}) )

and finished particles keep their weight. Proposals (``pilm.proposals``): the base model
(q = p0, so alpha_t = psi_t / psi_{t-1}), the twist-induced q(v) ∝ p0(v) psi_t(s_{<t}, v)^beta
computed for all V tokens from the same forward pass (with beta = 1 its weight does not
depend on the drawn token, Zhao et al. 2024), or another model. At the last token the
proposal still uses the learned psi_T; the weight uses phi. When a target's ESS falls below
``ess_threshold * N`` its particles are resampled, the log-mean weight is added to its
log Z-hat and the weights reset; at the end log Z-hat += log mean_k w_k. Z-hat is unbiased
for Z (Zhao et al. 2024; adaptive resampling keeps this). ``ess_threshold=0`` never resamples
(sequential importance sampling); ``1`` resamples at every step.

One model forward per step for all running particles of all targets; after resampling
the KV cache is reindexed (rows copied), never recomputed; finished particles leave the
batch. It runs on the one particle engine (``pilm.inference.engine``) with a boundary after
every token, the ``PrefixCritic`` and the ``Resample`` rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast, overload

import torch

from ..config import SMCConfig
from ..models.base import LanguageModel
from ..proposals import Proposal, incremental_log_weight, log_mean_exp, make_proposal
from ..proposals import twisted_log_q as proposal_log_probs
from ..target import Target
from ..twists.base import TwistFunction
from . import engine
from .batch import References, as_list, chunks, seeded_generators
from .boundaries import Boundary, TokenStepBoundary
from .critics import PrefixCritic
from .extinction import Extinction, extinct
from .particles import Particles, StepInfo
from .resampling import Scheme, get_scheme
from .result import SMCResult
from .rules import Resample
from .trace import Trace

__all__ = ["importance_sample", "incremental_log_weight", "proposal_log_probs", "run_smc", "seeded_generators", "smc"]

Targets = Target | Sequence[Target]


@overload
def smc(target: Target, n_particles: int, *, twist: TwistFunction | None = ...,
        proposal: str | LanguageModel | Proposal | None = ..., proposal_beta: float = ..., resample: str | Scheme = ...,
        ess_threshold: float = ..., seed: int = ..., progress: bool = ..., on_extinction: Extinction = ...,
        reference: Sequence[int] | None = ..., max_rows: int | None = ...) -> SMCResult: ...
@overload
def smc(target: Sequence[Target], n_particles: int, *, twist: TwistFunction | None = ...,
        proposal: str | LanguageModel | Proposal | None = ..., proposal_beta: float = ..., resample: str | Scheme = ...,
        ess_threshold: float = ..., seed: int = ..., progress: bool = ..., on_extinction: Extinction = ...,
        reference: References | None = ..., max_rows: int | None = ...) -> list[SMCResult]: ...
def smc(
    target: Targets,
    n_particles: int,
    *,
    twist: TwistFunction | None = None,
    proposal: str | LanguageModel | Proposal | None = None,
    proposal_beta: float = SMCConfig.proposal_beta,
    resample: str | Scheme = SMCConfig.resample,
    ess_threshold: float = SMCConfig.ess_threshold,
    seed: int = SMCConfig.seed,
    progress: bool = True,
    on_extinction: Extinction = SMCConfig.on_extinction,
    reference: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
    max_rows: int | None = None,
) -> SMCResult | list[SMCResult]:
    """Run SMC on ``target`` with ``n_particles`` particles (see the module docstring).

    ``target`` may be a list of targets sharing one model (any prompts, horizons and
    potentials): all their particles advance in one forward per token and one result per
    target comes back, in order. When the rows would not fit the device's memory (or
    ``max_rows``), the targets run in chunks that fit; each target draws from its own
    generator (seeded from ``seed`` and its index), so chunking does not change the results.

    ``twist=None`` is plain (bootstrap) SMC. With a twist, ``proposal="twist"`` (default)
    proposes from q ∝ p0 psi^proposal_beta (twisted SMC; ``proposal_beta`` < 1 tempers
    towards p0 for exploration), ``proposal="base"`` from p0 with twisted weights.
    ``proposal="masked"`` draws only tokens that keep the potential's hard constraints
    satisfiable (regex, JSON schema, grammar: ``pilm.proposals.MaskedProposal``), weighted by
    the allowed mass, with or without a twist. A
    ``LanguageModel`` (or any ``pilm.proposals.Proposal``, e.g. ``ModelProposal``) as
    ``proposal`` samples from that instead (e.g. a fine-tuned policy), weighted by p0 phi / q.

    ``reference`` (token ids of a complete sequence; for several targets, one per target or
    ``None``) runs *conditional* SMC: particle 0 is forced to it and always survives
    resampling (its ancestors are kept; the other N-1 draw theirs multinomially from all N).
    With an exact sample of sigma as reference, E[log Z-hat] >= log Z: the IWAE upper bound
    without resampling, the CSMC upper bound with it (Zhao et al. 2024, bidirectional bounds).

    Randomness comes only from generators on the model's device seeded from ``seed``: equal
    seeds give identical runs on the same machine. If every particle of a target reaches
    weight 0 (extinction), ``on_extinction="warn"`` (default) returns that target's run with
    log_z = -inf (Z-hat = 0, which is what a satisfiable target estimates when this happens by
    chance, and what keeps Z-hat unbiased) and an ``ExtinctionWarning`` naming the step, the
    share of particles that died there and what to try; it raises ``ImpossibleTargetError``
    only where the target is shown impossible (every first token has psi = 0, or exact
    enumeration of a small target gives Z = 0), saying how it knows. ``"raise"`` always
    raises, ``"return"`` always returns without a warning.
    """
    targets, single = as_list(target)
    generators = seeded_generators(seed, len(targets), targets[0].model.device)
    refs = [cast("Sequence[int]", reference)] if single and reference is not None else reference  # one target: one sequence
    out = run_smc(targets, n_particles, generators, twist=twist, proposal=proposal, proposal_beta=proposal_beta,
                  resample=resample, ess_threshold=ess_threshold, progress=progress, on_extinction=on_extinction,
                  reference=refs, info={"seed": seed},
                  max_rows=max_rows)
    return out[0] if single else out


@overload
def importance_sample(target: Target, n: int, *, seed: int = ..., progress: bool = ..., on_extinction: Extinction = ...,
                      max_rows: int | None = ...) -> SMCResult: ...
@overload
def importance_sample(target: Sequence[Target], n: int, *, seed: int = ..., progress: bool = ...,
                      on_extinction: Extinction = ..., max_rows: int | None = ...) -> list[SMCResult]: ...
def importance_sample(
    target: Targets, n: int, *, seed: int = SMCConfig.seed, progress: bool = False,
    on_extinction: Extinction = SMCConfig.on_extinction,
    max_rows: int | None = None,
) -> SMCResult | list[SMCResult]:
    """Sequential importance sampling with the base model as proposal.

    s^k ~ p0(. | x) i.i.d., log w^k = log phi(s^k), log Z-hat = log (1/n) sum_k w^k
    (unbiased in Z; the IWAE bound in log space). Prefix scores of the potential are not
    used. A list of targets runs as one batch, as in ``smc``; ``on_extinction`` as there.
    """
    targets, single = as_list(target)
    generators = seeded_generators(seed, len(targets), targets[0].model.device)
    out = run_smc(targets, n, generators, ess_threshold=0.0, use_prefix=False, progress=progress,
                  on_extinction=on_extinction, info={"seed": seed}, max_rows=max_rows)
    return out[0] if single else out


@overload
def run_smc(target: Target, n: int, generator: torch.Generator | Sequence[torch.Generator], *, twist: TwistFunction | None = ...,
            proposal: str | LanguageModel | Proposal | None = ..., proposal_beta: float = ..., resample: str | Scheme = ...,
            ess_threshold: float = ..., use_prefix: bool = ..., progress: bool = ..., on_extinction: Extinction = ...,
            trace: Trace | None = ..., reference: References | None = ..., info: dict | None = ...,
            max_rows: int | None = ...) -> SMCResult: ...
@overload
def run_smc(target: Sequence[Target], n: int, generator: torch.Generator | Sequence[torch.Generator], *,
            twist: TwistFunction | None = ..., proposal: str | LanguageModel | Proposal | None = ..., proposal_beta: float = ...,
            resample: str | Scheme = ..., ess_threshold: float = ..., use_prefix: bool = ..., progress: bool = ...,
            on_extinction: Extinction = ..., trace: Trace | None = ..., reference: References | None = ...,
            info: dict | None = ..., max_rows: int | None = ...) -> list[SMCResult]: ...
def run_smc(
    target: Targets,
    n: int,
    generator: torch.Generator | Sequence[torch.Generator],
    *,
    twist: TwistFunction | None = None,
    proposal: str | LanguageModel | Proposal | None = None,
    proposal_beta: float = 1.0,
    resample: str | Scheme = "systematic",
    ess_threshold: float = 0.5,
    use_prefix: bool = True,
    progress: bool = False,
    on_extinction: Extinction = "warn",
    trace: Trace | None = None,
    reference: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
    info: dict | None = None,
    max_rows: int | None = None,
) -> SMCResult | list[SMCResult]:
    """The SMC loop behind ``smc`` and ``importance_sample``, with explicit generators (one,
    or one per target). ``trace`` (one target, no resampling) records per-step tensors for
    twist training. Returns a result, or a list for a list of targets."""
    targets, single = as_list(target)
    generators = list(generator) if isinstance(generator, Sequence) else [generator] + seeded_generators(
        generator.initial_seed(), len(targets), generator.device)[1:]
    references = _references(targets, [reference] if single and reference is not None else reference, resample)
    prop = make_proposal(twist, proposal, proposal_beta)
    _check(targets, n, ess_threshold, on_extinction, trace, generators)
    scheme = get_scheme(resample)
    results = []
    for chunk in chunks(targets, n, max_rows):
        batch = [targets[g] for g in chunk]
        every = TokenStepBoundary() if any(t.steps is not None for t in batch) else Boundary()  # Steps end chains
        sampler = engine.Sampler(prop, every, PrefixCritic(use_prefix, prop.prefix_powers), Resample(scheme, ess_threshold))

        def on_extinct(g: int, t: int, died: int, batch: list[Target] = batch) -> None:
            extinct(batch[g], t, died, n, on_extinction, used_prefix=use_prefix)

        done = engine.run(batch, n, sampler, [generators[g] for g in chunk],
                          references=[references[g] for g in chunk] if references is not None else None,
                          observe=trace, progress=progress, on_extinct=on_extinct)
        if trace is not None:
            for boundary in done.steps:
                trace.finish(boundary.rows[boundary.finished], boundary.log_psi_now[boundary.finished])
        meta = {**(info or {}), "resample": getattr(scheme, "__name__", str(resample)),
                "ess_threshold": ess_threshold, "proposal": prop.name, "reference": references is not None,
                "seconds": done.seconds, "batch_targets": len(batch),
                "compute": {k: v / len(batch) for k, v in done.compute.items()}}  # this target's share
        results += [_result(done.particles, done.steps, g, tg, meta) for g, tg in enumerate(batch)]
    return results[0] if single else results


def _result(particles: Particles, steps: list[StepInfo], g: int, target: Target, meta: dict) -> SMCResult:
    """Target g's run: its samples, final weights, log Z-hat, ESS and ancestry per step it ran."""
    rows, n = particles.of(g), particles.n
    ran = [(s, a) for s, a in zip(steps, particles.ancestry, strict=True) if not math.isnan(float(s.ess[g]))]
    log_w = particles.log_w[rows]
    log_z = float(particles.log_z[g] + log_mean_exp(log_w))
    toks = [particles.tokens[k, : particles.lengths[k]].tolist() for k in range(rows.start, rows.stop)]
    extinct_at = [s.t for s in steps if s.extinct[g]]
    return SMCResult(
        samples=target.sequences(toks).texts, tokens=toks, log_weights=log_w.tolist(),
        log_z=-math.inf if extinct_at else log_z, ess=[float(s.ess[g]) for s, _ in ran],
        resampled_at=[s.t for s, _ in ran if s.resampled[g]], ancestry=[(a[rows] - g * n).tolist() for _, a in ran],
        method="smc" if meta["ess_threshold"] > 0 else "is",
        info={**meta, "prompt": target.prompt, "chat": target.chat, "n_particles": n,
              "max_new_tokens": target.max_new_tokens, "potential": str(target.potential),
              "model": target.model.name, "dtype": target.model.dtype_name,
              "device": str(target.model.device),
              "extinct_at": extinct_at[0] if extinct_at else None},
    )


def _references(targets: list[Target], reference, resample) -> list[list[int] | None] | None:
    if reference is None:
        return None
    if len(reference) != len(targets):
        raise ValueError(f"give one reference per target ({len(targets)}), got {len(reference)}")
    out = []
    for target, ref in zip(targets, reference, strict=True):
        ref = None if ref is None else [int(v) for v in ref]
        if ref is not None and (not ref or len(ref) > target.max_new_tokens or not target.is_complete(ref)):
            raise ValueError(
                f"the reference must be a complete sequence (ending at EOS or with exactly "
                f"max_new_tokens={target.max_new_tokens} tokens), got {len(ref)} tokens")
        out.append(ref)
    if resample not in ("multinomial", "systematic"):
        raise ValueError("conditional SMC resamples the free particles multinomially; leave resample at its default")
    return out


def _check(targets, n, ess_threshold, on_extinction, trace, generators) -> None:
    if trace is not None and (ess_threshold > 0 or len(targets) > 1):
        raise ValueError("a trace needs one target and ess_threshold=0 (no resampling)")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"need at least one particle, got {n!r}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    if on_extinction not in ("warn", "raise", "return"):
        raise ValueError(f"on_extinction must be 'warn', 'raise' or 'return', got {on_extinction!r}")
    if len(generators) != len(targets):
        raise ValueError(f"give one generator per target ({len(targets)}), got {len(generators)}")
