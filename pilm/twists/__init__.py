"""Twists psi_t: learned heads on the LM's hidden state, exact optimal twists for tests."""

from .base import TwistFunction
from .exact import ExactTwist, TableTwist, optimal, optimal_log_psi
from .head import Twist, TwistConfig, check_compatible, condition_ids
from .lora import LoRATwist
from .residual import ResidualTwist
from .saved import load_twist

__all__ = [
    "ExactTwist", "LoRATwist", "ResidualTwist", "TableTwist", "Twist", "TwistConfig", "TwistFunction", "check_compatible",
    "condition_ids", "load_twist", "optimal", "optimal_log_psi",
]
