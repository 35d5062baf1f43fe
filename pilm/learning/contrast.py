"""What contrastive twist learning contrasts, beyond one draw: samples of sigma from a replay
pool (``replay_pool``, read back by ``teacher_forced``) and negatives from a twisted SMC
population (``train_twist(negatives="smc")``).

ctl's negative term at step t is E_{pi_t}[grad log psi_t], with pi_t(s_{1:t}) ∝ p0(s_{1:t}) psi_t(s_{1:t}).
One-sample ctl estimates it with self-normalised weights on one draw of independent sequences,
whose mass at t rests on a few of them; with positives from elsewhere (a replay pool) a head can
then raise psi on the pool's prefixes and lower it on the draw's without bound, since no draw
revisits the former. Twisted SMC that resamples at every step holds, after step t's resampling,
K equally weighted particles that approximate pi_t itself (Zhao et al. 2024, Section 4): those
are the negatives here. They follow the twist wherever it puts mass, so where psi grows on the
positives' prefixes the population moves there and the negative term pushes back.

Known limits (not fixed): a row that finishes at t is resampled by phi, as SMC weighs it, not by
the learned psi_t, so ctl gets no pull on psi at final tokens from these negatives; and the
population is drawn once per step, so with ``reuse > 1`` later updates read negatives of the
twist as it was. Weighing each step's population before its resampling by the current psi
(p0 psi_t / (q psi_{t-1}) with the drawing twist's psi_{t-1}) would fix both.
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
    """The rows that drew step t and survived its resampling: the hidden state each drew its
    token from, the token, its prefix s_{1:t}, its weight (uniform after resampling; the
    normalised final weights at a last step that did not resample), and a residual's
    look-ahead a_t log L there (``None`` for other twists)."""

    hidden: Tensor
    tokens: Tensor
    prefixes: list[tuple[int, ...]]
    weights: Tensor
    ahead: Tensor | None = None


def smc_populations(target: Target, twist: TwistFunction, n: int, generator: torch.Generator, *,
                    proposal_beta: float = 1.0) -> tuple[list[Population], engine.Run]:
    """One run of twisted SMC with ``n`` particles on ``target`` (q ∝ p0 psi^proposal_beta),
    multinomial resampling at every step, and the population after each step's resampling
    (module docstring). A step where the run went extinct has an empty population."""
    if twist.stateful:
        raise ValueError("SMC negatives read a head on the model's hidden states; a twist with a body of its own "
                         "(a LoRA twist) is not supported: use negatives='sis'")
    drawn: list[tuple[list[int], Tensor, list[int]]] = []

    def observe(rows: Tensor, state, tokens: Tensor, lp0: Tensor, lq: Tensor) -> None:
        drawn.append((rows.tolist(), state.hidden.float(), tokens.tolist()))  # every running row draws each token

    proposal = make_proposal(twist, beta=proposal_beta)
    boundary = TokenStepBoundary() if target.steps is not None else Boundary()  # as run_smc: Steps end chains
    sampler = engine.Sampler(proposal, boundary, PrefixCritic(False, proposal.prefix_powers),
                             Resample(get_scheme("multinomial"), 1.0))
    with torch.no_grad():
        run = engine.run([target], n, sampler, [generator], observe=observe)
    prefixes: list[tuple[int, ...]] = [()] * n
    out = []
    last = len(drawn) - 1
    for t, ((rows, hidden, tokens), parents, info) in enumerate(zip(drawn, run.particles.ancestry, run.steps,
                                                                   strict=True)):
        grown = {r: (prefixes[r] + (v,), i) for i, (r, v) in enumerate(zip(rows, tokens, strict=True))}
        rows_kept = [k for k, p in enumerate(parents.tolist()) if p in grown]  # drew this step, after resampling
        kept = [grown[int(parents[k])] for k in rows_kept]
        at = torch.tensor([i for _, i in kept], dtype=torch.long, device=hidden.device)
        weights = torch.full((len(kept),), 1.0 / max(1, len(kept)))
        if bool(info.extinct[0]):  # every weight 0: no sample of pi_t here
            kept, at, weights = [], at[:0], weights[:0]
        elif t == last and not bool(info.resampled[0]) and kept:  # the final weights, phi's included
            # (an earlier step left unresampled had equal weights: at every step ESS < K resamples)
            weights = torch.softmax(run.particles.log_w[rows_kept].double(), 0).float()
        prefix_list = [s for s, _ in kept]
        ahead = twist.look_ahead(target, prefix_list) if isinstance(twist, ResidualTwist) and kept else None
        out.append(Population(hidden[at], torch.tensor([tokens[i] for _, i in kept], dtype=torch.long), prefix_list,
                              weights, ahead))
        prefixes = [grown[p][0] if p in grown else prefixes[p] for p in parents.tolist()]
    return out, run


def negative_term(target: Target, twist: TwistFunction, populations: list[Population]) -> Tensor:
    """Per step t, the weighted mean of log psi_t over the step's population (with gradients
    through the twist; a residual's look-ahead added), shape (T,)."""
    values = []
    for pop in populations:
        if not pop.prefixes:
            values.append(torch.zeros(()))
            continue
        before = [p[:-1] for p in pop.prefixes] if twist.needs_prefixes else None
        log_psi = twist.log_psi_at(before, pop.hidden, pop.tokens.to(pop.hidden.device), twist.condition_for(target))
        if pop.ahead is not None:  # computed once per population, however many updates read it
            log_psi = log_psi + pop.ahead.to(log_psi.device, log_psi.dtype)
        w = pop.weights.to(log_psi.device, log_psi.dtype)
        values.append(torch.where(w > 0, w * log_psi, 0.0).sum())  # a row ruled out (psi = 0) has weight 0
    return torch.stack([v.to(values[0].device) for v in values])
