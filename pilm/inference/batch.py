"""Many targets as one batch: the list they come as, one generator each, and chunks that fit
the device's memory."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from ..models.device import derived_seed, seeded_generator
from ..target import Target

References = Sequence[int] | Sequence[Sequence[int] | None]
"""Conditional SMC's references: one complete sequence for one target, or one (or None) per target."""


def as_list(target: Target | Sequence[Target]) -> tuple[list[Target], bool]:
    """The targets as a list, and whether one target (not a list) was given."""
    if isinstance(target, Target):
        return [target], True
    targets = list(target)
    if not targets or not all(isinstance(t, Target) for t in targets):
        raise TypeError("give a pilm.Target or a non-empty list of them")
    if any(t.model is not targets[0].model for t in targets):
        raise ValueError("targets sampled in one batch must share one model")
    return targets, False


def seeded_generators(seed: int, m: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per target on ``device``, target i's seeded with ``derived_seed(seed, i)``
    (so a single target draws as it always did)."""
    return [seeded_generator(derived_seed(seed, i), device) for i in range(m)]


def chunks(targets: list[Target], n: int, max_rows: int | None) -> list[list[int]]:
    """Consecutive groups of target indices whose n rows each fit ``max_rows`` (default: what
    the model's device has room for)."""
    if max_rows is None:
        model = targets[0].model
        prompt = max(len(model.context(t.prompt_ids)) for t in targets)
        length = prompt + max(t.max_new_tokens for t in targets) + 1
        shared = "per_prompt" in inspect.signature(model.max_rows).parameters  # a backend's older signature
        max_rows = model.max_rows(length, prompt=prompt, per_prompt=n) if shared else model.max_rows(length)
    if max_rows is not None and n > max_rows:
        raise ValueError(f"{n} particles of one target do not fit: at most {max_rows} rows fit in the device's "
                         "memory (max_rows); use fewer particles or a shorter horizon")
    per = len(targets) if max_rows is None else max(1, max_rows // n)
    return [list(range(i, min(i + per, len(targets)))) for i in range(0, len(targets), per)]
