"""Particles and one SMC step, for M targets x N particles advanced as one batch.

Rows are target-major: particles ``g*N .. g*N+N-1`` belong to target g, and each target's
resampling, ESS and log Z-hat stay within its own particles. ``smc_step`` is one iteration
of Algorithm 1 of Zhao et al. 2024 (Twisted SMC) for every target at once:

1. propose: log q(. | s_{<t}) of every running row (one forward already made it);
2. draw s_t ~ q (each target from its own generator), the reference particle of conditional
   SMC excepted, which is forced to its own next token;
3. reweight: w *= alpha_t = p0(s_t) psi_t(s_{1:t}) / (psi_{t-1}(s_{<t}) q(s_t)) with psi_t
   the twist at the drawn token, or the potential's prefix score, and phi where a row ends;
4. resample each target whose ESS fell below threshold * N (threshold 1: every step): add
   its log-mean weight to log Z-hat, draw ancestors, reset the weights;
5. the rows still running go on: their parents' KV-cache rows are reindexed (never
   recomputed) and the drawn tokens advanced in one forward (``decode_step``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..models.base import ModelState, decode_step
from ..proposals import Proposal, incremental_log_weight, log_mean_exp
from ..target import Target
from .resampling import Scheme, ess, multinomial


@dataclass(frozen=True)
class Particles:
    """M targets x N particles. ``tokens`` (R, T) right-padded with -1, ``lengths``, ``done``
    (ended at the stop token or the horizon, or its target went extinct), ``log_w`` (log weight
    since the target's last resampling, float64), ``log_psi`` (log psi_{t-1} of each prefix),
    ``log_z`` (M,) (log Z-hat of each target's completed resampling epochs), ``ancestry``
    (per step, the global parent row of every row), ``t`` (steps taken)."""

    tokens: Tensor
    lengths: Tensor
    done: Tensor
    log_w: Tensor
    log_psi: Tensor
    log_z: Tensor
    n: int
    t: int = 0
    ancestry: tuple[Tensor, ...] = ()

    @classmethod
    def start(cls, m: int, n: int, horizon: int) -> Particles:
        r = m * n
        zeros = torch.zeros(r, dtype=torch.float64)
        return cls(torch.full((r, horizon), -1, dtype=torch.long), torch.zeros(r, dtype=torch.long),
                   torch.zeros(r, dtype=torch.bool), zeros, zeros.clone(), torch.zeros(m, dtype=torch.float64), n)

    @property
    def m(self) -> int:
        return len(self.log_z)

    @property
    def running(self) -> Tensor:
        """Rows still drawing tokens, in order: row i of the model's state is particle running[i]."""
        return (~self.done).nonzero().squeeze(1)

    def of(self, g: int) -> slice:
        """The rows of target g."""
        return slice(g * self.n, (g + 1) * self.n)

    def select(self, parents: Tensor) -> Particles:
        """Row k becomes a copy of row ``parents[k]`` (weights included)."""
        return replace(self, tokens=self.tokens[parents], lengths=self.lengths[parents], done=self.done[parents],
                       log_w=self.log_w[parents], log_psi=self.log_psi[parents])


@dataclass(frozen=True)
class Resampling:
    """When and how to resample: ``scheme``, when ESS < ``threshold`` * N (0: never, as in
    importance sampling; 1: at every step, decided without comparing floats), and
    ``conditional`` (particle 0 of each target is the reference: kept, and the N-1 others
    draw their ancestors multinomially from all N: conditional SMC, Andrieu et al. 2010)."""

    scheme: Scheme
    threshold: float
    conditional: bool = False

    def due(self, ess_value: float, n: int) -> bool:
        return self.threshold >= 1.0 or ess_value < self.threshold * n

    def ancestors(self, log_w: Tensor, generator: torch.Generator) -> Tensor:
        n = len(log_w)
        if not self.conditional:
            return self.scheme(log_w, n, generator)
        free = multinomial(log_w, n - 1, generator) if n > 1 else torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.zeros(1, dtype=torch.long), free])


@dataclass(frozen=True)
class StepInfo:
    """What one step did. Per running row (in the model's row order): ``rows`` (particle
    index), ``drawn``, ``log_p0`` and ``log_q`` of the drawn token, ``finished``,
    ``log_psi_now`` (log psi_t, or log phi where finished). Per target: ``ess`` (NaN where none of its particles ran), ``resampled``,
    ``extinct`` (every weight became 0 at this step), ``died`` (how many of its particles
    went to weight 0 at this step)."""

    t: int
    rows: Tensor
    drawn: Tensor
    log_p0: Tensor
    log_q: Tensor
    finished: Tensor
    log_psi_now: Tensor
    ess: Tensor
    resampled: Tensor
    extinct: Tensor
    died: Tensor


