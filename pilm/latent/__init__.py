"""Reasoning as a latent variable: a rationale Z between a question X and an answer Y
(prior p(Z | X) and likelihood p(Y | X, Z) from language models), amortised posteriors
q(Z | X) ≈ p(Z | X, Y), the posterior predictive, and variational EM."""

from ..evaluation.metrics import wilson
from .model import Example, LabelLikelihood, LatentModel, label_logprobs
from .prediction import Prediction
from .reasoner import EMResult, LatentReasoner

__all__ = ["EMResult", "Example", "LabelLikelihood", "LatentModel", "LatentReasoner", "Prediction", "label_logprobs",
           "wilson"]
