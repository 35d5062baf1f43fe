"""What a run whose particles all died means: Z-hat = 0 by chance, or a target shown impossible.

Z-hat = 0 is a legitimate value of an unbiased estimator: a satisfiable target with Z = 0.03
and 16 particles with no prefix score is extinct in (0.97)^16 ≈ 61% of runs. So extinction
returns log_z = -inf with an ``ExtinctionWarning``, and ``ImpossibleTargetError`` is kept
for targets shown to have Z = 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, cast

import torch

from ..enumeration import enumerate_target
from ..errors import ExtinctionWarning, ImpossibleTargetError, TooLargeError
from ..potentials import Potential
from ..target import Target

Extinction = Literal["warn", "raise", "return"]


def extinct(target: Target, t: int, died: int, n: int, policy: Extinction, *, used_prefix: bool = True) -> None:
    """Every particle of ``target`` has weight 0 after step ``t`` (``died`` of ``n`` at that
    step): raise, warn or say nothing, as ``policy`` says. ``used_prefix``: whether the run
    used the potential's prefix score (importance sampling does not)."""
    head = f"step {t}: all {n} particles have zero weight under potential {target.potential}"
    if policy == "return":
        return
    if policy == "raise":
        raise ImpossibleTargetError(
            f"{head}: nothing the model proposed can satisfy it. Check that the constraint is satisfiable "
            f"within max_new_tokens={target.max_new_tokens}, or use more particles.")
    how = shown_impossible(target)
    if how is not None:
        raise ImpossibleTargetError(f"{head}, and the target is impossible: {how}")
    if not target.has_prefix_potential:
        prefix = "a potential with a prefix score (it drops hopeless prefixes early), "
    elif not used_prefix:
        prefix = "pilm.smc (it uses the potential's prefix score, which drops hopeless prefixes early), "
    else:
        prefix = ""
    if t == target.max_new_tokens and died == n and not prefix:  # all viable until the horizon: tokens ran out
        advice = (f"all were alive until the horizon and none completes the potential within "
                  f"max_new_tokens={t}: raise that horizon (or use more particles)")
    else:
        advice = f"the target is not shown impossible; to sample it, use more particles, {prefix}or a twist"
    warnings.warn(ExtinctionWarning(
        f"{head} ({died} of {n}, {died / n:.0%}, died at this step), so this run estimates Z-hat = 0 "
        f"(log_z = -inf): {advice}."), stacklevel=6)


def shown_impossible(target: Target, max_sequences: int = 10_000) -> str | None:
    """How we know Z = 0 for ``target``, or ``None`` if we do not: exact enumeration of a
    small target, or every one of the V first tokens with psi = 0 (phi = 0 where it ends).
    A model that generates by requests (a serving engine) cannot enumerate: ``None``."""
    if target.model.generates_steps:
        return None
    try:
        e = enumerate_target(target, max_sequences=max_sequences)
        if math.isinf(e.log_z):
            return (f"exact enumeration of all {len(e.tokens):,} completions within max_new_tokens="
                    f"{target.max_new_tokens} gives Z = 0")
        return None
    except TooLargeError:
        pass
    if not target.has_prefix_potential and target.max_new_tokens > 1:
        return None
    if target.max_new_tokens > 1 and cast(Potential, target.potential).costly_prefix:
        return None  # scoring all V first tokens with a model-run prefix score costs more than the run did
    first = list(range(target.model.vocab_size))
    ends = [v for v in first if v == target.stop_token_id or target.max_new_tokens == 1]
    rest = [v for v in first if v not in set(ends)]
    dead = all(torch.isneginf(target.log_potential([[v] for v in ends])).tolist())
    dead = dead and all(torch.isneginf(target.log_prefix_potential([[v] for v in rest])).tolist())
    return f"each of the {len(first):,} possible first tokens has psi = 0 (all checked)" if dead else None
