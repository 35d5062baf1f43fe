"""A twist read as a process reward: the learned PRM is a value head, and a value head is a twist.

For phi = 1[correct], the optimal twist is psi*_t(s_{1:t}) = E[phi | s_{1:t}] = P(correct |
prefix) (Zhao et al. 2024), which is what Math-Shepherd's Monte Carlo labels estimate. A twist
head gives log psi(s_{<t}, v) for every next token from the hidden state the policy's forward
already made, so the score of a step that ended with token s_t is psi(s_{<t}, s_t): no extra
forward. ``pilm.train_prm`` trains one; the same object is a twist for ``pilm.smc``.

A policy that returns no hidden states (a serving engine, ``pilm.models.vllm_backend``) needs
a ``reader``: a transformers model with the policy's weights, the one the head was trained on,
which reads each chain teacher-forced, one batched forward per boundary. Each chain is read
whole, prompt included, at each boundary (no cache is kept in step with the particles), so
over a P-token prompt and a chain of T tokens in K steps the reader runs about K (P + T / 2)
tokens, which ``lm_tokens`` counts.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from ..models.base import LanguageModel
from ..twists.base import TwistFunction
from .base import ProcessReward, StepBatch


class TwistPRM(ProcessReward):
    """r(c, x_{<=t}) = psi(s_{<t}, s_t) of ``twist`` (whose psi must lie in [0, 1]: a head
    with ``output="log_sigmoid"``), read off the policy's hidden state, or with ``reader`` off
    the hidden state that model computes teacher-forced (module docstring)."""

    def __init__(self, twist: TwistFunction, reader: LanguageModel | None = None, batch_rows: int = 64):
        super().__init__()
        if getattr(twist, "output", "log") != "log_sigmoid":
            raise ValueError("a twist read as a process reward must give psi in [0, 1]: train it with "
                             "pilm.train_prm, or use a head with output='log_sigmoid'")
        if reader is not None and (twist.needs_prefixes or twist.stateful):
            raise ValueError(f"a reader gives hidden states to a head, and {type(twist).__name__} reads "
                             f"{'token prefixes' if twist.needs_prefixes else 'the chains with a model body of its own'}")
        if reader is not None and reader.generates_steps:
            raise ValueError(f"the reader must compute hidden states teacher-forced (a transformers model, "
                             f"pilm.load_model(name)); {reader.name} generates by requests")
        self.twist, self.reader, self.batch_rows = twist, reader, batch_rows
        self.reads_hidden = not twist.needs_prefixes and reader is None

    @property
    def name(self) -> str:
        return f"TwistPRM({type(self.twist).__name__})"

    @torch.no_grad()
    def score(self, batch: StepBatch) -> Tensor:
        prefixes = [tuple(t[:-1]) for t in batch.tokens] if self.twist.needs_prefixes else None
        last = batch.last if batch.last is not None else torch.tensor([t[-1] for t in batch.tokens])
        hidden = batch.hidden if self.reader is None else self._read(batch)
        if hidden is None:
            if not self.twist.needs_prefixes:
                raise ValueError("this process reward reads the policy's hidden states; score it inside a sampler")
            hidden = torch.zeros(len(batch), 1)
        param = next(iter(self.twist.parameters()), None) if hasattr(self.twist, "parameters") else None
        if param is not None:  # the head lives where its model does; the engine keeps hidden states on the CPU
            hidden = hidden.to(param.device)
        log_psi = self.twist.log_psi_at(prefixes, hidden, last.to(hidden.device)).float()
        return log_psi.exp().double().cpu()

    def _read(self, batch: StepBatch) -> Tensor:
        """Each row's hidden state before its last token, by ``reader``: its prompt and tokens
        but the last, left-padded into forwards of at most ``batch_rows`` rows."""
        reader = cast(LanguageModel, self.reader)
        rows = [(*reader.context(prompt), *tokens[:-1]) for prompt, tokens in zip(batch.prompts, batch.tokens,
                                                                                     strict=True)]
        self.lm_tokens += sum(map(len, rows))
        return torch.cat([reader.start_many(rows[i: i + self.batch_rows], 1).hidden.float()
                          for i in range(0, len(rows), self.batch_rows)])


def as_prm(prm: ProcessReward | TwistFunction) -> ProcessReward:
    """A process reward, or a twist read as one (``TwistPRM``)."""
    if isinstance(prm, ProcessReward):
        return prm
    if isinstance(prm, TwistFunction):
        return TwistPRM(prm)
    raise TypeError(f"give a pilm.prm.ProcessReward or a twist, got {type(prm).__name__}")
