"""The locally optimal proposal for a 0/1 prefix-closed constraint: sample only tokens that keep it satisfiable.

For a potential that says, for every row, which next tokens keep phi > 0 possible
(``Potential.allowed_next``, the indicator m_t(s_{<t}, v)), the masked proposal is

    q(v | s_{<t}) = p0(v | s_{<t}) m_t(v) / A_t,    A_t = sum_{v allowed} p0(v | s_{<t}),

and, read as a twist psi_t = m_t, its incremental weight is alpha_t = A_t · (the other
potentials' prefix-score ratio): no token-dependent term from the constraint. Where a
complete sequence ends, its log phi weights as always, so a mask that allows too much (a
dead end it cannot see one step ahead, e.g. the horizon) is corrected by the weights, and
Z-hat stays unbiased; a mask must never forbid a token that could still lead to phi > 0.
With a ``twist``, q ∝ p0 · m · psi^beta (the twist's psi replaces the prefix scores, as in
twisted SMC). llamppl's ``mask_dist`` and genlm-control's direct token sampler are this
proposal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.base import ModelState
from ..target import Target
from ..twists.base import Prefixes, TwistFunction
from .base import BaseProposal, Proposal, Proposed, TwistProposal
from .weights import twisted_log_q


class MaskedProposal(Proposal):
    """q ∝ p0 · (the targets' token masks) [· psi^beta]; see the module docstring. Targets
    whose potential gives no mask are proposed from p0 (or the twist) as usual. At a
    ``temperature``, p0 is the model at that temperature (a reasoning policy p_M)."""

    needs_prefixes = True

    def __init__(self, twist: TwistFunction | None = None, beta: float = 1.0, *, temperature: float = 1.0):
        self.inner = TwistProposal(twist, beta) if twist is not None else None
        self.base = BaseProposal(temperature)
        self.keeps_prefix_scores = twist is None
        self.name = "masked" if self.inner is None else f"masked + {self.inner.name}"
        if temperature != 1.0:
            self.name += f" at temperature {temperature:g}"
        self._targets: list[Target] = []
        self._groups = torch.zeros(0, dtype=torch.long)

    @property
    def prefix_powers(self):
        return None if self.inner is None else self.inner.prefix_powers

    def begin(self, targets: Sequence[Target], n: int) -> None:
        self._targets = list(targets)
        self._groups = torch.arange(len(targets)).repeat_interleave(n)
        if self.inner is not None:
            self.inner.begin(targets, n)

    def propose(self, state: ModelState, prefixes: Prefixes | None) -> Proposed:
        log_psi = self.inner.propose(state, prefixes).log_psi if self.inner is not None else None
        assert prefixes is not None  # needs_prefixes: the engine gives them
        mask = token_masks(self._targets, self._groups, prefixes, state.logprobs)
        log_mask = torch.zeros_like(state.logprobs).masked_fill_(~mask, -torch.inf)
        log_psi = log_mask if log_psi is None else log_psi + log_mask
        return Proposed(twisted_log_q(self.base.tempered(state.logprobs), log_psi), log_psi)

    def reindex(self, idx: torch.Tensor) -> None:
        self._groups = self._groups[idx.cpu()]
        if self.inner is not None:
            self.inner.reindex(idx)

    def advance(self, tokens: torch.Tensor, hold: torch.Tensor | None = None) -> None:
        if self.inner is not None:
            self.inner.advance(tokens, hold)


def token_masks(targets: Sequence[Target], groups: torch.Tensor, prefixes: Sequence[Sequence[int]],
                like: torch.Tensor) -> torch.Tensor:
    """(rows, V) bool on ``like``'s device: the tokens row i's target (``targets[groups[i]]``)
    allows after ``prefixes[i]`` (``Potential.allowed_next``, one call per target); all True
    for a target whose potential gives no mask."""
    mask = torch.ones_like(like, dtype=torch.bool)
    for g in groups.unique().tolist():
        target, rows = targets[g], (groups == g).nonzero().squeeze(1)
        if target.potential is None:
            continue
        allowed = target.potential.allowed_next(target.sequences([prefixes[r] for r in rows.tolist()]),
                                                target.stop_token_id)
        if allowed is not None:
            mask[rows.to(mask.device)] = allowed.to(mask.device)
    return mask
