"""The one particle engine: token SMC and the step-level particle filter are one loop, so a
filter with a boundary after every token and the potential's prefix score as critic is SMC,
particle for particle; a filter accepts any proposal and stays unbiased."""

import math

import pytest
import torch

import pilm
from pilm.potentials import FunctionPotential
from pilm.proposals import MaskedProposal, TwistProposal
from pilm.steps import Steps
from pilm.twists.exact import TableTwist

from .conftest import mean_and_se


def soft_target(steps=None):
    """No hard constraint (no row dies), an asymmetric prefix score and an EOS."""
    def score(tokens):
        return 0.8 * tokens.count(0) - 0.5 * tokens.count(1) + 0.1 * len(tokens)

    potential = FunctionPotential(score, on="tokens", prefix_fn=lambda t: 0.5 * score(t), name="soft")
    return pilm.Target(pilm.models.TabularLM.random(4, seed=3, eos_id=3), "a", potential, max_new_tokens=4,
                       steps=steps)


EVERY_TOKEN = Steps(delimiter=3, max_steps=4, max_step_tokens=1)  # each step one token: a boundary per token


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_a_filter_with_a_boundary_per_token_is_smc(threshold):
    """The gate of the engine: same particles, weights, resampling steps and log Z-hat."""
    for seed in range(5):
        a = pilm.smc(soft_target(), 16, ess_threshold=threshold, seed=seed, progress=False)
        b = pilm.particle_filter(soft_target(EVERY_TOKEN), None, 16, weights="twisted", ess_threshold=threshold,
                                 seed=seed)
        assert a.tokens == b.tokens and a.resampled_at == b.resampled_at
        assert torch.allclose(torch.tensor(a.log_weights), torch.tensor(b.log_weights), atol=1e-9)
        assert math.isclose(a.log_z, b.log_z, abs_tol=1e-9)
        assert a.ancestry == b.ancestry  # every sampler returns its ancestry


ONE_STEP = [(2,), (0, 2), (1, 2), (0, 0), (0, 1), (1, 0), (1, 1)]  # every step: ends at 2, or cut after 2 tokens


def chain_z(target) -> float:
    """Z = sum over the 49 two-step chains of p(chain) phi(chain), by enumeration."""
    chains = [list(a + b) for a in ONE_STEP for b in ONE_STEP]
    return float((target.log_p0(chains) + target.log_potential(chains)).exp().sum())


def reasoning_target():
    """Steps of one or two tokens (delimiter 2), two per chain, and a potential."""
    from pilm.models import TabularLM

    phi = FunctionPotential(lambda t: 0.3 * t.count(0) - 0.7 * t.count(1), on="tokens", name="phi")
    return pilm.Target(TabularLM.random(3, seed=5), [0], phi, max_new_tokens=4,
                       steps=Steps(delimiter=2, max_steps=2, max_step_tokens=2))


@pytest.mark.parametrize("kind", ["twist", "masked"])
def test_a_filter_with_another_proposal_stays_unbiased(kind):
    """A random table twist as the proposal (or a mask that forbids token 1 after a 0, which
    the potential then zeroes too), a process reward as psi: Z-hat of p_M phi stays unbiased,
    the weights carrying p_M / q."""
    target = reasoning_target()
    if kind == "masked":
        allowed = lambda t: -math.inf if any(a == 0 and b == 1 for a, b in zip(t, t[1:])) else 0.0  # noqa: E731
        target = pilm.Target(target.model, [0], target.potential * FunctionPotential(
            allowed, on="tokens", prefix_fn=allowed, name="no 0-1"), max_new_tokens=4, steps=target.steps)
        proposal = _MaskFromPrefix()
    else:
        twist = TableTwist(target)
        with torch.no_grad():
            twist.values.copy_(torch.randn(twist.values.shape, generator=torch.Generator().manual_seed(1)))
        proposal = TwistProposal(twist)
    z = chain_z(target)
    prm = pilm.prm.FunctionPRM(lambda prompt, tokens: 0.2 + 0.6 * (len(tokens) % 2), on="tokens", name="odd")
    runs = pilm.particle_filter([target] * 800, prm, 8, weights="twisted", proposal=proposal, seed=0,
                                on_extinction="return")
    mean, se = mean_and_se([math.exp(r.log_z) / z for r in runs])
    # 4 SE: false alarm 6e-5; se < 0.025 puts a 10% bias beyond 4 SE
    assert se < 0.025, f"too few runs to detect a 10% bias: se={se:.4f}"
    assert abs(mean - 1) < 4 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"


class _MaskFromPrefix(MaskedProposal):
    """The masked proposal, with the mask read off the potential's prefix score."""

    def __init__(self):
        super().__init__()
        self.needs_prefixes = True

    def propose(self, state, prefixes):
        v = state.logprobs.shape[1]
        allowed = torch.tensor([[not (p and p[-1] == 0 and t == 1) for t in range(v)] for p in prefixes])
        log_psi = torch.zeros_like(state.logprobs).masked_fill(~allowed, -math.inf)
        return pilm.proposals.Proposed(torch.log_softmax(state.logprobs + log_psi, -1), log_psi)


def test_a_proposal_with_paper_weights_is_refused():
    with pytest.raises(ValueError, match="use weights='twisted'"):
        pilm.particle_filter(reasoning_target(), None, 4, proposal=pilm.proposals.BaseProposal(0.5))


def test_paper_weights_without_a_prm_are_refused():
    """The paper's weights are the PRM's scores: without one they were NaN, and the
    resampling failed deep inside torch ("invalid multinomial distribution")."""
    with pytest.raises(ValueError, match="prm is None"):
        pilm.particle_filter(reasoning_target(), None, 4, weights="paper")


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.7])
def test_the_base_weight_at_a_temperature_is_the_tempered_policy(temperature):
    """The engine reads log p_M at the drawn tokens without forming p_M over the vocabulary:
    the same numbers as the tempered base proposal (T = 0: greedy, 0 or -inf)."""
    from pilm.inference.particles import log_base_at
    from pilm.proposals import BaseProposal

    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(6, 40, generator=g), -1)
    pick = torch.cat([lp.argmax(1, keepdim=True)[:3], torch.randint(40, (3, 1), generator=g)])
    want = BaseProposal(temperature).tempered(lp).gather(1, pick).squeeze(1)
    got = log_base_at(lp, pick, lp.gather(1, pick).squeeze(1), temperature)
    assert torch.equal(torch.isinf(want), torch.isinf(got))
    assert torch.allclose(want[torch.isfinite(want)], got[torch.isfinite(got)], atol=1e-5)
