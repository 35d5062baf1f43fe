"""Supervised fine-tuning: maximum likelihood on given sequences."""

from __future__ import annotations

from torch import Tensor

from .trajectory import PolicyBatch


def sft(batch: PolicyBatch) -> Tensor:
    """-mean log q(z⊤) over the batch. On exact samples of sigma it minimises
    KL(sigma || q) (with the rewards unused); on demonstrations, it imitates them."""
    return -batch.log_q_total.mean()
