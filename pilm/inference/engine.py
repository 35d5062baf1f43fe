"""One particle engine for every sampler: token SMC, step-level particle filters, particle
Gibbs, PRM-guided search and independent chains.

M targets x N particles, rows target-major (rows g*N .. g*N+N-1 are target g's), advance as
one batch. A run alternates two moves, Algorithm 1 of Zhao et al. (2024) and Algorithm 1 of
Puri et al. (2025) at once:

1. **advance**: every running row draws tokens from the proposal q, one model forward per
   token for all rows, until it reaches its *boundary* (``pilm.inference.boundaries``: after
   every token for token SMC, at a step delimiter for reasoning; a finished row ends there
   too). A row at its boundary waits (the forward appends nothing to it) while the others
   finish their step. Each draw multiplies the row's weight by p_M(s_t) / q(s_t), with p_M
   the base model at the run's temperature (the factor is 1 where q = p_M).
2. **at the boundary** the critic (``pilm.inference.critics``) gives log psi_t of each row
   that stepped, and log phi where it finished; each target's rule (``pilm.inference.rules``)
   weighs (w *= psi_t / psi_{t-1} for SMC) and selects rows (resampling, beam selection, or
   nothing). The chosen rows, their KV cache included, are reindexed through one row map,
   never recomputed; the boundary's last draws are appended in the same forward, so token SMC
   costs one forward per token.

A ``Sampler`` is the four choices (proposal, boundary, critic, rule); the samplers of
``pilm.inference`` are façades that only choose them. The model protocol the engine needs is
``LanguageModel.start_many``, ``advance`` (with ``hold``: rows at their boundary wait) and
``reindex``, and the full-vocabulary ``logprobs`` of every row (``pilm.models.base``); on a
backend that generates by requests instead (``generates_steps``: a serving engine), the advance
move is ``pilm.inference.native``'s, and the rest is the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models.base import ModelState
from ..proposals import BaseProposal, Proposal
from ..target import Target
from . import native
from .critics import Critic, Stepped
from .particles import Particles, Run, Sampler, StepInfo, check_drawn, draw, host_twins, log_base_at, to_host
from .rules import Decision, View

Observer = Callable[[Tensor, ModelState, Tensor, Tensor, Tensor], None]
"""Called at every draw with (rows, the state drawn from, the tokens, log p0 and log q of them)."""


@torch.no_grad()
def run(targets: Sequence[Target], n: int, sampler: Sampler, generators: Sequence[torch.Generator], *,
        references: Sequence[Sequence[int] | None] | None = None, observe: Observer | None = None,
        on_extinct: Callable[[int, int, int], None] | None = None, progress: bool = False,
        desc: str = "smc") -> Run:
    """Run ``sampler`` on ``targets`` with ``n`` particles each until every row has finished
    (module docstring). ``references``: per target, a complete sequence that particle 0 is
    forced to follow (conditional SMC; the rule keeps it), or ``None``. ``on_extinct(g, t,
    died)`` is told when target g's weights all reach 0 at boundary t."""
    started = time.perf_counter()
    model, m = targets[0].model, len(targets)
    horizon = max(t.max_new_tokens for t in targets)
    if model.generates_steps:
        native.check(model, sampler, observe is not None)
    particles = Particles.start(m, n, horizon)
    references = None if references is None else [None if r is None else list(r) for r in references]  # ours to change
    for part in (sampler.proposal, sampler.boundary, sampler.critic):
        part.begin(targets, n)
    state = None if model.generates_steps else model.start_many([t.prompt_ids for t in targets], n)
    prefilled = state is not None  # a backend that generates by requests keeps no state here
    compute = {"tokens": 0, "forwards": int(prefilled), "forward_rows": m * n * prefilled, "held_rows": 0}
    ends = _Ends(targets, n)
    resamplers = host_twins(generators)
    steps: list[StepInfo] = []
    total = horizon if sampler.boundary.every_token else None
    with tqdm(total=total, desc=desc, unit=sampler.boundary.unit, disable=not progress, leave=False) as bar:
        while len(particles.running):
            particles, state, info = step(particles, state, sampler, targets, generators, references=references,
                                          observe=observe, compute=compute, ends=ends, resamplers=resamplers)
            for g in info.extinct.nonzero().squeeze(1).tolist():
                if on_extinct is not None:
                    on_extinct(g, info.t, int(info.died[g]))
            steps.append(info)
            bar.update(1)
    compute.update(sampler.proposal.compute)
    return Run(particles, steps, compute, time.perf_counter() - started)


