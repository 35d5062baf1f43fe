"""The records of the particle engine (``pilm.inference.engine``): the particles, what a
sampler is made of, what one boundary did and a finished run; and the batched draw, with the
weight of a draw and its trip to the host.

Rows are target-major: particles ``g*N .. g*N+N-1`` belong to target g, and each target's
selection, ESS and log Z-hat stay within its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..models.device import derived_seed, seeded_generator
from ..models.draws import categorical, uniforms
from ..proposals import Proposal
from .boundaries import Boundary
from .critics import Critic
from .rules import Rule


@dataclass(frozen=True)
class Particles:
    """M targets x N particles. ``tokens`` (R, T) right-padded with -1, ``lengths``, ``done``
    (finished, extinct, dropped by a search, or at weight 0 under an importance rule),
    ``alive`` (still in the pool: a search drops rows), ``log_w`` (log weight since the
    target's last resampling, float64), ``log_psi`` (log psi at each row's last boundary),
    ``step_start`` (where each row's running step began), ``log_z`` (M,) (log Z-hat of each
    target's completed resampling epochs), ``ancestry`` (per boundary, the global parent row
    of every row), ``t`` (boundaries passed)."""

    tokens: Tensor
    lengths: Tensor
    done: Tensor
    alive: Tensor
    log_w: Tensor
    log_psi: Tensor
    step_start: Tensor
    log_z: Tensor
    n: int
    t: int = 0
    ancestry: tuple[Tensor, ...] = ()

    @classmethod
    def start(cls, m: int, n: int, horizon: int) -> Particles:
        r = m * n
        zeros = torch.zeros(r, dtype=torch.float64)
        return cls(torch.full((r, horizon), -1, dtype=torch.long), torch.zeros(r, dtype=torch.long),
                   torch.zeros(r, dtype=torch.bool), torch.ones(r, dtype=torch.bool), zeros, zeros.clone(),
                   torch.zeros(r, dtype=torch.long), torch.zeros(m, dtype=torch.float64), n)

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
                       alive=self.alive[parents], log_w=self.log_w[parents], log_psi=self.log_psi[parents],
                       step_start=self.step_start[parents])


@dataclass(frozen=True)
class Sampler:
    """What a sampler is made of: the ``proposal`` q the rows draw from, the ``boundary`` where
    their steps end, the ``critic`` that scores them there and the ``rule`` that weighs and
    selects them; ``temperature`` makes the base p_M (the model at that temperature) that the
    weights correct q towards."""

    proposal: Proposal
    boundary: Boundary
    critic: Critic
    rule: Rule
    temperature: float = 1.0


@dataclass(frozen=True)
class StepInfo:
    """What one boundary did. ``rows``: the rows that stepped (in the model's row order),
    ``finished`` and ``log_psi_now`` (log psi at the boundary, log phi where finished) of each;
    per target: ``ess`` (NaN where none of its rows stepped), ``resampled`` (selected, with a
    change of ancestors), ``extinct`` (every weight became 0 here), ``died`` (rows that went
    to weight 0 here)."""

    t: int
    rows: Tensor
    finished: Tensor
    log_psi_now: Tensor
    ess: Tensor
    resampled: Tensor
    extinct: Tensor
    died: Tensor


@dataclass
class Run:
    """A finished run: the particles, one ``StepInfo`` per boundary, the compute it spent
    (``tokens`` drawn, ``forwards``, ``forward_rows``: the rows handed to the model's steps,
    ``held_rows``: those among them that waited) and its ``seconds``."""

    particles: Particles
    steps: list[StepInfo]
    compute: dict = field(default_factory=dict)
    seconds: float = 0.0


def draw(log_q: Tensor, groups: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One token per row from exp(log_q), by inversion (``pilm.models.draws``), each target's
    rows (contiguous) with uniforms from its own generator, drawn and returned on the device
    the probabilities live on."""
    if len(generators) == 1:
        counts, chosen = [len(log_q)], list(generators)
    else:
        ids, runs = torch.unique_consecutive(groups, return_counts=True)
        counts, chosen = runs.tolist(), [generators[g] for g in ids.tolist()]
    return categorical(log_q, uniforms(counts, chosen, log_q.device))


def host_twins(generators: Sequence[torch.Generator]) -> list[torch.Generator]:
    """Generators for a rule's draws (resampling, ancestors), which read weights kept on the
    host: a CPU generator is itself; one on an accelerator gets a CPU twin seeded from its seed,
    so that resampling moves nothing between host and device."""
    return [g if g.device.type == "cpu" else seeded_generator(derived_seed(g.initial_seed(), ("rules",)), "cpu")
            for g in generators]


def check_drawn(rows: Tensor, lq: Tensor, n: int | None = None) -> None:
    """Refuse draws whose log q is -inf or NaN (on the host): a row of the proposal without
    positive finite mass, which inversion draws as some index (``pilm.models.draws``), or a
    conditional-SMC reference token that the proposal cannot draw. ``n``: rows per target, to
    name (target, particle) instead of the row."""
    bad = ~torch.isfinite(lq)
    if bool(bad.any()):
        at = [(int(r) // n, int(r) % n) if n else int(r) for r in rows[bad][:4]]
        what = "(target, particle)" if n else "row"
        raise ValueError(f"the proposal gave no token of positive finite probability at {what} {at} (log q of the drawn "
                         f"token {lq[bad][:4].tolist()}): every log q -inf or NaN there, or a reference token q cannot draw")


def to_host(drawn: Tensor, read: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The drawn tokens and the values read at them, brought to the host in one transfer (as
    float64: token ids are exact, and a float64 psi keeps its precision). On the CPU there is
    nothing to save, and the stack would only cost."""
    if drawn.device.type == "cpu":
        return drawn, {k: v.double() for k, v in read.items()}
    host = torch.stack([drawn.double(), *(v.double() for v in read.values())]).cpu()
    return host[0].long(), dict(zip(read, host[1:], strict=True))


def log_base_at(logprobs: Tensor, pick: Tensor, lp0: Tensor, temperature: float) -> Tensor:
    """log p_M of the drawn tokens, p_M ∝ p0^(1/T), without forming p_M over the vocabulary:
    log p0(s) / T - logsumexp(log p0 / T); at T = 0 (greedy) 0 for the argmax, -inf elsewhere."""
    if temperature == 1.0:
        return lp0
    if temperature == 0:
        top = logprobs.argmax(1, keepdim=True)
        return torch.where(pick == top, 0.0, -torch.inf).squeeze(1)
    return lp0 / temperature - torch.logsumexp(logprobs / temperature, 1)
