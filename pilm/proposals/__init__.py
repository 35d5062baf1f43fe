"""Proposals: what a sampler steps (base model, twist-induced, another model), and the
weight formulas every sampler, bound and objective shares."""

from .base import BaseProposal, Proposal, Proposed, TwistProposal
from .dispatch import as_proposal, make_proposal
from .exact_last import ExactLastProposal
from .masked import MaskedProposal, token_masks
from .model import ModelProposal
from .weights import incremental_log_weight, log_mean_exp, sequence_log_weight, twisted_log_q

__all__ = [
    "BaseProposal", "ExactLastProposal", "MaskedProposal", "token_masks", "ModelProposal", "Proposal", "Proposed",
    "TwistProposal", "as_proposal", "incremental_log_weight", "log_mean_exp", "make_proposal", "sequence_log_weight",
    "twisted_log_q"
]
