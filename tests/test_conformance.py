"""The conformance checks of pilm.testing pass on pilm's own implementations and fail on
deliberately broken ones: a check that cannot fail is no check."""


import pytest
import torch

import pilm
from pilm.inference.particle_filter import PaperWeights
from pilm.inference.rules import Decision, Resample, Rule
from pilm.inference.search import BeamSelection, SubtreeSelection
from pilm.inference.voting import Independent
from pilm.potentials import Regex
from pilm.prm import FunctionPRM
from pilm.proposals import BaseProposal, MaskedProposal, ModelProposal, Proposal, Proposed
from pilm.testing import check_prm, check_proposal, check_rule, check_twist
from pilm.twists.exact import TableTwist


@pytest.fixture
def target():
    model = pilm.models.TabularLM.random(4, seed=3, eos_id=3)
    return pilm.Target(model, "a", Regex("[ab]*"), max_new_tokens=4)


def test_pilms_proposals_twists_prms_and_rules_pass(target):
    other = pilm.models.TabularLM.random(4, seed=4, eos_id=3)
    for proposal in (BaseProposal(), BaseProposal(0.5), MaskedProposal(), ModelProposal(other)):
        check_proposal(proposal, target)
    twist = TableTwist(target)
    with torch.no_grad():
        twist.values.copy_(torch.randn(twist.values.shape, generator=torch.Generator().manual_seed(0)))
    check_twist(twist, target)
    check_prm(FunctionPRM(lambda prompt, tokens: 0.5 + 0.1 * tokens.count(0) / 4, on="tokens"), target,
              [[0, 1, 0], [1, 3], [2, 2, 2, 2]])
    for rule in (Resample(), Resample("multinomial", 1.0), PaperWeights(), BeamSelection(2), SubtreeSelection(2),
                 Independent()):
        check_rule(rule)


class Unnormalised(BaseProposal):
    def propose(self, state, prefixes):
        return Proposed(state.logprobs + 0.1)


class ForgetsItsRows(Proposal):
    """A proposal with a state of its own that does not follow the model's rows."""

    def __init__(self, model):
        self.inner = ModelProposal(model)

    def begin(self, targets, n):
        self.inner.begin(targets, n)

    def propose(self, state, prefixes):
        return self.inner.propose(state, prefixes)

    def advance(self, tokens, hold=None):
        self.inner.advance(tokens[: self.inner._state.n], None)  # ignores hold


def test_a_broken_proposal_fails(target):
    with pytest.raises(AssertionError, match="q must sum to 1"):
        check_proposal(Unnormalised(), target)
    with pytest.raises(AssertionError, match="after reindex|held row|shape"):
        check_proposal(ForgetsItsRows(pilm.models.TabularLM.random(4, seed=4, eos_id=3)), target)


class BatchTwist(TableTwist):
    """Log psi that depends on how many rows are asked at once."""

    def log_psi(self, prefixes, hidden, condition=None):
        return super().log_psi(prefixes, hidden, condition) + len(hidden)


def test_a_broken_twist_fails(target):
    with pytest.raises(AssertionError, match="must not depend on the other rows"):
        check_twist(BatchTwist(target), target)


def test_a_broken_prm_fails(target):
    with pytest.raises(AssertionError, match=r"in \[0, 1\]"):
        check_prm(FunctionPRM(lambda prompt, tokens: 1.5, on="tokens"), target, [[0, 1]])
    calls = []

    def depends(prompt, tokens):  # scores the k-th row of a call by k
        calls.append(1)
        return min(1.0, 0.1 * len(calls))

    with pytest.raises(AssertionError, match="alone"):
        check_prm(FunctionPRM(depends, on="tokens"), target, [[0, 1], [1, 0], [0, 0]])


class PicksTheDead(Rule):
    name, weighs, importance = "bad", True, True

    def decide(self, v):
        n = len(v.log_w)
        return Decision(torch.zeros(n, dtype=torch.float64), v.log_psi, v.alive, torch.full((n,), n - 1), 0.0)


class ForgetsTheReference(Resample):
    def decide(self, v):
        d = super().decide(v)
        if d.parents is not None:
            d.parents = torch.roll(d.parents, 1)
        return d


def test_a_broken_rule_fails():
    with pytest.raises(AssertionError, match="weight 0 cannot be a parent"):
        check_rule(PicksTheDead())
    with pytest.raises(AssertionError, match="row 0 must keep itself"):
        check_rule(ForgetsTheReference("systematic", 1.0))
