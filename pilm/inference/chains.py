"""Step-level runs on the particle engine: reasoning chains cut into steps, scored by a
process reward at every step boundary, weighed and selected by a rule; one ``StepResult`` per
target. The particle filters, particle Gibbs, PRM searches and independent chains differ only
in the rule (and, for a filter, the proposal).

M targets x N chains are drawn token by token from the policy p_M (the base model at
``temperature``, or a proposal q corrected towards it by the weights): one forward per token
for every row inside a step. A row whose step has ended waits until every running row has
ended its step (``pilm.inference.boundaries.StepBoundary``); at that boundary the process
reward scores every row that just ended a step in one batched call
(``pilm.inference.critics.ProcessRewardCritic``), the rule weighs and selects, and the KV
cache rows of the chosen parents are reindexed, never recomputed. A chain finishes at the
target's stop token or horizon, after ``Steps.max_steps`` steps, or with a step matching
``Steps.final``; finished chains leave the forward but stay in the pool.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ..errors import ExtinctionWarning, ImpossibleTargetError
from ..prm import ProcessReward
from ..proposals import BaseProposal, Proposal, log_mean_exp
from ..proposals.masked import MaskedProposal
from ..steps import Steps
from ..target import Target
from . import engine
from .boundaries import StepBoundary
from .critics import Critic, PrefixCritic, ProcessRewardCritic
from .result import StepResult
from .rules import Rule


def run_steps(
    targets: Sequence[Target], n: int, prm: ProcessReward | None, rule: Rule, generators: Sequence[torch.Generator],
    *, temperature: float = 1.0, aggregation: str = "last", steps: Steps | None = None,
    references: Sequence[Sequence[int] | None] | None = None, method: str = "pf-twisted", desc: str | None = None,
    on_extinction: str = "warn", progress: bool = False, info: dict | None = None, mask: bool = False,
    proposal: Proposal | None = None,
) -> list[StepResult]:
    """Run ``rule`` over step boundaries for every target (module docstring). ``prm=None``:
    the potential's prefix score is the critic (psi = 1 without one). ``steps`` overrides the
    targets' own ``Steps``; ``mask`` draws only tokens the targets' potentials allow;
    ``proposal`` (default: p_M itself) is any ``Proposal``, corrected towards p_M by the
    weights. ``method`` names the results, ``desc`` (default: ``method``) the progress bar and
    ``info["method"]``."""
    desc = desc or method
    if proposal is None:
        proposal = MaskedProposal(temperature=temperature) if mask else BaseProposal(temperature)
    critic: Critic = PrefixCritic(residual=proposal.prefix_powers) if prm is None else ProcessRewardCritic(prm, aggregation)
    judged = prm.lm_tokens if prm is not None else 0  # a PRM object may serve several runs: count this one's
    boundary = StepBoundary(steps)
    done = engine.run(targets, n, engine.Sampler(proposal, boundary, critic, rule, temperature), generators,
                      references=references, progress=progress, desc=desc,
                      on_extinct=lambda g, t, died: _extinct(targets[g], t, n, prm, on_extinction))
    model, m = targets[0].model, len(targets)
    compute = {**done.compute, "prm_calls": getattr(critic, "calls", 0),
               "prm_lm_tokens": prm.lm_tokens - judged if prm is not None else 0, "seconds": done.seconds}
    meta = {**(info or {}), "method": desc, "rule": rule.name, "temperature": temperature,
            "aggregation": aggregation, "prm": None if prm is None else prm.name, "n_particles": n,
            "batch_targets": m, "model": model.name, "dtype": model.dtype_name,
            "device": str(model.device), "boundaries": len(done.steps)}
    return [_result(targets[g], done, g, critic, boundary, rule, aggregation, method, meta, compute) for g in range(m)]


def _result(target: Target, done: engine.Run, g: int, critic: Critic, boundary: StepBoundary, rule: Rule,
            aggregation: str, method: str, meta: dict, compute: dict) -> StepResult:
    p = done.particles
    rows = p.of(g)
    toks = [p.tokens[k, : p.lengths[k]].tolist() for k in range(rows.start, rows.stop)]
    log_w, alive = p.log_w[rows], p.alive[rows]
    texts = target.sequences(toks).texts
    history = getattr(critic, "history", None)
    scores = [list(history[k]) if history is not None else [] for k in range(rows.start, rows.stop)]
    extinct_at = next((s.t for s in done.steps if s.extinct[g]), None)
    if extinct_at is not None:
        estimate = -math.inf
    elif rule.weighs:
        estimate = float(p.log_z[g] + log_mean_exp(log_w[alive]))
    else:
        estimate = math.nan
    m = p.m
    share = {k: v / m for k, v in compute.items()}  # this target's share of the batch's compute
    cut = boundary.cuts[g]
    return StepResult(
        samples=texts, tokens=toks, steps=[list(boundary.steps[k]) for k in range(rows.start, rows.stop)],
        scores=scores, answers=[cut.answer(t) for t in texts], log_weights=log_w.tolist(),
        alive=alive.tolist(), log_z=estimate, ess=[float(s.ess[g]) for s in done.steps if not math.isnan(s.ess[g])],
        resampled_at=[s.t for s in done.steps if s.resampled[g]], aggregation=aggregation,
        importance=rule.importance, method=method,
        info={**meta, **share, "cut_steps": int(boundary.cut[rows].sum()), "extinct_at": extinct_at,
              "question": target.question},
        ancestry=[(a[rows] - g * p.n).tolist() for s, a in zip(done.steps, p.ancestry, strict=True)
                  if bool((s.rows // p.n == g).any())],  # the boundaries this target's rows reached
    )


def _extinct(target: Target, boundary: int, n: int, prm, policy: str) -> None:
    head = (f"step {boundary}: all {n} particles of the chain for {target.question!r} have score 0 "
            f"under {prm.name if prm is not None else 'the potential'}")
    if policy == "raise":
        raise ImpossibleTargetError(f"{head}: nothing the policy proposed can be right. Use more particles or "
                                    "check the process reward.")
    if policy == "warn":
        warnings.warn(ExtinctionWarning(f"{head}, so this run estimates Z-hat = 0 (log_z = -inf). Use more "
                                        "particles or a softer process reward."), stacklevel=5)
