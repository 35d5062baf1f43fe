"""pilm: probabilistic inference in language models.

Sample sigma(s | x) ∝ p0(s | x) phi(s) with importance sampling, SMC and rejection; get
unbiased estimates of Z; check everything exactly on enumerable models.
"""

from importlib.metadata import PackageNotFoundError, version

from . import latent, learning, models, potentials, prm, proposals, tasks, testing, twists
from .errors import (
    EmptyPromptError,
    ExtinctionWarning,
    ImpossibleTargetError,
    ModelLoadError,
    PilmError,
    PotentialError,
    RejectionBudgetError,
    TooLargeError,
)
from .evaluation import BoundsReport, bounds, exact
from .inference import (
    ModelProposal,
    RejectionResult,
    SMCResult,
    StepResult,
    best_of_n,
    dvts,
    greedy,
    importance_sample,
    particle_filter,
    particle_gibbs,
    prm_beam_search,
    rejection_sample,
    self_consistency,
    smc,
)
from .learning import finetune, train_prm, train_skip_model, train_twist
from .models import load_model
from .steps import Steps
from .target import Target
from .twists import Twist

try:
    __version__ = version("pilm")
except PackageNotFoundError:  # run from a source tree that was never installed (PYTHONPATH)
    __version__ = "0+source"
__all__ = [
    "BoundsReport", "bounds", "EmptyPromptError", "ExtinctionWarning", "ImpossibleTargetError", "ModelLoadError",
    "ModelProposal", "PilmError", "PotentialError", "RejectionBudgetError", "RejectionResult", "SMCResult",
    "Target", "TooLargeError", "exact", "finetune", "Twist", "importance_sample", "learning", "load_model",
    "models", "potentials", "proposals", "rejection_sample", "smc", "latent", "tasks", "testing", "train_twist",
    "train_skip_model", "twists", "prm", "Steps", "StepResult", "best_of_n", "dvts", "greedy", "particle_filter",
    "particle_gibbs", "prm_beam_search", "self_consistency", "train_prm"
]
