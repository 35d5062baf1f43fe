"""The rollout look-ahead twist (Monte Carlo estimate of psi*), against exact enumeration.

The target of test_exact_last: a random 5-token table (EOS = 4), prompt "a", horizon 3, and
phi = exp(0.9 [last is "a"] - 0.7 [last is "b"] + 0.2 #c), 0 when the text ends in "d"
(asymmetric, and with zeros, so a prefix's rollouts can all miss: the floor's case).
"""

import math

import pytest
import torch
from scipy import stats

import pilm
from pilm.errors import PotentialError
from pilm.models import TabularLM
from pilm.potentials import FunctionPotential, RolloutLookahead, SuffixLikelihood
from pilm.twists.exact import optimal_log_psi

from .conftest import mean_and_se, sigma_cells_chi2
from .test_exact_last import last_token_phi

RUNS = 600
N = 8


@pytest.fixture
def phi():
    return FunctionPotential(last_token_phi, on="tokens", name="last")


@pytest.fixture
def model():
    return TabularLM.random(5, seed=11, eos_id=4)


def test_many_rollouts_estimate_the_optimal_twist(model, phi):
    """psi-hat with R = 4000 against psi* = E[phi | s_1:t] enumerated: phi lies in
    [e^-0.7, e^1.3] where positive, so its coefficient of variation is below ~1.5 and the
    relative standard error of the mean below 1.5 / sqrt(4000) = 0.024: 0.1 is 4 SE."""
    target = pilm.Target(model, "a", phi, max_new_tokens=3)
    exact = optimal_log_psi(target)
    ahead = RolloutLookahead(phi, 3, 4000, floor=-3.0)
    prefixes = [(0,), (1, 2), (3,), (2, 2), (1,)]
    got = ahead.log_prefix(target.sequences(prefixes))
    for prefix, value in zip(prefixes, got.tolist(), strict=True):
        assert abs(math.exp(value - exact[prefix]) - 1) < 0.1, (prefix, value, exact[prefix])
    assert 4000 * 5 <= ahead.tokens <= 4000 * (2 + 1 + 2 + 1 + 2)  # a token each at least; EOS stops some early


def test_z_hat_is_unbiased_and_samples_follow_sigma_with_two_noisy_rollouts(model, phi):
    """R = 2: psi-hat is far from psi* and the floor stands in where both rollouts end in "d";
    resampling at every step puts the twist to use. 4 SE: a false alarm 6e-5; se < 0.025 puts
    a 10% bias beyond 4 SE. Then each sequence's cell E[Z-hat w 1{s}] against p0 phi (chi-square)."""
    base = pilm.Target(model, "a", phi, max_new_tokens=3)
    ahead = pilm.Target(model, "a", RolloutLookahead(phi, 3, 2, floor=-3.0), max_new_tokens=3)
    assert pilm.exact.log_z(ahead) == pytest.approx(pilm.exact.log_z(base), abs=1e-9)
    z = math.exp(pilm.exact.log_z(base))
    runs = pilm.smc([ahead] * RUNS, N, seed=0, ess_threshold=1.0, progress=False, on_extinction="return")
    mean, se = mean_and_se([math.exp(r.log_z) / z for r in runs])
    assert se < 0.025, f"too few runs to detect a 10% bias: se={se:.4f}"
    assert abs(mean - 1) < 4 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    chi2, dof = sigma_cells_chi2(ahead, runs)
    assert dof >= 10
    assert stats.chi2.sf(chi2, dof) > 1e-3, f"chi2={chi2:.1f} on {dof} cells"
    boot = pilm.smc([base] * 20, N, seed=0, ess_threshold=1.0, progress=False, on_extinction="return")
    assert [r.log_z for r in boot] != [r.log_z for r in runs[:20]]  # the look-ahead did steer the resampling