class _Ends:
    """Each row's stop token and horizon (from its target), for the finished test."""

    def __init__(self, targets: Sequence[Target], n: int):
        self.stop = torch.tensor([-1 if t.stop_token_id is None else t.stop_token_id for t in targets]
                                 ).repeat_interleave(n)
        self.horizon = torch.tensor([t.max_new_tokens for t in targets]).repeat_interleave(n)

    def finished(self, rows: Tensor, last: Tensor, lengths: Tensor) -> Tensor:
        return (last == self.stop[rows]) | (lengths == self.horizon[rows])


def step(particles: Particles, state: ModelState | None, sampler: Sampler, targets: Sequence[Target],
         generators: Sequence[torch.Generator], *, references=None, observe: Observer | None = None,
         compute: dict | None = None, ends: _Ends | None = None,
         resamplers: Sequence[torch.Generator] | None = None) -> tuple[Particles, ModelState | None, StepInfo]:
    """One boundary for every running row: advance each to its boundary, score, weigh and
    select (module docstring). ``resamplers``: the rules' generators (default ``generators``;
    ``run`` gives host twins, ``particles.host_twins``). Returns the new particles, the model
    state of the rows still running (``None`` when none is, or on a backend that generates
    natively, which keeps no state: ``pilm.inference.native``) and what the boundary did."""
    model = targets[0].model
    compute = {} if compute is None else compute
    ends = ends or _Ends(targets, particles.n)
    live = particles.running
    if state is None:
        p = native.advance(model, particles, sampler, targets, generators, references, compute, ends)
        drawn = _Drawn(torch.zeros(len(p.lengths), dtype=torch.float64), False, None,
                       torch.zeros(len(live), dtype=torch.bool))
    else:
        p, state, drawn = _advance(model, particles, state, sampler, generators, references, observe, compute, ends)
    last = p.tokens[live, p.lengths[live] - 1]
    finished = ends.finished(live, last, p.lengths[live])
    finished |= sampler.boundary.close(p, live, finished)
    stepped = Stepped(targets, p, live, finished, drawn.psi[live], drawn.twisted,
                      None if drawn.hidden is None else drawn.hidden[live], last, sampler.boundary.texts(live))
    now = _with_phi(stepped, sampler.critic.log_psi(stepped), sampler.critic)
    p, parents, info = _decide(p, particles.log_w, live, finished, now, sampler, resamplers or generators, references)
    going = p.running
    position = torch.full((len(parents),), -1, dtype=torch.long)
    position[live] = torch.arange(len(live))
    keep = position[parents[going]]
    sampler.critic.select(parents)
    sampler.boundary.select(parents)
    p = replace(p, step_start=p.lengths.clone())
    if not len(going) or state is None:
        return p, None, info
    row_map = None
    if len(keep) != state.n or not torch.equal(keep, torch.arange(len(keep))):  # decided on the host
        row_map = keep.to(model.device)
        sampler.proposal.reindex(row_map)
        state = model.reindex(state, row_map)
    appended = drawn.pending[keep]  # rows whose last draw is not in the cache yet
    if appended.any():
        hold = None if appended.all() else ~appended
        on_device = drawn.last if hold is None else None  # the same tokens, still there: no transfer
        fed = p.tokens[going, p.lengths[going] - 1] if on_device is None else on_device if row_map is None else on_device[row_map]
        state = _forward(model, sampler.proposal, state, fed, hold, compute)
    return p, state, info


