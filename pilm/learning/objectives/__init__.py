"""Twist-learning objectives: pure functions ``(batch, base) -> scalar loss``.

Each entry records what the trainer must provide: log p0 of every token, base-model
samples, and the twist output it assumes.
"""

from collections.abc import Callable
from dataclasses import dataclass

from .batch import TwistBatch
from .ctl import ctl
from .dpg import dpg
from .fudge import fudge
from .rl import rl
from .sixo import sixo


@dataclass(frozen=True)
class Objective:
    loss: Callable
    needs_logprobs: bool = False
    needs_base_samples: bool = False
    twist_output: str = "log"


OBJECTIVES: dict[str, Objective] = {
    "ctl": Objective(ctl),
    "rl": Objective(rl, needs_logprobs=True),
    "sixo": Objective(sixo, needs_base_samples=True),
    "fudge": Objective(fudge, needs_base_samples=True, twist_output="log_sigmoid"),
    "dpg": Objective(dpg, needs_logprobs=True),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown twist objective {name!r}; known: {', '.join(OBJECTIVES)}") from None


__all__ = ["OBJECTIVES", "Objective", "TwistBatch", "ctl", "dpg", "fudge", "get_objective", "rl", "sixo"]
