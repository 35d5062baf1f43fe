"""Twists indexed by token prefixes: the exact optimal twist, and a learnable table.

Both need ``needs_prefixes``; they exist for enumerable targets (tabular models).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..enumeration import MAX_SEQUENCES, enumerate_target
from ..target import Target
from .base import Prefixes, TwistFunction


def optimal_log_psi(target: Target, *, max_sequences: int = MAX_SEQUENCES) -> dict[tuple[int, ...], float]:
    """log psi*_t(s_{1:t}) = log E_{p0}[phi(s) | s_{1:t}] for every reachable prefix, by
    summing p0(s) phi(s) over the completions below it (the backward recursion
    psi*_t = sum_v p0(v | s_{1:t}) psi*_{t+1}, psi* = phi at complete sequences). The empty
    prefix maps to log Z."""
    e = enumerate_target(target, max_sequences=max_sequences)
    mass: dict[tuple[int, ...], list[float]] = {}
    for s, lp, lphi in zip(e.tokens, e.log_p0.tolist(), e.log_phi.tolist()):
        for t in range(len(s) + 1):
            mass.setdefault(s[:t], []).append(lp + lphi)
    model = target.model
    out = {}
    for prefix, terms in mass.items():
        log_joint = float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))
        log_p_prefix = (float(model.score([list(target.prompt_ids) + list(prefix)], [len(target.prompt_ids)])[0])
                        if prefix else 0.0)
        out[prefix] = log_joint - log_p_prefix
    return out


class ExactTwist(TwistFunction):
    """The optimal twist psi* of an enumerable target (``pilm.twists.optimal``)."""

    needs_prefixes = True

    def __init__(self, table: dict[tuple[int, ...], float], vocab_size: int):
        self.table, self.vocab_size = table, vocab_size

    def log_psi(self, prefixes: Prefixes | None, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        assert prefixes is not None  # needs_prefixes: the sampler gives them
        return torch.tensor(
            [[self.table.get(p + (v,), -math.inf) for v in range(self.vocab_size)] for p in prefixes],
            dtype=torch.float32,
        )


def optimal(target: Target, *, max_sequences: int = MAX_SEQUENCES) -> ExactTwist:
    """The exact optimal twist psi*_t = E_{p0}[phi | s_{1:t}] of an enumerable target."""
    return ExactTwist(optimal_log_psi(target, max_sequences=max_sequences), target.model.vocab_size)


class TableTwist(nn.Module, TwistFunction):
    """A learnable log psi with one free parameter per (prefix, next token): the fully
    expressive twist of a tabular target, for exact tests of the learning objectives.
    ``init`` gives starting log psi values (floored at -30); ``output="log_sigmoid"`` makes
    psi = sigmoid(parameter), as FUDGE needs."""

    needs_prefixes = True

    def __init__(self, target: Target, init: dict[tuple[int, ...], float] | None = None, output: str = "log"):
        super().__init__()
        self.output = output
        # every prefix, the complete sequences too: a finished row waiting at its boundary is still asked
        prefixes = sorted({s[:t] for s in enumerate_target(target).tokens for t in range(len(s) + 1)})
        self.index = {p: i for i, p in enumerate(prefixes)}
        V = target.model.vocab_size
        values = torch.zeros(len(prefixes), V)
        if init is not None:
            for p, i in self.index.items():
                values[i] = torch.tensor([max(init.get(p + (v,), -30.0), -30.0) for v in range(V)])
            if output == "log_sigmoid":  # parameter = logit(psi)
                values = values.clamp(max=-1e-6) - torch.log(-torch.expm1(values.clamp(max=-1e-6)))
        self.values = nn.Parameter(values)

    def log_psi(self, prefixes: Prefixes | None, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        assert prefixes is not None  # needs_prefixes: the sampler gives them
        values = self.values[torch.tensor([self.index[p] for p in prefixes], dtype=torch.long)]
        return torch.nn.functional.logsigmoid(values) if self.output == "log_sigmoid" else values