def _forward(model, proposal: Proposal, state: ModelState, tokens: Tensor, hold: Tensor | None,
             compute: dict) -> ModelState:
    """Append one token per row (rows in ``hold`` wait), model and proposal in lock-step."""
    tokens, hold = tokens.to(model.device), None if hold is None else hold.to(model.device)
    proposal.advance(tokens, hold)
    compute["forwards"] = compute.get("forwards", 0) + 1
    compute["forward_rows"] = compute.get("forward_rows", 0) + len(tokens)
    compute["held_rows"] = compute.get("held_rows", 0) + (0 if hold is None else int(hold.sum()))
    return model.advance(state, tokens, hold=hold)


@dataclass
class _Drawn:
    """What advancing to the boundary left per row: ``psi`` the proposal's log psi at the row's
    last draw (0 where it has none; ``twisted``: it is a twist, not a token mask), ``hidden``
    the state a row's last token was drawn from (when the critic reads it), per state row
    ``pending``: its last draw is still to be appended, and ``last``: those draws where they
    are still on the model's device (when every state row drew last; else None)."""

    psi: Tensor
    twisted: bool
    hidden: Tensor | None
    pending: Tensor
    last: Tensor | None = None


def _advance(model, p: Particles, state: ModelState, sampler: Sampler, generators, references, observe, compute,
             ends: _Ends) -> tuple[Particles, ModelState, _Drawn]:
    """Draw tokens for every running row until each reaches its boundary (module docstring)."""
    proposal, n, live = sampler.proposal, p.n, p.running
    waiting = torch.zeros(len(live), dtype=torch.bool)
    tokens, lengths, log_w = p.tokens.clone(), p.lengths.clone(), p.log_w.clone()
    psi = torch.zeros(len(lengths), dtype=torch.float64)
    hidden = torch.zeros(len(lengths), state.hidden.shape[-1]) if sampler.critic.reads_hidden else None
    same = isinstance(proposal, BaseProposal) and proposal.temperature == sampler.temperature
    while True:
        idx = (~waiting).nonzero().squeeze(1)
        rows, everyone = live[idx], len(idx) == len(live)
        prefixes = ([tuple(r[:k]) for r, k in zip(tokens[live].tolist(), lengths[live].tolist(), strict=True)]
                    if proposal.needs_prefixes else None)
        proposed = proposal.propose(state, prefixes)
        at = None if everyone else idx.to(proposed.log_q.device)
        log_q = proposed.log_q if everyone else proposed.log_q[at]
        on_device = draw(log_q, rows // n, generators)
        for g, ref in enumerate(references or []):
            first = (rows == g * n).nonzero()
            if ref is not None and len(first):  # the reference particle is still drawing
                on_device[int(first[0, 0])] = ref[int(lengths[g * n])]
        pick = on_device.unsqueeze(1)
        logprobs = state.logprobs if everyone else state.logprobs[at]
        read = {"lq": log_q.gather(1, pick).squeeze(1), "lp0": logprobs.gather(1, pick).squeeze(1)}
        if not same:  # the weight p_M(s_t) / q(s_t)
            read["base"] = log_base_at(logprobs, pick, read["lp0"], sampler.temperature)
        if proposed.log_psi is not None:
            read["psi"] = (proposed.log_psi if everyone else proposed.log_psi[at]).gather(1, pick).squeeze(1)
        drawn, read = to_host(on_device, read)
        lq, lp0 = read["lq"], read["lp0"]
        check_drawn(rows, lq, n)
        if not same:
            log_w[rows] += read["base"].double() - lq.double()
        if proposed.log_psi is not None:
            psi[rows] = read["psi"].double()
            if proposal.keeps_prefix_scores:  # a token mask: 0 where the draw is allowed, -inf where nothing was
                log_w[rows] += psi[rows]
        if observe is not None:
            observe(rows, state, drawn, lp0, lq)
        compute["tokens"] = compute.get("tokens", 0) + len(rows)
        pos = lengths[rows]
        tokens[rows, pos], lengths[rows] = drawn, pos + 1
        done = ends.finished(rows, drawn, pos + 1)
        ended = done | sampler.boundary.ends(rows, drawn, tokens, lengths, p.step_start, done)
        if hidden is not None and ended.any():
            hidden[rows[ended]] = state.hidden[idx[ended].to(state.hidden.device)].float().cpu()
        active = ~waiting
        waiting[idx[ended]] = True
        if waiting.all():
            pending, last = active, on_device if everyone else None
            break
        feed = torch.zeros(len(live), dtype=torch.long)
        feed[idx] = drawn
        hold = ~active
        del proposed, log_q, logprobs  # (n, V) tensors the model may free before its next forward
        state = _forward(model, proposal, state, feed, hold if hold.any() else None, compute)
    twisted = proposed.log_psi is not None and not proposal.keeps_prefix_scores
    return replace(p, tokens=tokens, lengths=lengths, log_w=log_w), state, _Drawn(psi, twisted, hidden, pending, last)


def _with_phi(b: Stepped, log_psi: Tensor, critic: Critic) -> Tensor:
    """The critic's log psi, with log phi where a row finished: its target's potential, or
    (for a target without one, under a critic whose last score is phi: a PRM) the critic's."""
    out = log_psi.double()
    if not b.finished.any():
        return out
    out = out.clone()
    for g in b.groups[b.finished].unique().tolist():
        target = b.targets[g]
        end = (b.groups == g) & b.finished
        if end.any() and (target.potential is not None or not critic.scores_phi):
            out[end] = target.log_potential(b.prefixes(end)).double()
    return out


def _decide(p: Particles, before: Tensor, live: Tensor, finished: Tensor, now: Tensor, sampler: Sampler, generators,
            references) -> tuple[Particles, Tensor, StepInfo]:
    """Each target's rule weighs and selects its rows; extinct targets (every weight 0) end."""
    m, n, rule = p.m, p.n, sampler.rule
    stepped = torch.zeros(m * n, dtype=torch.bool)
    stepped[live] = True
    done = p.done.clone()
    done[live[finished]] = True
    psi_now = p.log_psi.clone()
    psi_now[live] = now
    scores = sampler.critic.scores(m * n)
    parents = torch.arange(m * n)
    log_w, log_psi, alive, log_z = p.log_w.clone(), p.log_psi.clone(), p.alive.clone(), p.log_z.clone()
    ess_of = torch.full((m,), math.nan, dtype=torch.float64)
    resampled, extinct = torch.zeros(m, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)
    died = torch.zeros(m, dtype=torch.long)
    decided: dict[int, Decision] = {}
    for g in live.div(n, rounding_mode="floor").unique().tolist():
        rows = p.of(g)
        reference = None if references is None else references[g]
        view = View(log_w[rows], log_psi[rows], psi_now[rows], scores[rows], stepped[rows], done[rows], alive[rows],
                    bool((~done[rows]).any()), reference is not None, generators[g if len(generators) > 1 else 0],
                    p.tokens[rows], p.lengths[rows], g, None if reference is None else tuple(reference))
        d = rule.decide(view)
        if d.reference is not None:  # ancestor sampling gave the reference a new past
            references[g] = list(d.reference)
        ess_of[g] = d.ess
        if rule.weighs and d.parents is None and torch.isneginf(d.log_w[d.alive]).all():
            extinct[g], log_z[g], done[rows], log_w[rows] = True, -math.inf, True, -math.inf
            died[g] = int((torch.isfinite(before[rows]) & torch.isneginf(d.log_w)).sum())
            continue
        log_psi[rows], log_z[g] = d.log_psi, log_z[g] + d.log_z
        decided[g] = d
        if d.parents is not None:
            parents[rows] = g * n + d.parents
            resampled[g] = True
    moved = replace(p, done=done, log_w=log_w, log_psi=log_psi, alive=alive, log_z=log_z, t=p.t + 1,
                    ancestry=p.ancestry + (parents,)).select(parents)
    log_w, alive, done = moved.log_w.clone(), moved.alive.clone(), moved.done.clone()
    for g, d in decided.items():
        rows = p.of(g)
        log_w[rows], alive[rows] = d.log_w, d.alive
    done |= ~alive
    if rule.importance and sampler.boundary.drops_dead:  # a row at weight 0 stays so: it draws no more
        done |= torch.isneginf(log_w)
    info = StepInfo(p.t + 1, live, finished, now, ess_of, resampled, extinct, died)
    return replace(moved, log_w=log_w, alive=alive, done=done), parents, info