def draw(log_q: Tensor, groups: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One token per row from exp(log_q), each target's rows (contiguous) from its own
    generator, on the device the probabilities live on; returned on the CPU."""
    probs = log_q.exp()
    if len(generators) == 1:
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(1).cpu()
    ids, counts = torch.unique_consecutive(groups, return_counts=True)
    blocks = probs.split(counts.tolist())
    return torch.cat([torch.multinomial(b, 1, generator=generators[g]).squeeze(1).cpu()
                      for g, b in zip(ids.tolist(), blocks, strict=True)])


def smc_step(
    particles: Particles, state: ModelState, proposal: Proposal, generators: Sequence[torch.Generator], *,
    targets: Sequence[Target], resampling: Resampling, use_prefix: bool = True,
    references: Sequence[Sequence[int] | None] | None = None,
) -> tuple[Particles, ModelState | None, StepInfo]:
    """One SMC step for every running particle (see the module docstring). Returns the new
    particles, the model state of the rows still running (``None`` when none is) and what
    the step did."""
    n, t, rows = particles.n, particles.t + 1, particles.running
    groups = rows // n
    prefixes = [tuple(p) for p in particles.tokens[rows, : t - 1].tolist()] if proposal.needs_prefixes else None
    proposed = proposal.propose(state, prefixes)
    drawn = draw(proposed.log_q, groups, generators)
    for g, ref in enumerate(references or []):
        at = (rows == g * n).nonzero()
        if ref is not None and len(at):  # the reference particle is still running
            drawn[at[0, 0]] = ref[t - 1]
    tokens, lengths = particles.tokens.clone(), particles.lengths.clone()
    tokens[rows, t - 1], lengths[rows] = drawn, t
    stops = torch.tensor([-1 if tg.stop_token_id is None else tg.stop_token_id for tg in targets])[groups]
    ends = torch.tensor([tg.max_new_tokens for tg in targets])[groups]
    finished = (drawn == stops) | (ends == t)
    pick = drawn.to(proposed.log_q.device).unsqueeze(1)
    log_p0, log_q = (x.gather(1, pick).squeeze(1).cpu() for x in (state.logprobs, proposed.log_q))
    twist = proposed.log_psi.gather(1, pick).squeeze(1).cpu() if proposed.log_psi is not None else None
    psi_now = _log_psi_now(targets, groups, tokens[rows, :t], finished, twist,
                           use_prefix and (twist is None or proposal.keeps_prefix_scores))
    log_w, log_psi, done = particles.log_w.clone(), particles.log_psi.clone(), particles.done.clone()
    alive_before = torch.isfinite(log_w)
    log_w[rows] += incremental_log_weight(log_p0, psi_now, log_psi[rows], log_q)
    log_psi[rows], done[rows[finished]] = psi_now, True
    moved = replace(particles, tokens=tokens, lengths=lengths, done=done, log_w=log_w, log_psi=log_psi, t=t)
    moved, parents, info = _resample(moved, groups.unique(), alive_before, generators, resampling)
    going = moved.running
    row_of = torch.full((len(parents),), -1, dtype=torch.long)
    row_of[rows] = torch.arange(len(rows))
    following = (decode_step(targets[0].model, state, row_of[parents[going]], tokens[parents[going], t - 1], proposal)
                 if len(going) else None)
    return moved, following, StepInfo(t, rows, drawn, log_p0, log_q, finished, psi_now, **info)


def _resample(particles: Particles, active: Tensor, alive_before: Tensor, generators, resampling: Resampling):
    """Resample every active target that is due; mark extinct ones (all weights 0) done."""
    m, n = particles.m, particles.n
    parents = torch.arange(m * n)
    log_w, log_z, done = particles.log_w.clone(), particles.log_z.clone(), particles.done.clone()
    ess_of = torch.full((m,), math.nan, dtype=torch.float64)
    resampled, extinct = torch.zeros(m, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)
    died = (alive_before & torch.isneginf(log_w)).view(m, n).sum(1)
    for g in active.tolist():
        rows = particles.of(g)
        if torch.isneginf(log_w[rows]).all():
            extinct[g], log_z[g], done[rows] = True, -math.inf, True
            continue
        ess_of[g] = ess(log_w[rows])
        if not done[rows].all() and resampling.due(float(ess_of[g]), n):
            log_z[g] += log_mean_exp(log_w[rows])
            parents[rows] = g * n + resampling.ancestors(log_w[rows], generators[g if len(generators) > 1 else 0])
            log_w[rows], resampled[g] = 0.0, True
    out = replace(particles, done=done, log_w=log_w, log_z=log_z, ancestry=particles.ancestry + (parents,))
    return out.select(parents), parents, {"ess": ess_of, "resampled": resampled, "extinct": extinct, "died": died}


def _log_psi_now(targets: Sequence[Target], groups: Tensor, prefixes: Tensor, finished: Tensor,
                 twist_drawn: Tensor | None, use_prefix: bool) -> Tensor:
    """log psi_t(s_{1:t}) of the rows that just drew s_t: log phi of their target where
    finished, else the twist at the drawn token (if any) or the target's prefix score (if
    used)."""
    out = torch.zeros(len(prefixes), dtype=torch.float64)
    if twist_drawn is not None:
        out += twist_drawn.double()
    for g in groups.unique().tolist():
        target, mine = targets[g], groups == g
        end, going = mine & finished, mine & ~finished
        if end.any():
            out[end] = target.log_potential(prefixes[end].tolist()).double()
        if use_prefix and target.has_prefix_potential and going.any():
            out[going] += target.log_prefix_potential(prefixes[going].tolist()).double()
    return out
