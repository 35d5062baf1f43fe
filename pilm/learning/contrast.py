"""What contrastive twist learning contrasts, beyond one draw: samples of sigma from a replay
pool (``replay_pool``, read back by ``teacher_forced``) and negatives from a twisted SMC
population (``train_twist(negatives="smc")``).

ctl's negative term at step t is E_{pi_t}[grad log psi_t], with pi_t(s_{1:t}) ∝ p0(s_{1:t}) psi_t(s_{1:t}).
One-sample ctl estimates it with self-normalised weights on one draw of independent sequences,
whose mass at t rests on a few of them; with positives from elsewhere (a replay pool) a head can
then raise psi on the pool's prefixes and lower it on the draw's without bound, since no draw
revisits the former. Twisted SMC that resamples at every step holds, before step t's draw, K
equally weighted particles that approximate pi_{t-1} (Zhao et al. 2024, Section 4). Each draws
s_t from q, and the weight

    w_t ∝ p0(s_t | s_{<t}) psi_t(s_{1:t}) / (q(s_t | s_{<t}) psi'_{t-1}(s_{<t}))

with psi' the twist that drew them and psi_t the one being trained (detached) makes them a
sample of pi_t under the current twist: those are the negatives here, reweighted at every update
(so ``reuse > 1`` reads the current twist), the learned psi_t weighing finished rows too (SMC
itself weighs those by phi). They follow the twist wherever it puts mass, so where psi grows on
the positives' prefixes the population moves there and the negative term pushes back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inference import engine
from ..inference.boundaries import Boundary, TokenStepBoundary
from ..inference.critics import PrefixCritic
from ..inference.resampling import get_scheme
from ..inference.rules import Resample
from ..inference.smc import run_smc
from ..models.device import seeded_generator
from ..proposals import make_proposal
from ..target import Target
from ..twists.base import TwistFunction
from ..twists.residual import ResidualTwist


def replay_pool(target: Target, size: int, seed: int, k: int = 256) -> list[list[int]]:
    """``size`` samples of sigma: particles resampled by weight (``SMCResult.draw``) from SMC
    runs of ``k`` particles on ``target``, which resample on its prefix score."""
    runs = -(-size // k)
    results = run_smc([target] * runs, k, seeded_generator(seed, target.model.device), on_extinction="return")
    drawn = [s for i, r in enumerate(results) if math.isfinite(r.log_z) for s in r.draw(k, seed=seed + i)]
    if not drawn:
        raise ValueError(f"the replay pool's {runs} SMC runs of {k} particles all went extinct: no sample of sigma "
                         "to learn from")
    return drawn[:size]


def teacher_forced(target: Target, sequences: Sequence[Sequence[int]], rows: int = 256) -> dict[str, Tensor]:
    """Given completions of ``target`` as ``draw`` records them: tokens (right-padded with -1),
    mask and the hidden state each token was drawn from (one decode of ``rows`` sequences at a
    time); no log-probs or potentials (zeros)."""
    model, horizon = target.model, max(map(len, sequences))
    tokens = torch.full((len(sequences), horizon), -1, dtype=torch.long)
    for k, s in enumerate(sequences):
        tokens[k, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    hidden = []
    for lo in range(0, len(sequences), rows):
        block = tokens[lo : lo + rows]
        state = model.start(target.prompt_ids, len(block))
        states = [state.hidden.float()]
        for j in range(horizon - 1):
            state = model.advance(state, block[:, j].clamp(min=0).to(model.device))
            states.append(state.hidden.float())
        hidden.append(torch.stack(states, 1))
    mask = tokens >= 0
    zeros = torch.zeros(mask.shape)
    device = model.device
    return {"tokens": tokens.to(device), "mask": mask.to(device), "hidden": torch.cat(hidden).to(device),
            "log_p0": zeros.to(device), "log_q": zeros.to(device), "log_phi": zeros[:, 0].to(device)}


@dataclass
class Population:
    """The rows that drew step t: the hidden state each drew its token from, the token, its
    prefix s_{1:t}, log p0(s_t) - log q(s_t) - log psi'_{t-1}(s_{<t}) under the drawing twist
    (``log_base``), and a residual's look-ahead a_t log L there (``None`` for other twists)."""

    hidden: Tensor
    tokens: Tensor
    prefixes: list[tuple[int, ...]]
    log_base: Tensor
    ahead: Tensor | None = None


