"""What a sampler steps: the proposal q(s_t | s_{<t}) of every row of a batched decode.

A ``Proposal`` is stepped in lock-step with the target model's rows: ``begin`` for the
targets (``n`` rows each, target-major), ``propose`` for the current rows (from the model's
state, whose forward it may reuse), then, after the sampler picks the rows that go on and
their tokens, ``reindex`` and ``advance`` (see ``pilm.models.decode_step``). It returns
log q of every next token and, if it has one, the twist log psi_t(s_{<t}, v) of every next
token, which then stands in for the potential's prefix score in the weights.

Adapters: ``BaseProposal`` (q = p0, optionally at a temperature), ``TwistProposal``
(q ∝ p0 psi^beta, from the same forward), ``ModelProposal`` (another model, or a
fine-tuned policy, under its own prompt) and ``MaskedProposal`` (q ∝ p0 · the constraint's
token mask, ``masked.py``). ``make_proposal`` (``dispatch.py``) is the one place that turns the
samplers' shorthands (``twist=``, ``proposal=``) into one of them.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..models.base import ModelState
from ..models.device import check_device, module_device
from ..target import Target
from ..twists.base import Prefixes, TwistFunction
from ..twists.residual import ResidualTwist
from .weights import twisted_log_q


@dataclass(frozen=True)
class Proposed:
    """log q(v | s_{<t}) of every row and token, (rows, V); ``log_psi``: the twist's
    log psi_t(s_{<t}, v), (rows, V), or ``None`` (the potential's prefix score is used)."""

    log_q: Tensor
    log_psi: Tensor | None = None


class Proposal(ABC):
    """The protocol (see the module docstring). ``needs_prefixes``: ``propose`` reads the
    rows' token prefixes (exact and tabular twists); otherwise it gets ``None``.
    ``keeps_prefix_scores``: the potential's prefix scores multiply this proposal's log psi
    in the weights instead of being replaced by it (a token mask)."""

    name: str = "proposal"
    needs_prefixes: bool = False
    # With a log psi of its own, the potential's prefix scores still weight (a mask is not a twist)
    keeps_prefix_scores: bool = False

    @property
    def compute(self) -> dict[str, int]:
        """What proposing cost this run beyond the model's forwards (e.g. potential calls)."""
        return {}

    @property
    def prefix_powers(self) -> ResidualTwist | None:
        """A residual twist whose look-ahead weighs after the draw (``ResidualTwist``,
        ``propose="head"``): the critic adds its ``a_t · log L`` to this proposal's log psi."""
        return None

    def begin(self, targets: Sequence[Target], n: int) -> None:
        """Start ``n`` rows for each target, target-major (stateless proposals: nothing)."""

    @abstractmethod
    def propose(self, state: ModelState, prefixes: Prefixes | None) -> Proposed:
        """log q (and log psi, if any) of every next token for the model's current rows."""

    def reindex(self, idx: Tensor) -> None:
        """Keep rows ``idx`` (duplicates allowed), in step with the model."""

    def advance(self, tokens: Tensor, hold: Tensor | None = None) -> None:
        """Append one token per row, in step with the model (rows in ``hold`` wait: nothing is
        appended to them, as in ``LanguageModel.advance``)."""


class BaseProposal(Proposal):
    """q = p0, or p0 at a ``temperature``: q ∝ p0^(1/temperature) (0: greedy, all mass on
    the argmax). Sampling from p0 itself needs no weight correction; any other temperature
    is corrected by the weight p0 / q like any proposal."""

    def __init__(self, temperature: float = 1.0):
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        self.name = "base" if temperature == 1.0 else f"base at temperature {temperature:g}"

    def propose(self, state: ModelState, prefixes: Prefixes | None) -> Proposed:
        return Proposed(self.tempered(state.logprobs))

    def tempered(self, logprobs: Tensor) -> Tensor:
        """log q of every token from log p0 (rows, V)."""
        if self.temperature == 1.0:
            return logprobs
        if self.temperature == 0:
            greedy = torch.full_like(logprobs, -torch.inf)
            return greedy.scatter_(1, logprobs.argmax(1, keepdim=True), 0.0)
        return torch.log_softmax(logprobs / self.temperature, -1)


class TwistProposal(Proposal):
    """q ∝ p0 psi^beta with psi the ``twist`` read from the hidden state the model's forward
    already made (beta = 0: q = p0 with twisted weights). A conditional twist gets each
    row's own condition (its target's suffix)."""

    def __init__(self, twist: TwistFunction, beta: float = 1.0):
        self.twist, self.beta = twist, beta
        self.name = "twist" if beta > 0 else "base"
        self.needs_prefixes = twist.needs_prefixes
        self._condition: Tensor | None = None

    def begin(self, targets: Sequence[Target], n: int) -> None:
        check_device("the twist", module_device(self.twist), targets[0].model.device)
        trained = self.twist.trained_for
        other = next((t.describe() for t in targets if trained and t.describe() != trained), None)
        if other is not None:
            warnings.warn(
                f"this twist was trained for {_words(cast(dict, trained))} and is used for {_words(other)}: it stays a valid "
                "proposal (Z-hat stays unbiased), but it may help less than no twist", stacklevel=6)
        conditions = [self.twist.condition_for(t) for t in targets]
        self._condition = None
        if any(c is not None for c in conditions):
            self._condition = torch.stack(cast("list[Tensor]", conditions)).repeat_interleave(n, 0)  # all or none
        if self.twist.stateful:
            self.twist.begin(targets, n)

    def propose(self, state: ModelState, prefixes: Prefixes | None) -> Proposed:
        with torch.no_grad():
            log_psi = self.twist.log_psi(prefixes, state.hidden, self._condition).float()
        return Proposed(twisted_log_q(state.logprobs, log_psi, self.beta), log_psi)

    @property
    def prefix_powers(self) -> ResidualTwist | None:
        return self.twist.prefix_powers if isinstance(self.twist, ResidualTwist) else None

    def reindex(self, idx: Tensor) -> None:
        if self._condition is not None:
            self._condition = self._condition[idx.to(self._condition.device)]
        if self.twist.stateful:
            self.twist.reindex(idx)

    def advance(self, tokens: Tensor, hold: Tensor | None = None) -> None:
        if self.twist.stateful:
            self.twist.advance(tokens, hold)


def _words(target: dict) -> str:
    return f"prompt {target['prompt']!r}, potential {target['potential']}, max_new_tokens={target['max_new_tokens']}"
