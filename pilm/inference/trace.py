"""Per-step tensors of a sampling run without resampling, for training twists.

The LM body is frozen, so the hidden states recorded while sampling are all a twist head
needs: training then costs no LM forward pass beyond the sampling itself.
"""

from __future__ import annotations

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

    def record(self, step, state: ModelState) -> None:
        """Keep what ``step`` (a ``StepInfo``) drew from the model ``state``, for the rows that drew it."""
        rows, finished = step.rows, step.finished
        self.steps.append((rows.clone(), state.hidden, step.drawn, step.log_p0, step.log_q,
                           state.logprobs if self.keep_logprobs else None))
        for k, value in zip(rows[finished].tolist(), step.log_psi_now[finished].tolist()):
            self.log_phi[k] = value  # at a particle's last token psi is phi

    def stacked(self, n: int) -> dict[str, Tensor]:
        """Padded (n, T, ...) tensors; ``mask[k, t]`` is True where particle k drew a token at step t+1."""
        T = len(self.steps)
        H = self.steps[0][1].shape[-1]
        out = {
            "hidden": torch.zeros(n, T, H),
            "tokens": torch.full((n, T), -1, dtype=torch.long),
            "log_p0": torch.zeros(n, T),
            "log_q": torch.zeros(n, T),
            "mask": torch.zeros(n, T, dtype=torch.bool),
            "log_phi": torch.tensor([self.log_phi[k] for k in range(n)]),
        }
        if self.keep_logprobs:
            out["log_p0_all"] = torch.zeros(n, T, self.steps[0][5].shape[-1])
        for t, (rows, hidden, drawn, lp0, lq, lp0_all) in enumerate(self.steps):
            out["hidden"][rows, t] = hidden.float().cpu()
            out["tokens"][rows, t] = drawn
            out["log_p0"][rows, t] = lp0.float()
            out["log_q"][rows, t] = lq.float()
            out["mask"][rows, t] = True
            if lp0_all is not None:
                out["log_p0_all"][rows, t] = lp0_all.cpu()
        return out