def test_a_prefix_gets_the_same_estimate_whatever_shares_its_batch(phi):
    """psi-hat is a function of the prefix (and seed) alone, duplicates are rolled out once (a
    table without EOS, so every rollout runs to the horizon and the token count is exact), chunks
    of ``max_rows`` draw what one batch does, and another seed draws other rollouts."""
    model = TabularLM.random(5, seed=11)  # no EOS
    target = pilm.Target(model, "a", phi, max_new_tokens=3)
    ahead = RolloutLookahead(phi, 3, 3, floor=-3.0)
    alone = ahead.log_prefix(target.sequences([(1,)]))
    before = ahead.tokens
    crowd = ahead.log_prefix(target.sequences([(0,), (1,), (1,), (2, 3)]))
    assert ahead.tokens - before == 3 * (2 + 2 + 1)  # (1,) twice: rolled out once
    assert crowd[1] == alone[0] and crowd[2] == alone[0]
    chunked = RolloutLookahead(phi, 3, 3, floor=-3.0, max_rows=3)  # one prefix's rollouts a batch
    assert torch.equal(chunked.log_prefix(target.sequences([(0,), (1,), (1,), (2, 3)])), crowd)
    others = [RolloutLookahead(phi, 3, 3, floor=-3.0, seed=s).log_prefix(target.sequences([(0,), (1,), (2, 3)]))
              for s in range(1, 6)]
    assert any(not torch.equal(o, crowd[[0, 1, 3]]) for o in others)


def test_rollouts_stop_at_the_given_stop_token(phi):
    """With stop = 2 ("c"), a rollout ends at its first "c": every completion scored holds "c"
    only as its last token, or none (the horizon came first)."""
    model = TabularLM.random(5, seed=11)
    target = pilm.Target(model, "a", phi, max_new_tokens=6)
    ahead = RolloutLookahead(phi, 6, 64, floor=-3.0, stop=2)
    completions = ahead._roll_out(target.sequences([(0,)]))
    assert all(2 not in c[1:-1] for c in completions)
    assert any(c[-1] == 2 and len(c) < 6 for c in completions) and any(len(c) == 6 for c in completions)


def test_phi_and_its_factors_are_the_wrapped_potentials(model):
    suffix = SuffixLikelihood(model, "ab")
    ahead = RolloutLookahead(suffix, 3, 2, power=0.5)
    assert [f for f, _ in ahead.factors()] == [suffix] and ahead.has_prefix
    assert ahead.name == f"{suffix.name} with a 2-rollout look-ahead^0.5"
    seqs = pilm.Target(model, "a", suffix, max_new_tokens=3).sequences([(0, 1, 2), (2,)])
    assert torch.equal(ahead.log_phi(seqs), suffix.log_phi(seqs))


def test_the_floor_stands_in_where_every_rollout_scores_zero(model):
    """phi = 1 only for texts ending in "d": a prefix whose R = 1 rollout misses gets the floor
    (before the power), one that hits gets log 1 = 0."""
    only_d = FunctionPotential(lambda t: 0.0 if t and t[-1] == 3 else -math.inf, on="tokens", name="ends-d")
    target = pilm.Target(model, "a", only_d, max_new_tokens=2)
    got = RolloutLookahead(only_d, 2, 1, floor=-7.0, power=0.5).log_prefix(target.sequences([(v,) for v in range(4)]))
    assert set(got.tolist()) <= {0.0, -3.5} and -3.5 in got.tolist()


def test_a_grammar_keeps_its_dead_prefixes_and_all_zero_rollouts_without_a_floor_are_an_error(model, phi):
    """A prefix the potential's own prefix score rules out stays -inf (no floor lifts it); a live
    prefix whose rollouts all score 0 is refused without a floor, naming it."""
    never_d = pilm.potentials.Regex("[abc]*")
    target = pilm.Target(model, "a", never_d, max_new_tokens=3)
    ahead = RolloutLookahead(never_d, 3, 4, floor=-3.0)
    got = ahead.log_prefix(target.sequences([(3,), (0,)]))  # "d...": dead; "a": live
    assert got[0] == -math.inf and math.isfinite(got[1])
    only_d = FunctionPotential(lambda t: 0.0 if t and t[-1] == 3 else -math.inf, on="tokens", name="ends-d")
    strict = RolloutLookahead(only_d, 2, 1, seed=3)
    with pytest.raises(PotentialError, match="phi was 0 on all 1 rollouts of .* give RolloutLookahead a floor="):
        for s in range(20):  # one rollout of one token: some prefix misses "d"
            strict.seed = s
            strict.log_prefix(target.sequences([(0,), (1,), (2,)]))


@pytest.mark.parametrize("kwargs, message", [
    ({"horizon": 0}, "horizon must be a positive integer"),
    ({"rollouts": 0}, "rollouts must be a positive integer"),
    ({"rollouts": True}, "rollouts must be a positive integer"),
    ({"power": 0}, "power must be a number > 0"),
    ({"floor": math.inf}, "floor must be a finite log value"),
])
def test_bad_arguments_are_refused(phi, kwargs, message):
    args = {"horizon": 3, "rollouts": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        RolloutLookahead(phi, args.pop("horizon"), args.pop("rollouts"), **args)