def smc_populations(target: Target, twist: TwistFunction, n: int, generator: torch.Generator, *,
                    proposal_beta: float = 1.0) -> tuple[list[Population], engine.Run]:
    """One run of twisted SMC with ``n`` particles on ``target`` (q ∝ p0 psi^proposal_beta),
    multinomial resampling at every step, and the rows that drew each step (module
    docstring). The run ends where it went extinct."""
    if twist.stateful:
        raise ValueError("SMC negatives read a head on the model's hidden states; a twist with a body of its own "
                         "(a LoRA twist) is not supported: use negatives='sis'")
    drawn: list[tuple[list[int], Tensor, list[int], Tensor]] = []

    def observe(rows: Tensor, state, tokens: Tensor, lp0: Tensor, lq: Tensor) -> None:
        drawn.append((rows.tolist(), state.hidden.float(), tokens.tolist(), (lp0 - lq).double().cpu()))

    proposal = make_proposal(twist, beta=proposal_beta)
    boundary = TokenStepBoundary() if target.steps is not None else Boundary()  # as run_smc: Steps end chains
    sampler = engine.Sampler(proposal, boundary, PrefixCritic(False, proposal.prefix_powers),
                             Resample(get_scheme("multinomial"), 1.0))
    with torch.no_grad():
        run = engine.run([target], n, sampler, [generator], observe=observe)
    prefixes: list[tuple[int, ...]] = [()] * n
    psi_before = torch.zeros(n, dtype=torch.float64)  # log psi'_{t-1} of each row's prefix (psi_0 = 1)
    out = []
    for (rows, hidden, tokens, log_ratio), parents, info in zip(drawn, run.particles.ancestry, run.steps, strict=True):
        grown = [prefixes[r] + (v,) for r, v in zip(rows, tokens, strict=True)]
        ahead = twist.look_ahead(target, grown) if isinstance(twist, ResidualTwist) else None
        out.append(Population(hidden, torch.tensor(tokens, dtype=torch.long), grown,
                              log_ratio - psi_before[rows], ahead))
        now = psi_before.clone()
        now[info.rows] = info.log_psi_now.double()  # what the drawing twist (phi where a row ended) gave
        at = dict(zip(rows, grown, strict=True))
        prefixes = [at.get(p, prefixes[p]) for p in parents.tolist()]
        psi_before = now[parents]
    return out, run


def negative_term(target: Target, twist: TwistFunction, populations: list[Population]) -> Tensor:
    """Per step t, E_{pi_t}[log psi_t] under the current twist: the step's rows weighed by
    ``log_base`` + log psi_t (detached) and self-normalised, times log psi_t with gradients
    (a residual's look-ahead added), shape (T,); NaN at a step where the current twist gives
    every row weight 0 (no estimate: the trainer leaves that step out)."""
    values = []
    for pop in populations:
        before = [p[:-1] for p in pop.prefixes] if twist.needs_prefixes else None
        log_psi = twist.log_psi_at(before, pop.hidden, pop.tokens.to(pop.hidden.device), twist.condition_for(target))
        if pop.ahead is not None:  # computed once per population, however many updates read it
            log_psi = log_psi + pop.ahead.to(log_psi.device, log_psi.dtype)
        log_w = pop.log_base.to(log_psi.device) + log_psi.detach().double()
        if not bool(torch.isfinite(log_w).any()):
            values.append(torch.full((), math.nan, device=log_psi.device))
            continue
        w = torch.softmax(torch.where(torch.isfinite(log_w), log_w, -torch.inf), 0).to(log_psi.dtype)
        values.append(torch.where(w > 0, w * log_psi, 0.0).sum())  # a row ruled out (psi = 0) has weight 0
    return torch.stack([v.to(values[0].device) for v in values]) if values else torch.zeros(0)
