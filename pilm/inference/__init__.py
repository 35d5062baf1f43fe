"""Monte Carlo samplers of sigma."""

from .search import Hypothesis, beam_search
from ..proposals import ModelProposal
from .rejection import RejectionResult, rejection_sample
from .resampling import SCHEMES, ess, get_scheme
from .result import SMCResult, read_jsonl
from .smc import importance_sample, run_smc, smc

__all__ = [
    "SCHEMES", "Hypothesis", "ModelProposal", "RejectionResult", "SMCResult", "beam_search", "ess", "get_scheme", "importance_sample",
    "read_jsonl", "rejection_sample", "run_smc", "smc",
]
