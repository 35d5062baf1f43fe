"""SMC, IS and rejection sampling against exact enumeration on a tabular LM."""

import math
from collections import Counter

import pytest
import torch
from scipy import stats

import pilm
from pilm.inference.resampling import SCHEMES

from .conftest import mean_and_se, sigma_cells_chi2

RUNS = 1000  # independent runs per configuration: one batched call, one generator per copy of the target
N = 8


def ratios(target, fn):
    """Z-hat / Z of RUNS independent runs; ``fn(targets)`` runs a list of targets as one batch."""
    z = math.exp(pilm.exact.log_z(target))
    return [math.exp(r.log_z) / z for r in fn([target] * RUNS)]


def check_unbiased(r):
    mean, se = mean_and_se(r)
    # Z-hat is unbiased, so mean(Z-hat/Z) - 1 is ~Normal(0, se) over independent runs; 3 SE
    # keeps a false alarm below 0.3% (deterministic seeds: it either passes or not). The SE cap
    # makes the test able to fail: with se < 0.033 a 10% bias in Z-hat lies beyond 3 SE. At
    # N = 8 one run's Z-hat/Z has sd ~0.8 here, so 1,000 runs give se 0.020-0.027 (measured
    # over the eight SMC configurations and IS), where a 10% bias is 3.7-5 SE away.
    assert se < 0.033, f"too few runs to detect a 10% bias: se={se:.3f}"
    assert abs(mean - 1) < 3 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"


def by_hand_sigma(model, horizon=4):
    """p0(s | "a") phi(s) of every completion, from the table's own numbers (``next_logprobs``
    normalised in float64) and the potential written out: phi = 0 if the text has a 'c',
    else exp(0.8 #a - 0.5 #b + 0.1 len(s)) with EOS counted in len(s), as
    ``asymmetric_potential`` says. Nothing of pilm's enumeration, model stepping or
    potential evaluation is used."""
    eos, out = 3, {}

    def p_next(prefix):
        return torch.softmax(torch.as_tensor(model.next_logprobs((0,) + prefix), dtype=torch.float64), 0)

    def walk(prefix, p):
        probs = p_next(prefix)
        for v in range(4):
            s, ps = prefix + (v,), p * float(probs[v])
            if v == eos or len(s) == horizon:
                out[s] = 0.0 if 2 in s else ps * math.exp(0.8 * s.count(0) - 0.5 * s.count(1) + 0.1 * len(s))
            else:
                walk(s, ps)

    walk((), 1.0)
    return out


def test_exact_log_z_matches_hand_enumeration(tabular_target):
    gamma = by_hand_sigma(tabular_target.model)
    assert len(gamma) == 1 + 3 + 9 + 27 + 81  # EOS at step 1..3, or the horizon at step 4
    z = sum(gamma.values())
    assert math.isclose(pilm.exact.log_z(tabular_target), math.log(z), abs_tol=1e-5)
    probs = pilm.exact.distribution(tabular_target)
    assert set(probs) == {s for s, g in gamma.items() if g > 0}, "sequences with 'c' have phi = 0"
    # every sequence's probability, not only their sum (which is 1 by construction)
    assert max(abs(probs[s] - gamma[s] / z) for s in probs) < 1e-6


def test_importance_sampling_is_unbiased(tabular_target):
    check_unbiased(ratios(tabular_target, lambda ts: pilm.importance_sample(ts, N, seed=0, on_extinction="return")))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_smc_is_unbiased(tabular_target, scheme, threshold):
    def run(targets):
        return pilm.smc(
            targets, N, resample=scheme, ess_threshold=threshold, seed=0, progress=False, on_extinction="return",
        )

    r = ratios(tabular_target, run)
    check_unbiased(r)
    if threshold == 1.0:
        assert len(run(tabular_target).resampled_at) >= 1


