"""SMC, IS and rejection sampling against exact enumeration on a tabular LM."""

import math
from collections import Counter

import pytest
import torch
from scipy import stats

import pilm
from pilm.inference.resampling import SCHEMES

from .conftest import mean_and_se

RUNS = 300  # independent runs (seeds 0..299) per configuration
N = 8


def ratios(target, fn):
    z = math.exp(pilm.exact.log_z(target))
    return [math.exp(fn(seed).log_z) / z for seed in range(RUNS)]


def check_unbiased(r):
    mean, se = mean_and_se(r)
    # Z-hat is unbiased, so mean(Z-hat/Z) - 1 is ~Normal(0, se) over independent seeds;
    # 3 SE keeps a false alarm below 0.3% (deterministic seeds: it either passes or not).
    assert abs(mean - 1) < 3 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    assert se < 0.1, f"too few runs to detect a bias: se={se:.3f}"


def test_exact_log_z_matches_hand_enumeration(tabular_target):
    e = pilm.exact.enumerate_target(tabular_target)
    model = tabular_target.model
    by_hand = torch.tensor(
        [float(model.score([(0,) + s], [1])[0]) for s in e.tokens], dtype=torch.float64
    ) + e.log_phi
    assert math.isclose(pilm.exact.log_z(tabular_target), float(torch.logsumexp(by_hand, 0)), abs_tol=1e-5)
    probs = pilm.exact.distribution(tabular_target)
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
    assert all(2 not in s for s in probs), "sequences with 'c' have phi = 0"


def test_importance_sampling_is_unbiased(tabular_target):
    check_unbiased(ratios(tabular_target, lambda s: pilm.importance_sample(tabular_target, N, seed=s, on_extinction="return")))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_smc_is_unbiased(tabular_target, scheme, threshold):
    def run(seed):
        return pilm.smc(
            tabular_target, N, resample=scheme, ess_threshold=threshold, seed=seed, progress=False,
            on_extinction="return",
        )

    r = ratios(tabular_target, run)
    check_unbiased(r)
    if threshold == 1.0:
        assert len(run(0).resampled_at) >= 1


def test_smc_weighted_frequencies_match_sigma(tabular_target):
    """E[Zhat * wbar_k 1{s_k = s}] summed over k equals p0(s) phi(s) exactly (the unnormalised
    SMC estimator is unbiased for every test function), so each cell's mean over runs is
    compared to the exact value with a chi-square statistic built from the runs' own SEs."""
    e = pilm.exact.enumerate_target(tabular_target)
    gamma = dict(zip(e.tokens, torch.exp(e.log_sigma_unnormalized).tolist()))
    runs = 400
    cells = {s: [] for s in gamma}
    for seed in range(runs):
        res = pilm.smc(tabular_target, N, ess_threshold=0.5, seed=seed, progress=False, on_extinction="return")
        zhat = math.exp(res.log_z)
        mass = Counter()
        for w, toks in zip(res.weights, res.tokens):
            mass[tuple(toks)] += w
        for s in cells:
            cells[s].append(zhat * mass[s])
    chi2, dof = 0.0, 0
    for s, values in cells.items():
        mean, se = mean_and_se(values)
        if gamma[s] > 1e-3 and se > 0:  # cells with enough mass for the CLT
            chi2 += ((mean - gamma[s]) / se) ** 2
            dof += 1
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
