"""Learning objectives, pure functions of tensors returning a scalar loss.

Twist objectives ``(TwistBatch, base) -> loss`` (``OBJECTIVES``: what the twist trainer must
provide) and fine-tuning objectives ``(PolicyBatch) -> loss`` (``FINETUNE_OBJECTIVES``: whether
off-policy samples are valid, whether every prefix's reward is needed, whether a log Z is
learned).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .batch import TwistBatch
from .ctl import ctl
from .dpg import dpg
from .fudge import fudge
from .reinforce import reinforce
from .rl import rl
from .rws import rws
from .sft import sft
from .sixo import sixo
from .subtb import subtb
from .tb import tb
from .trajectory import PolicyBatch, log_flow


@dataclass(frozen=True)
class Objective:
    loss: Callable
    needs_logprobs: bool = False
    needs_base_samples: bool = False
    twist_output: Literal["log", "log_sigmoid"] = "log"


OBJECTIVES: dict[str, Objective] = {
    "ctl": Objective(ctl),
    "rl": Objective(rl, needs_logprobs=True),
    "sixo": Objective(sixo, needs_base_samples=True),
    "fudge": Objective(fudge, needs_base_samples=True, twist_output="log_sigmoid"),
    "dpg": Objective(dpg, needs_logprobs=True),
}


@dataclass(frozen=True)
class FinetuneObjective:
    loss: Callable
    off_policy: bool = False  # valid on tempered and replayed trajectories
    prefix_rewards: bool = False  # reads log R of every prefix, not only the final one
    learns_log_z: bool = False


FINETUNE_OBJECTIVES: dict[str, FinetuneObjective] = {
    "subtb": FinetuneObjective(subtb, off_policy=True, prefix_rewards=True, learns_log_z=True),  # root flow
    "tb": FinetuneObjective(tb, off_policy=True, learns_log_z=True),
    "reinforce": FinetuneObjective(reinforce),
    "rws": FinetuneObjective(rws),
    "sft": FinetuneObjective(sft, off_policy=True),
}


def get_finetune_objective(name: str) -> FinetuneObjective:
    try:
        return FINETUNE_OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning objective {name!r}; known: {', '.join(FINETUNE_OBJECTIVES)}") from None


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown twist objective {name!r}; known: {', '.join(OBJECTIVES)}") from None


__all__ = [
    "FINETUNE_OBJECTIVES", "FinetuneObjective", "OBJECTIVES", "Objective", "PolicyBatch", "TwistBatch", "ctl", "dpg",
    "fudge", "get_finetune_objective", "get_objective", "log_flow", "reinforce", "rl", "rws", "sft", "sixo", "subtb", "tb",
]