def test_smc_weighted_frequencies_match_sigma(tabular_target):
    """E[Zhat * wbar_k 1{s_k = s}] summed over k equals p0(s) phi(s) exactly (the unnormalised
    SMC estimator is unbiased for every test function), so each cell's mean over runs is
    compared to the exact value with a chi-square statistic built from the runs' own SEs."""
    runs = [pilm.smc(tabular_target, N, ess_threshold=0.5, seed=seed, progress=False, on_extinction="return")
            for seed in range(400)]
    chi2, dof = sigma_cells_chi2(tabular_target, runs)
    # Under correctness chi2 ~ chi-square(dof) approximately; p < 0.001 would flag a bias.
    assert dof >= 10
    assert stats.chi2.sf(chi2, dof) > 1e-3, f"chi2={chi2:.1f} on {dof} cells"


def test_rejection_samples_follow_sigma_chi_square():
    model = pilm.models.TabularLM.random(3, seed=5, eos_id=2)
    target = pilm.Target(model, prompt="", potential=pilm.potentials.Sentiment("positive", prefix=False) ** 0
                         * pilm.potentials.FunctionPotential(lambda t: -0.7 * t.count(0), on="tokens"),
                         max_new_tokens=3)
    sigma = pilm.exact.distribution(target)
    res = pilm.rejection_sample(target, 3000, seed=0, max_draws=100_000)
    counts = Counter(map(tuple, res.tokens))
    keys = sorted(sigma)
    observed = [counts[k] for k in keys]
    expected = [sigma[k] * 3000 for k in keys]
    assert sum(observed) == 3000 and set(counts) <= set(sigma)
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    z = math.exp(pilm.exact.log_z(target))
    # the acceptance rate is a binomial estimate of Z
    assert abs(res.acceptance_rate - z) < 4 * math.sqrt(z * (1 - z) / res.n_draws)


def test_resampling_off_equals_importance_sampling(tabular_target):
    """ess_threshold=0 with a prefix-aware potential telescopes to the final phi: same draws,
    same weights, same Z-hat as plain importance sampling (which ignores prefix scores)."""
    a = pilm.smc(tabular_target, 32, ess_threshold=0.0, seed=7, progress=False)
    b = pilm.importance_sample(tabular_target, 32, seed=7)
    assert a.tokens == b.tokens and a.resampled_at == []
    assert torch.allclose(torch.tensor(a.log_weights), torch.tensor(b.log_weights), atol=1e-5)
    assert math.isclose(a.log_z, b.log_z, abs_tol=1e-5)


def test_seeded_runs_are_identical_and_roundtrip_jsonl(tabular_target, tmp_path):
    a = pilm.smc(tabular_target, 16, seed=11, progress=False)
    b = pilm.smc(tabular_target, 16, seed=11, progress=False)
    assert a.tokens == b.tokens and a.log_weights == b.log_weights and a.log_z == b.log_z
    a.to_jsonl(tmp_path / "r.jsonl")
    c = pilm.SMCResult.from_jsonl(tmp_path / "r.jsonl")
    assert c.tokens == a.tokens and c.log_z == a.log_z and c.ancestry == a.ancestry


def test_ancestry_and_ess_trace_shapes(tabular_target):
    res = pilm.smc(tabular_target, 16, ess_threshold=1.0, seed=0, progress=False)
    assert len(res.ess) == len(res.ancestry) <= tabular_target.max_new_tokens
    assert all(len(a) == 16 for a in res.ancestry)
    assert all(0 < e <= 16 + 1e-9 for e in res.ess)
    for t, parents in enumerate(res.ancestry, start=1):
        if t not in res.resampled_at:
            assert parents == list(range(16))


def test_draw_resamples_particles_by_weight(tabular_target):
    res = pilm.smc(tabular_target, 8, ess_threshold=0.0, seed=3, progress=False)
    drawn = res.draw(20_000, seed=1)
    assert drawn == res.draw(20_000, seed=1) and drawn != res.draw(20_000, seed=2)
    mass = Counter()
    for w, toks in zip(res.weights, res.tokens):
        mass[tuple(toks)] += w
    freq = Counter(tuple(s) for s in drawn)
    for s, w in mass.items():  # binomial: 5 sd of a proportion from 20,000 draws is at most 0.018
        assert abs(freq[s] / 20_000 - w) < 5 * math.sqrt(w * (1 - w) / 20_000) + 1e-9, s
    dead = pilm.smc(tabular_target, 4, seed=0, progress=False)
    dead.log_weights = [-math.inf] * 4
    with pytest.raises(ValueError, match="extinct"):
        dead.draw(3)
