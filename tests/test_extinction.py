"""A run whose particles all die by chance estimates Z-hat = 0; only a target shown
impossible raises."""

import math
import warnings

import pytest

import pilm
from pilm.inference.extinction import shown_impossible
from pilm.inference.smc import seeded_generators
from pilm.potentials import FunctionPotential, Regex


def rare_target():
    """Satisfiable (Z ≈ 0.04) but rare under p0, with no prefix score: particles die at the end."""
    model = pilm.models.TabularLM.random(4, seed=2, eos_id=None)
    return pilm.Target(model, "a", FunctionPotential(lambda t: 0.0 if t == (2, 2, 2) else -math.inf, on="tokens",
                                                     name="only ccc"), max_new_tokens=3)


def test_a_satisfiable_target_with_few_particles_returns_z_hat_zero_with_a_warning():
    target = rare_target()
    assert pilm.exact.log_z(target) > -5
    dead = 0
    for seed in range(20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = pilm.smc(target, 2, seed=seed, progress=False)
        if res.log_z == -math.inf:
            dead += 1
            assert res.info["extinct_at"] == 3
            (w,) = [c for c in caught if issubclass(c.category, pilm.ExtinctionWarning)]
            message = str(w.message)
            assert "step 3: all 2 particles have zero weight" in message and "(2 of 2, 100%, died at this step)" in message
            assert "more particles" in message and "twist" in message
    assert dead > 0  # with Z ≈ 0.04 and 2 particles most runs die


def test_on_extinction_raise_and_return_keep_their_meaning():
    target = rare_target()
    seed = next(s for s in range(50) if pilm.smc(target, 2, seed=s, progress=False, on_extinction="return").log_z
                == -math.inf)
    with pytest.raises(pilm.ImpossibleTargetError, match="step 3: all 2 particles"):
        pilm.smc(target, 2, seed=seed, progress=False, on_extinction="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "return" is silent
        assert pilm.smc(target, 2, seed=seed, progress=False, on_extinction="return").log_z == -math.inf


def test_enumeration_shows_a_small_target_impossible():
    model = pilm.models.TabularLM.random(4, seed=0, eos_id=3)
    target = pilm.Target(model, "a", Regex("(?=z)z+"), max_new_tokens=3)  # no token prints "z"; a look-ahead: no bound before sampling
    with pytest.raises(pilm.ImpossibleTargetError, match="exact enumeration of all .* completions within max_new_tokens=.* gives Z = 0"):
        pilm.smc(target, 16, seed=0, progress=False)


def test_every_first_token_dead_shows_a_large_target_impossible(tiny):
    target = pilm.Target(tiny, "Hi", Regex("(?!)"), max_new_tokens=3)  # matches nothing
    with pytest.raises(pilm.ImpossibleTargetError, match=r"each of the 49,152 possible first tokens has psi = 0"):
        pilm.smc(target, 4, seed=0, progress=False)


def test_a_dead_target_in_a_batch_leaves_the_others_running():
    model = pilm.models.TabularLM.random(4, seed=0, eos_id=3)
    dead = pilm.Target(model, "a", Regex("(?=z)z+"), max_new_tokens=3)  # beyond the bound: dies while sampling
    alive = pilm.Target(model, "b", Regex("[ab]*"), max_new_tokens=3)
    res = pilm.smc([dead, alive], 8, seed=0, progress=False, on_extinction="return")
    assert res[0].log_z == -math.inf and math.isfinite(res[1].log_z)
    own_seed = seeded_generators(0, 2)[1].initial_seed()  # target 1's generator in the batch
    assert res[1].tokens == pilm.smc(alive, 8, seed=own_seed, progress=False).tokens


def test_a_model_run_prefix_score_is_not_scanned_over_the_vocabulary(tiny):
    """A rollout look-ahead's prefix score runs the model: scoring all 49,152 first tokens with it
    would cost more than the run, so a dead large target is reported, not proven impossible, and
    no rollout is drawn for the check."""
    from pilm.potentials import RolloutLookahead

    ahead = RolloutLookahead(Regex("(?!)"), 3, 2, floor=-3.0)
    target = pilm.Target(tiny, "Hi", ahead, max_new_tokens=3)
    assert shown_impossible(target) is None and ahead.tokens == 0
    assert (Regex("a*") * ahead).costly_prefix and (ahead ** 0.5).costly_prefix and not Regex("a*").costly_prefix
