"""The learned log Z of trajectory balance (and the root flow of SubTB)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..proposals.weights import log_mean_exp
from ..target import Target
from .objectives import PolicyBatch


class LogZ(nn.Module):
    """Learned log Z (trajectory balance; the root flow of SubTB): a scalar for one prompt, or a linear head on
    the base model's last hidden state of the policy's prompt for many (amortised over prompts)."""

    def __init__(self, hidden_size: int, amortised: bool):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1) if amortised else None
        if self.head is not None:  # start at the scalar (the first batch's IS estimate), not a random offset
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.value: Tensor = nn.Parameter(torch.zeros(()))
        self._hidden: dict[tuple[int, ...], Tensor] = {}  # the frozen base's prompt states, computed once

    def forward(self, target: Target, prompt_ids: Sequence[int] | None = None) -> Tensor:
        if self.head is None:
            return self.value
        key = tuple(target.prompt_ids if prompt_ids is None else prompt_ids)
        if key not in self._hidden:
            with torch.no_grad():
                self._hidden[key] = target.model.start(key, 1).hidden.float()
        return self.head(self._hidden[key]).squeeze() + self.value

    def start_at_estimate(self, batch: PolicyBatch, target: Target, prompt_ids: Sequence[int] | None = None) -> Tensor:
        """Shift log Z to the batch's importance-sampling estimate log (1/B) sum_b R(z_b)/q(z_b)
        (not a random offset of many nats); returns the new value, with gradients."""
        with torch.no_grad():
            estimate = log_mean_exp(batch.log_r_final - batch.log_q_total).to(self.value.dtype)
            self.value += estimate - self(target, prompt_ids)
        return self(target, prompt_ids)
