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
        H, dev = self.steps[0][1].shape[-1], self.steps[0][1].device  # built where the model ran
        out = {
            "hidden": torch.zeros(n, T, H, device=dev),
            "tokens": torch.full((n, T), -1, dtype=torch.long, device=dev),
            "log_p0": torch.zeros(n, T, device=dev),
            "log_q": torch.zeros(n, T, device=dev),
            "mask": torch.zeros(n, T, dtype=torch.bool, device=dev),
            "log_phi": torch.tensor([self.log_phi.get(k, -math.inf) for k in range(n)], device=dev),  # -inf: died early
        }
        if self.keep_logprobs:
            out["log_p0_all"] = torch.zeros(n, T, self.steps[0][5].shape[-1], device=dev)
        for t, (rows, hidden, drawn, lp0, lq, lp0_all) in enumerate(self.steps):
            rows = rows.to(dev)
            out["hidden"][rows, t] = hidden.float()
            out["tokens"][rows, t] = drawn.to(dev)
            out["log_p0"][rows, t] = lp0.to(dev).float()
            out["log_q"][rows, t] = lq.to(dev).float()
            out["mask"][rows, t] = True
            if lp0_all is not None:
                out["log_p0_all"][rows, t] = lp0_all
        return out
