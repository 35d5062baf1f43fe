"""The step-level engine behind the particle filter, particle Gibbs, PRM search and voting.

M targets x N particles (rows target-major, as in ``particles.py``) are drawn token by
token from the policy p_M (the base model at ``temperature``): one forward per token for
every row that is inside a step. A row whose step has ended (``pilm.steps.Steps``) waits,
appending nothing (``LanguageModel.advance(hold=...)``), until every running row has ended
its step. At that *boundary* the process reward scores every row that just ended a step
in one batched call, a ``Rule`` weighs and selects the rows of each target (resampling,
beam selection, nothing), and the KV cache rows of the chosen parents are reindexed,
never recomputed. A chain finishes at the target's stop token or horizon, after
``Steps.max_steps`` steps, or with a step matching ``Steps.final``; finished chains leave
the forward but stay in the pool (they can still be selected, and copies of them stay
finished).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ExtinctionWarning, ImpossibleTargetError
from ..prm import ProcessReward, StepBatch, aggregate, checked_scores
from ..proposals import BaseProposal, log_mean_exp, token_masks
from ..steps import Steps
from ..target import Target
from .particles import draw
from .result import StepResult
from .rules import Boundary, Rule
from .smc import _as_list as as_list


@dataclass
class _Chains:
    """Per-row bookkeeping (rows target-major). Tensors over rows; lists for the texts."""

    tokens: Tensor
    lengths: Tensor
    done: Tensor
    alive: Tensor
    step_start: Tensor
    log_w: Tensor
    log_psi: Tensor
    steps: list[list[str]]
    scores: list[list[float]]
    cut: Tensor
    texts: list[str] = field(default_factory=list)  # the running step's text, from cached token pieces

    @classmethod
    def start(cls, r: int, horizon: int) -> _Chains:
        z = torch.zeros(r, dtype=torch.float64)
        return cls(torch.full((r, horizon), -1, dtype=torch.long), torch.zeros(r, dtype=torch.long),
                   torch.zeros(r, dtype=torch.bool), torch.ones(r, dtype=torch.bool), torch.zeros(r, dtype=torch.long),
                   z, z.clone(), [[] for _ in range(r)], [[] for _ in range(r)], torch.zeros(r, dtype=torch.long),
                   [""] * r)

    def select(self, parents: Tensor) -> None:
        p = parents.tolist()
        for name in ("tokens", "lengths", "done", "alive", "step_start", "log_w", "log_psi", "cut"):
            setattr(self, name, getattr(self, name)[parents])
        self.steps = [list(self.steps[i]) for i in p]
        self.scores = [list(self.scores[i]) for i in p]
        self.texts = [self.texts[i] for i in p]


def step_targets(target: Target | Sequence[Target], step: str | int | object | None) -> tuple[list[Target], bool]:
    """The targets as a list (and whether one was given), with ``step`` as their delimiter."""
    targets, single = as_list(target)
    if step is not None:
        targets = [replace(t, steps=replace(t.steps or Steps(), delimiter=step)) if (t.steps is None or
                   t.steps.delimiter != step) else t for t in targets]
    return targets, single


def run_steps(
    targets: Sequence[Target], n: int, prm: ProcessReward | None, rule: Rule, generators: Sequence[torch.Generator],
    *, temperature: float = 1.0, aggregation: str = "last", steps: Steps | None = None,
    references: Sequence[Sequence[int] | None] | None = None, method: str = "particle filter",
    on_extinction: str = "warn", progress: bool = False, info: dict | None = None, mask: bool = False,
) -> list[StepResult]:
    """Run ``rule`` over step boundaries for every target (module docstring); one
    ``StepResult`` per target. ``steps`` overrides the targets' own ``Steps``. ``mask``: draw
    only tokens the target's potential allows (``_masked``)."""
    started = time.perf_counter()
    judged = prm.lm_tokens if prm is not None else 0  # a PRM object may serve several runs: count this one's
    model = targets[0].model
    cuts = [steps or t.steps or Steps() for t in targets]
    m, r = len(targets), len(targets) * n
    horizon = max(t.max_new_tokens for t in targets)
    proposal = BaseProposal(temperature)
    chains = _Chains.start(r, horizon)
    state = model.start_many([t.prompt_ids for t in targets], n)
    live = torch.arange(r)  # state row i is chain row live[i]
    waiting = torch.zeros(r, dtype=torch.bool)
    hidden = None
    log_z = torch.zeros(m, dtype=torch.float64)
    extinct_at: list[int | None] = [None] * m
    ess_log: list[list[float]] = [[] for _ in range(m)]
    resampled: list[list[int]] = [[] for _ in range(m)]
    stops = [-1 if t.stop_token_id is None else t.stop_token_id for t in targets]
    ends = [t.max_new_tokens for t in targets]
    pieces: dict[int, str] = {}
    compute = {"tokens": 0, "forwards": 1, "forward_rows": r, "prm_calls": 0, "held_rows": 0}
    boundary = 0
    pending = torch.zeros(0, dtype=torch.bool)
    bar = tqdm(desc=method, unit="step", disable=not progress, leave=False)
    while len(live):
        # -- extend every running row to the end of its step ------------------------------------
        while True:
            active = ~waiting[live]
            if not active.any():
                break
            rows = live[active]
            groups = rows // n
            log_q = proposal.propose(state, None).log_q
            log_q = log_q[active.to(log_q.device)]
            if mask:
                log_q, log_mass = _masked(targets, chains, rows, n, log_q)
                chains.log_w[rows] += log_mass.double().cpu()
            drawn = draw(log_q, groups, generators)
            for g, ref in enumerate(references or []):
                at = (rows == g * n).nonzero()
                if ref is not None and len(at):
                    drawn[at[0, 0]] = ref[int(chains.lengths[g * n])]
            compute["tokens"] += len(rows)
            pos = chains.lengths[rows]
            chains.tokens[rows, pos] = drawn
            chains.lengths[rows] = pos + 1
            ended = torch.zeros(len(rows), dtype=torch.bool)
            for i, (row, v, length, start) in enumerate(zip(rows.tolist(), drawn.tolist(), (pos + 1).tolist(),
                                                            chains.step_start[rows].tolist(), strict=True)):
                g = row // n
                piece = pieces.get(v)
                if piece is None:
                    piece = pieces[v] = model.decode([v])
                chains.texts[row] += piece
                if v == stops[g] or length == ends[g] or cuts[g].ends(chains.texts[row], v):
                    ended[i] = True
                elif length - start == cuts[g].max_step_tokens:  # cut: the step never reached its delimiter
                    ended[i] = True
                    chains.cut[row] += 1
            if prm is not None and prm.reads_hidden:
                if hidden is None:
                    hidden = torch.zeros(r, state.hidden.shape[1])
                hidden[rows[ended]] = state.hidden[active.nonzero().squeeze(1)[ended].to(state.hidden.device)].float().cpu()
            waiting[rows[ended]] = True
            # rows that drew append their token (finished ones too, if others still need the forward)
            feed = torch.zeros(len(live), dtype=torch.long)
            feed[active] = drawn
            if (~waiting[live]).any():
                hold = ~active
                state = model.advance(state, feed.to(model.device), hold=hold if hold.any() else None)
                compute["forwards"] += 1
                compute["forward_rows"] += len(live)
                compute["held_rows"] += int(hold.sum())
            else:
                pending = active  # the boundary's last draws: appended after selection, rows that go on only
                break
        # -- the boundary ---------------------------------------------------------------------------
        boundary += 1
        stepped = torch.zeros(r, dtype=torch.bool)
        stepped[live] = True
        finished_now = torch.zeros(r, dtype=torch.bool)
        for row in live.tolist():
            g = row // n
            lo, hi = int(chains.step_start[row]), int(chains.lengths[row])
            last = int(chains.tokens[row, hi - 1])
            text = model.decode(chains.tokens[row, lo: hi - 1 if last == stops[g] else hi].tolist())
            chains.steps[row].append(text)
            finished_now[row] = (last == stops[g] or hi == ends[g] or len(chains.steps[row]) >= cuts[g].max_steps
                                 or cuts[g].is_final(text))
        if prm is not None:
            batch = StepBatch(
                questions=[targets[row // n].question for row in live.tolist()],
                prompts=[targets[row // n].prompt_ids for row in live.tolist()],
                steps=[chains.steps[row] for row in live.tolist()],
                tokens=[tuple(chains.tokens[row, : chains.lengths[row]].tolist()) for row in live.tolist()],
                hidden=hidden[live] if hidden is not None else None,
                last=chains.tokens[live, chains.lengths[live] - 1],
            )
            for row, s in zip(live.tolist(), checked_scores(prm, batch).tolist(), strict=True):
                chains.scores[row].append(s)
            compute["prm_calls"] += len(live)
        chains.done |= finished_now
        parents, decided = torch.arange(r), {}
        for g in range(m):
            rows = slice(g * n, (g + 1) * n)
            if extinct_at[g] is not None or not stepped[rows].any():
                continue
            scores = torch.tensor([aggregate(s, aggregation) if s else math.nan for s in chains.scores[rows]],
                                  dtype=torch.float64)
            d = rule.decide(Boundary(
                scores, stepped[rows], chains.done[rows], _log_phi(targets[g], chains, rows, finished_now[rows], scores),
                chains.log_w[rows], chains.log_psi[rows], chains.alive[rows], bool((~chains.done[rows]).any()),
                references is not None and references[g] is not None, generators[g if len(generators) > 1 else 0],
                [tuple(chains.tokens[k, : chains.lengths[k]].tolist()) for k in range(rows.start, rows.stop)]
                if rule.reads_chains else []))
            if not math.isnan(d.ess):
                ess_log[g].append(d.ess)
            if d.parents is None and rule.weighs and torch.isneginf(d.log_w[d.alive]).all():
                extinct_at[g], log_z[g] = boundary, -math.inf
                chains.done[rows], chains.log_w[rows] = True, -math.inf
                _extinct(targets[g], boundary, n, prm, on_extinction)
                continue
            chains.log_psi[rows] = d.log_psi
            log_z[g] += d.log_z
            decided[g] = d
            if d.parents is not None:
                parents[rows] = g * n + d.parents
                resampled[g].append(boundary)
        chains.select(parents)
        for g, d in decided.items():
            rows = slice(g * n, (g + 1) * n)
            chains.log_w[rows], chains.alive[rows] = d.log_w, d.alive
        chains.done |= ~chains.alive
        if rule.importance:  # a row at weight 0 stays so: it draws no more
            chains.done |= torch.isneginf(chains.log_w)
        going = (~chains.done).nonzero().squeeze(1)
        position = torch.full((r,), -1, dtype=torch.long)
        position[live] = torch.arange(len(live))
        keep = position[parents[going]]
        last_tokens = chains.tokens[going, chains.lengths[going] - 1]
        appended = pending[keep].to(torch.bool)  # rows whose last draw is not in the cache yet
        if len(going):
            state = model.reindex(state, keep.to(model.device))
            if appended.any():
                state = model.advance(state, last_tokens.to(model.device), hold=None if appended.all() else ~appended)
                compute["forwards"] += 1
                compute["forward_rows"] += len(going)
                compute["held_rows"] += int((~appended).sum())
            if hidden is not None:
                hidden = hidden[parents]
        chains.step_start[going] = chains.lengths[going]
        for row in going.tolist():
            chains.texts[row] = ""
        live, waiting = going, torch.zeros(r, dtype=torch.bool)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    compute["prm_lm_tokens"] = prm.lm_tokens - judged if prm is not None else 0
    compute["seconds"] = seconds
    meta = {**(info or {}), "method": method, "rule": rule.name, "temperature": temperature,
            "aggregation": aggregation, "prm": None if prm is None else prm.name, "n_particles": n,
            "batch_targets": m, "model": model.name, "dtype": model.dtype_name, "boundaries": boundary}
    return [_result(targets[g], chains, slice(g * n, (g + 1) * n), float(log_z[g]), rule, ess_log[g],
                    resampled[g], extinct_at[g], cuts[g], aggregation, meta, compute, m)
            for g in range(m)]


def _masked(targets: Sequence[Target], chains: _Chains, rows: Tensor, n: int, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """The policy restricted to the tokens each row's potential allows after its chain so far
    (``token_masks``: a format, a grammar), renormalised, and the log of the mass it had,
    log A = log sum_{v allowed} p_M(v). Carried into the chain's weight, A keeps the target
    p_M phi of importance-weighted rules (the masked proposal, token by token); a row with
    nothing allowed keeps the policy and gets weight 0."""
    block, lengths = chains.tokens[rows].tolist(), chains.lengths[rows].tolist()
    prefixes = [tokens[:length] for tokens, length in zip(block, lengths, strict=True)]
    masked = log_q.masked_fill(~token_masks(targets, rows // n, prefixes, log_q), -math.inf)
    log_mass = torch.logsumexp(masked, 1)
    return torch.where(torch.isneginf(log_mass)[:, None], log_q, masked - log_mass[:, None]), log_mass


def _log_phi(target: Target, chains: _Chains, rows: slice, finished_now: Tensor, scores: Tensor) -> Tensor:
    """log phi of the rows of ``rows`` that finished now: the target's potential if it has
    one, else log of their aggregated score (0 elsewhere)."""
    out = torch.zeros(rows.stop - rows.start, dtype=torch.float64)
    idx = finished_now.nonzero().squeeze(1)
    if not len(idx):
        return out
    if target.potential is not None:
        toks = [chains.tokens[rows.start + i, : chains.lengths[rows.start + i]].tolist() for i in idx.tolist()]
        out[idx] = target.log_potential(toks).double()
    else:
        out[idx] = scores[idx].log()
    return out


def _extinct(target: Target, boundary: int, n: int, prm, policy: str) -> None:
    head = (f"step {boundary}: all {n} particles of the chain for {target.question!r} have score 0 "
            f"under {prm.name if prm is not None else 'the potential'}")
    if policy == "raise":
        raise ImpossibleTargetError(f"{head}: nothing the policy proposed can be right. Use more particles or "
                                    "check the process reward.")
    if policy == "warn":
        warnings.warn(ExtinctionWarning(f"{head}, so this run estimates Z-hat = 0 (log_z = -inf). Use more "
                                        "particles or a softer process reward."), stacklevel=4)


def _result(target: Target, chains: _Chains, rows: slice, log_z: float, rule: Rule, ess_log, resampled,
            extinct_at, cut: Steps, aggregation: str, meta: dict, compute: dict, m: int) -> StepResult:
    toks = [chains.tokens[k, : chains.lengths[k]].tolist() for k in range(rows.start, rows.stop)]
    log_w = chains.log_w[rows]
    texts = target.sequences(toks).texts
    scores = [list(chains.scores[k]) for k in range(rows.start, rows.stop)]
    if extinct_at is not None:
        estimate = -math.inf
    elif rule.weighs:
        estimate = float(log_z + log_mean_exp(log_w[chains.alive[rows]]))
    else:
        estimate = math.nan
    share = {k: v / m for k, v in compute.items()}  # this target's share of the batch's compute
    return StepResult(
        samples=texts, tokens=toks, steps=[list(chains.steps[k]) for k in range(rows.start, rows.stop)],
        scores=scores, answers=[cut.answer(t) for t in texts], log_weights=log_w.tolist(),
        alive=chains.alive[rows].tolist(), log_z=estimate, ess=ess_log, resampled_at=resampled,
        aggregation=aggregation, importance=rule.importance,
        info={**meta, **share, "cut_steps": int(chains.cut[rows].sum()), "extinct_at": extinct_at,
              "question": target.question},
    )
