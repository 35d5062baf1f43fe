"""Monte Carlo samplers of sigma."""

from ..proposals import ModelProposal
from .particles import Particles, Resampling, StepInfo, smc_step
from .rejection import RejectionResult, rejection_sample
from .resampling import SCHEMES, ess, get_scheme
from .result import SMCResult, read_jsonl
from .search import Hypothesis, beam_search
from .smc import importance_sample, run_smc, smc

__all__ = [
    "SCHEMES", "Hypothesis", "ModelProposal", "Particles", "RejectionResult", "Resampling", "SMCResult", "StepInfo",
    "beam_search", "ess", "get_scheme", "importance_sample", "read_jsonl", "rejection_sample", "run_smc", "smc",
    "smc_step",
]
