"""Monte Carlo samplers of sigma."""

from ..proposals import ModelProposal
from .engine import step as smc_step
from .particle_filter import particle_filter, particle_gibbs
from .particles import Particles, Sampler, StepInfo
from .rejection import RejectionResult, rejection_sample
from .resampling import SCHEMES, ess, get_scheme
from .result import SMCResult, StepResult, read_jsonl
from .rules import Resample
from .rules import Resample as Resampling
from .search import Hypothesis, beam_search, dvts, prm_beam_search
from .smc import importance_sample, run_smc, smc
from .voting import best_of_n, greedy, self_consistency

__all__ = [
    "SCHEMES", "Hypothesis", "ModelProposal", "Particles", "RejectionResult", "Resample", "Resampling", "SMCResult",
    "Sampler", "StepInfo",
    "StepResult", "beam_search", "best_of_n", "dvts", "ess", "get_scheme", "greedy", "importance_sample",
    "particle_filter", "particle_gibbs", "prm_beam_search", "read_jsonl", "rejection_sample", "run_smc",
    "self_consistency", "smc", "smc_step",
]
