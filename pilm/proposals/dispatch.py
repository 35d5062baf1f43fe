"""The one place the samplers' shorthands (``twist=``, ``proposal=``) become a ``Proposal``."""

from __future__ import annotations

from ..models.base import LanguageModel
from ..twists.base import TwistFunction
from .base import BaseProposal, Proposal, TwistProposal
from .exact_last import ExactLastProposal
from .masked import MaskedProposal
from .model import ModelProposal


def make_proposal(twist: TwistFunction | None = None, proposal: str | LanguageModel | Proposal | None = None,
                  beta: float = 1.0) -> Proposal:
    """The proposal the samplers' shorthands mean: ``twist=None`` is the base model;
    with a twist, ``proposal="twist"`` (default) is q ∝ p0 psi^beta and ``"base"`` is p0
    with twisted weights; ``"masked"`` draws only tokens the potential's hard constraints
    allow (``MaskedProposal``, times psi^beta with a twist); ``"exact-last"`` proposes each
    row's last token from p0 · phi over the likeliest tokens (``ExactLastProposal``) and
    otherwise as the rest of the name says (``"exact-last"``: p0, or the twist;
    ``"masked+exact-last"``: the mask); a ``LanguageModel`` is a ``ModelProposal`` on the
    target's prompt; a ``Proposal`` is used as it is."""
    if isinstance(proposal, LanguageModel):
        proposal = ModelProposal(proposal)
    if isinstance(proposal, Proposal):
        if twist is not None:
            raise ValueError("give either a twist or a proposal object, not both")
        return proposal
    proposal = proposal or ("twist" if twist is not None else "base")
    if proposal == "exact-last" or proposal.endswith("+exact-last"):
        return ExactLastProposal(make_proposal(twist, proposal.removesuffix("exact-last").removesuffix("+") or None,
                                               beta))
    if proposal == "masked":
        return MaskedProposal(twist, beta)
    if proposal not in ("base", "twist"):
        raise ValueError(f"proposal must be 'base', 'twist', 'masked', 'exact-last', 'masked+exact-last', a "
                         f"LanguageModel or a Proposal, got {proposal!r}")
    if twist is None:
        if proposal == "twist":
            raise ValueError("proposal='twist' needs a twist")
        return BaseProposal()
    return TwistProposal(twist, beta if proposal == "twist" else 0.0)


def as_proposal(sampler: TwistFunction | LanguageModel | Proposal | None) -> Proposal:
    """A sampler as the bounds and experiments name them: ``None`` is p0, a twist its
    twist-induced proposal, a model a ``ModelProposal``, a proposal itself."""
    if isinstance(sampler, TwistFunction):
        return TwistProposal(sampler)
    return make_proposal(proposal=sampler)
