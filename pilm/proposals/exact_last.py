"""The locally optimal proposal at the last token: score phi for the likeliest last tokens.

Where the final potential depends on the last token (a suffix likelihood, a classifier of
the whole text), the proposal that makes the last incremental weight constant is
q_T(v | s_{<T}) ∝ p0(v | s_{<T}) phi(s_{<T} v). Its normaliser needs phi of every token; this
proposal scores phi only for the ``top_m`` tokens most likely under p0 (one batched potential
call per target, ``top_m`` sequences per row) and puts a floor c under the others:

    q_T(v) = p0(v) w(v) / A,    w(v) = phi(s_{<T} v) for v in the top m, c elsewhere,
    A = sum_v p0(v) w(v),       c = sum_{top} p0 phi / sum_{top} p0  (p0-weighted mean of phi there),

and c = 1 where phi is 0 on every scored token. So q_T > 0 wherever p0 phi > 0, the last
weight p0 phi / q_T = A phi(s v) / w(v) is A for every scored token, and Z-hat stays
unbiased. Before the last token it proposes as ``inner`` does (p0, a twist, a token mask);
at the last token a mask multiplies w (a ``MaskedProposal``'s: the tokens it never proposes).
A row is scored once at its last token (a row that waits there, in a step-level sampler, is
not scored again). The sequences it scores are counted in ``compute``
(``exact_last_sequences``), the price of the proposal in potential calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.base import ModelState
from ..target import Target
from ..twists.base import Prefixes
from .base import BaseProposal, Proposal, Proposed
from .masked import MaskedProposal


class ExactLastProposal(Proposal):
    """q ∝ p0 · phi at each row's last token, from ``top_m`` scored tokens (module docstring);
    ``inner`` everywhere else (default: p0)."""

    def __init__(self, inner: Proposal | None = None, top_m: int = 16):
        if not isinstance(top_m, int) or isinstance(top_m, bool) or top_m < 1:
            raise ValueError(f"top_m must be a positive integer, got {top_m!r}")
        self.inner = inner or BaseProposal()
        self.top_m = top_m
        self.keeps_prefix_scores = self.inner.keeps_prefix_scores
        plain = isinstance(self.inner, BaseProposal) and self.inner.temperature == 1.0
        self.name = f"exact-last (top {top_m})" + ("" if plain else f" + {self.inner.name}")
        self._spent = {"exact_last_sequences": 0}
        self._targets: list[Target] = []
        self._groups = self._lengths = self._horizon = torch.zeros(0, dtype=torch.long)
        self._scored = torch.zeros(0, dtype=torch.bool)  # rows whose last-token q is in _q
        self._q: Tensor | None = None

    @property
    def compute(self) -> dict[str, int]:
        return dict(self._spent)

    @property
    def prefix_powers(self):
        return self.inner.prefix_powers

    @property
    def needs_prefixes(self) -> bool:  # type: ignore[override]  # the last token's prefixes are scored
        return self.inner.needs_prefixes or bool(self._at_last().any())

    def _at_last(self) -> Tensor:
        return self._lengths == self._horizon - 1

    def begin(self, targets: Sequence[Target], n: int) -> None:
        self.inner.begin(targets, n)
        self._spent = {"exact_last_sequences": 0}  # this run's
        self._targets = list(targets)
        self._groups = torch.arange(len(targets)).repeat_interleave(n)
        self._horizon = torch.tensor([t.max_new_tokens for t in targets]).repeat_interleave(n)
        self._lengths = torch.zeros(len(self._groups), dtype=torch.long)
        self._scored, self._q = torch.zeros(len(self._groups), dtype=torch.bool), None

    def propose(self, state: ModelState, prefixes: Prefixes | None) -> Proposed:
        last = self._at_last()
        proposed = self.inner.propose(state, prefixes if self.inner.needs_prefixes else None)
        if not last.any():
            return proposed
        assert prefixes is not None  # needs_prefixes is True at the last token
        if self._q is None or self._q.shape != proposed.log_q.shape:
            self._q, self._scored = torch.empty_like(proposed.log_q), torch.zeros(len(last), dtype=torch.bool)
        new = (last & ~self._scored).nonzero().squeeze(1)
        if len(new):
            at = new.to(state.logprobs.device)
            log_p0 = state.logprobs[at].float()
            if isinstance(self.inner, MaskedProposal):  # a token mask stays a mask
                log_p0 = log_p0.masked_fill(torch.isneginf(proposed.log_q[at]), -torch.inf)
            self._q[at] = self._last(log_p0, new, prefixes, proposed.log_q[at])
            self._scored[new] = True
        rows = last.nonzero().squeeze(1).to(self._q.device)
        log_q = proposed.log_q.clone()
        log_q[rows] = self._q[rows]
        return Proposed(log_q, proposed.log_psi)

    def _last(self, log_p0: Tensor, rows: Tensor, prefixes: Prefixes, fallback: Tensor) -> Tensor:
        """log q_T of ``rows`` (module docstring); a row where p0 phi is 0 everywhere keeps
        ``fallback`` (its weight is 0 whatever it draws)."""
        m = min(self.top_m, log_p0.shape[1])
        top_lp, top = log_p0.topk(m, dim=1)
        log_phi = torch.full(top.shape, -torch.inf, dtype=torch.float32)
        candidates = top.tolist()
        for g in self._groups[rows].unique().tolist():
            mine = (self._groups[rows] == g).nonzero().squeeze(1).tolist()
            seqs = [tuple(prefixes[int(rows[i])]) + (v,) for i in mine for v in candidates[i]]
            scores = self._targets[g].log_potential(seqs).float().view(len(mine), m)
            log_phi[mine] = scores.cpu()
            self._spent["exact_last_sequences"] += len(seqs)
        log_phi = log_phi.to(log_p0.device).masked_fill(torch.isneginf(top_lp), -torch.inf)
        scored = top_lp + log_phi
        floor = torch.logsumexp(scored, 1) - torch.logsumexp(top_lp, 1)  # log c: p0-weighted mean of phi
        floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
        log_w = floor[:, None].expand_as(log_p0).clone().scatter_(1, top, log_phi)
        out = log_p0 + log_w
        total = torch.logsumexp(out, 1, keepdim=True)
        dead = torch.isneginf(total).squeeze(1)
        out = torch.where(dead[:, None], fallback.float(), out - total)
        return out.to(fallback.dtype)

    def reindex(self, idx: Tensor) -> None:
        self.inner.reindex(idx)
        host = idx.cpu()
        self._groups, self._lengths, self._horizon = self._groups[host], self._lengths[host], self._horizon[host]
        self._scored = self._scored[host]
        if self._q is not None:
            self._q = self._q[idx.to(self._q.device)]

    def advance(self, tokens: Tensor, hold: Tensor | None = None) -> None:
        self.inner.advance(tokens, hold)
        moved = torch.ones(len(self._lengths), dtype=torch.bool) if hold is None else ~hold.cpu()
        self._lengths += moved.long()
        self._scored &= ~moved  # a row that moved on is at another position
        if not bool(self._scored.any()):
            self._q = None  # nothing to reuse: later resamplings need not gather (rows, V) of stale rows
