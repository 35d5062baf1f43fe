"""Per-step tensors of a sampling run without resampling, for training twists.

The LM body is frozen, so the hidden states recorded while sampling are all a twist head
needs: training then costs no LM forward pass beyond the sampling itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.base import ModelState


@dataclass
class Trace:
    """Records, for every step and every particle still running, its hidden state before
    the draw, log p0 and log q of the drawn token, and (``keep_logprobs``) log p0 of every
    token."""

    keep_logprobs: bool = False
    steps: list[tuple] = field(default_factory=list)

    log_phi: dict[int, float] = field(default_factory=dict)

    def __call__(self, rows: Tensor, state: ModelState, drawn: Tensor, log_p0: Tensor, log_q: Tensor) -> None:
        """Keep one draw of the engine (``pilm.inference.engine.Observer``): what ``rows`` drew from ``state``."""
        logprobs = state.logprobs if self.keep_logprobs else None  # a token boundary: every row of the state drew
        self.steps.append((rows.clone(), state.hidden, drawn, log_p0, log_q, logprobs))

    def finish(self, rows: Tensor, log_phi: Tensor) -> None:
        """At a particle's last token psi is phi."""
        for k, value in zip(rows.tolist(), log_phi.tolist(), strict=True):
            self.log_phi[k] = value

    def stacked(self, n: int) -> dict[str, Tensor]:
        """Padded (n, T, ...) tensors; ``mask[k, t]`` is True where particle k drew a token at step t+1."""
        T = len(self.steps)
        H, dev = self.steps[0][1].shape[-1], self.steps[0][1].device  # the states stay where the model ran
        host = {  # the engine's records are on the host: filled there, moved once
            "tokens": torch.full((n, T), -1, dtype=torch.long),
            "log_p0": torch.zeros(n, T),
            "log_q": torch.zeros(n, T),
            "mask": torch.zeros(n, T, dtype=torch.bool),
            "log_phi": torch.tensor([self.log_phi.get(k, -math.inf) for k in range(n)]),  # -inf: died early
        }
        hidden = torch.zeros(n, T, H, device=dev)
        lp0_all = torch.zeros(n, T, self.steps[0][5].shape[-1], device=dev) if self.keep_logprobs else None
        for t, (rows, h, drawn, lp0, lq, every) in enumerate(self.steps):
            host["tokens"][rows, t] = drawn
            host["log_p0"][rows, t] = lp0.float()
            host["log_q"][rows, t] = lq.float()
            host["mask"][rows, t] = True
            on_device = rows.to(dev)
            hidden[on_device, t] = h.float()
            if lp0_all is not None:
                lp0_all[on_device, t] = every
        out = {k: v.to(dev) for k, v in host.items()} | {"hidden": hidden}
        return out if lp0_all is None else out | {"log_p0_all": lp0_all}
