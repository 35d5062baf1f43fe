"""The exact-last-step proposal and the look-ahead suffix twist, against exact enumeration.

The target: a random 5-token table (EOS = 4), prompt "a", horizon 3, and a potential that
reads the last token: phi = exp(0.9 [last is "a"] - 0.7 [last is "b"] + 0.2 #c) and 0 when the
text ends in "d" (asymmetric, with zeros the floor must step around).
"""

import math

import pytest
import torch
from scipy import stats

import pilm
from pilm.models import TabularLM
from pilm.potentials import FunctionPotential, SuffixLikelihood
from pilm.proposals import ExactLastProposal, MaskedProposal

from .conftest import mean_and_se, sigma_cells_chi2

RUNS = 600
N = 8


def last_token_phi(t) -> float:
    text = "".join("abcd"[i] for i in t if i < 4)
    if text.endswith("d"):
        return -math.inf
    return 0.9 * text.endswith("a") - 0.7 * text.endswith("b") + 0.2 * text.count("c")


@pytest.fixture
def target():
    model = TabularLM.random(5, seed=11, eos_id=4)
    return pilm.Target(model, "a", FunctionPotential(last_token_phi, on="tokens", name="last"), max_new_tokens=3)


def ratios(target, **kw):
    z = math.exp(pilm.exact.log_z(target))
    runs = pilm.smc([target] * RUNS, N, seed=0, progress=False, on_extinction="return", **kw)
    return [math.exp(r.log_z) / z for r in runs], runs


def test_with_every_token_scored_the_last_weight_is_z(target):
    """Horizon 1 and top_m >= V: q = p0 phi / Z exactly, so every particle's weight is Z and
    log Z-hat = log Z on every run (zero variance: any error in q shows)."""
    one = pilm.Target(target.model, "a", target.potential, max_new_tokens=1)
    log_z = pilm.exact.log_z(one)
    for seed in range(5):
        res = pilm.smc(one, 6, proposal=ExactLastProposal(top_m=5), ess_threshold=0.0, seed=seed, progress=False)
        assert res.log_z == pytest.approx(log_z, abs=1e-5)
        assert max(res.log_weights) - min(res.log_weights) < 1e-5
        assert res.info["compute"]["exact_last_sequences"] == 6 * 5  # 6 rows x 5 candidates, one call


@pytest.mark.parametrize("top_m, threshold", [(2, 0.0), (2, 0.5), (5, 0.5)])
def test_z_hat_stays_unbiased_with_a_floor_under_the_unscored_tokens(target, top_m, threshold):
    r, _ = ratios(target, proposal=ExactLastProposal(top_m=top_m), ess_threshold=threshold)
    mean, se = mean_and_se(r)
    # 4 SE: a false alarm 6e-5; se < 0.025 puts a 10% bias beyond 4 SE (measured se 0.01-0.02)
    assert se < 0.025, f"too few runs to detect a 10% bias: se={se:.4f}"
    assert abs(mean - 1) < 4 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"


def test_its_log_q_is_a_distribution_and_lowers_the_last_weights_spread(target):
    """Enumerated with the proposal, q sums to 1 over the completions and is positive wherever
    sigma is; KL(sigma || q) falls below the base model's."""
    e = pilm.exact.enumerate_target(target, proposal=ExactLastProposal(top_m=2))
    q = e.log_q.exp()
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-5)
    assert bool((q[e.log_sigma > -math.inf] > 0).all())
    base = pilm.exact.enumerate_target(target, proposal=pilm.proposals.BaseProposal())
    assert e.kl_sigma_q() < base.kl_sigma_q() - 0.05


def test_samples_follow_sigma(target):
    """E[Z-hat · w_k 1{s_k = s}] = p0(s) phi(s) for every sequence: each cell's mean over runs
    against the exact value, a chi-square from the runs' own standard errors."""
    _, runs = ratios(target, proposal="exact-last", ess_threshold=0.5)
    chi2, dof = sigma_cells_chi2(target, runs)
    assert dof >= 10
    assert stats.chi2.sf(chi2, dof) > 1e-3, f"chi2={chi2:.1f} on {dof} cells"


def test_it_composes_with_a_mask_and_names_itself(target):
    regex = pilm.potentials.Regex("[abc]*")  # no "d": the mask and phi agree
    masked = pilm.Target(target.model, "a", target.potential * regex, max_new_tokens=3)
    proposal = pilm.proposals.make_proposal(proposal="masked+exact-last")
    assert isinstance(proposal, ExactLastProposal) and isinstance(proposal.inner, MaskedProposal)
    r, runs = ratios(masked, proposal=proposal, ess_threshold=0.5)
    mean, se = mean_and_se(r)
    assert se < 0.025 and abs(mean - 1) < 4 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    assert all("d" not in s for res in runs for s in res.samples)
    assert runs[0].info["proposal"] == "exact-last (top 16) + masked"
    with pytest.raises(ValueError, match="top_m must be a positive integer"):
        ExactLastProposal(top_m=0)
    with pytest.raises(ValueError, match="'exact-last'"):
        pilm.smc(target, 2, proposal="exact-lats", progress=False)


def test_the_lookahead_suffix_twist_keeps_z_hat_unbiased_and_phi_untempered():
    """SuffixLikelihood(lookahead=alpha): phi unchanged, a prefix score alpha log p(suffix | prefix),
    and twisted SMC with it stays unbiased for Z = E_p0[p(suffix | s)]."""
    model = TabularLM.random(4, seed=2, eos_id=3)
    plain = SuffixLikelihood(model, "ab")
    ahead = SuffixLikelihood(model, "ab", lookahead=0.5)
    assert not plain.has_prefix and ahead.has_prefix and "lookahead 0.5" in ahead.name
    target = pilm.Target(model, "a", ahead, max_new_tokens=3)
    seqs = target.sequences([[0, 1], [2]])
    assert torch.allclose(ahead.log_prefix(seqs), 0.5 * plain.log_phi(seqs))
    assert pilm.exact.log_z(target) == pytest.approx(pilm.exact.log_z(pilm.Target(model, "a", plain,
                                                                                   max_new_tokens=3)), abs=1e-6)
    r, _ = ratios(target, ess_threshold=0.5)
    mean, se = mean_and_se(r)
    assert se < 0.025 and abs(mean - 1) < 4 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    with pytest.raises(ValueError, match="lookahead must be a number >= 0"):
        SuffixLikelihood(model, "ab", lookahead=-1)


def test_per_step_lookahead_powers_apply_by_prefix_length_and_keep_z_hat_unbiased():
    """lookahead=(a_1, a_2, ...): a prefix of t tokens is scored a_t log p(suffix | prefix) (the
    last power beyond the sequence), Z-hat stays unbiased (asymmetric powers: 1.5 then 0.2;
    the same 4-SE check as above), and bad powers are refused."""
    model = TabularLM.random(4, seed=2, eos_id=3)
    plain = SuffixLikelihood(model, "ab")
    ahead = SuffixLikelihood(model, "ab", lookahead=(1.5, 0.2))
    assert ahead.has_prefix and "a_t=(1.5, 0.2)" in ahead.name
    target = pilm.Target(model, "a", ahead, max_new_tokens=3)
    seqs = target.sequences([[0], [0, 1], [2, 1, 0]])
    assert torch.allclose(ahead.log_prefix(seqs), torch.tensor([1.5, 0.2, 0.2]) * plain.log_phi(seqs).float())
    r, _ = ratios(target, ess_threshold=0.5)
    mean, se = mean_and_se(r)
    assert se < 0.025 and abs(mean - 1) < 4 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    assert not SuffixLikelihood(model, "ab", lookahead=(0.0, 0.0)).has_prefix
    for bad in ((), (0.5, -1), (True,), [float("inf")]):
        with pytest.raises(ValueError, match="lookahead must be a number >= 0 or a non-empty sequence"):
            SuffixLikelihood(model, "ab", lookahead=bad)


def test_fitted_lookahead_powers_are_the_within_target_slopes_on_p0_draws():
    """fit_lookahead: a_t is the least-squares slope of l_T on l_t over p0's draws (each target's
    means removed), computed here by hand from the same draws; a_T = 1, powers lie in [0, 1], and
    a target without a suffix potential is refused."""
    import statistics

    from pilm.evaluation import fit_lookahead
    from pilm.inference.smc import run_smc
    from pilm.models.device import seeded_generator

    model = TabularLM.random(4, seed=2, eos_id=3)
    targets = [pilm.Target(model, prompt, SuffixLikelihood(model, "ab"), max_new_tokens=3) for prompt in ("a", "b")]
    powers = fit_lookahead(targets, 64, seed=5)
    assert len(powers) == 2  # a_1, a_2: a chain of 3 tokens is complete, scored by phi itself
    runs = run_smc(targets, 64, seeded_generator(5, model.device), ess_threshold=0.0, use_prefix=False)
    inside = []
    for t in (1, 2):  # draws that end (EOS) at or before t drop out of a_t
        xs, ys = [], []
        for target, run in zip(targets, runs):
            draws = [list(s) for s in run.tokens if len(s) > t]
            x = target.potential.log_phi(target.sequences([s[:t] for s in draws])).tolist()
            y = target.potential.log_phi(target.sequences(draws)).tolist()
            xs += [v - statistics.fmean(x) for v in x]
            ys += [v - statistics.fmean(y) for v in y]
        slope = sum(a * b for a, b in zip(xs, ys)) / sum(a * a for a in xs)
        assert powers[t - 1] == pytest.approx(min(1.0, max(0.0, slope)), abs=1e-6)
        inside.append(0 < slope < 1)
    assert any(inside)  # at least one power is the slope itself, not a clip: the check has teeth
    with pytest.raises(ValueError, match="SuffixLikelihood factor"):
        fit_lookahead([pilm.Target(model, "a", max_new_tokens=3)])


@pytest.mark.parametrize("horizon", [1, 3])
def test_it_keeps_the_proposal_protocol(target, horizon):
    """pilm.testing.check_proposal: normalised, reindexed and held in lock-step with the model;
    at horizon 1 the reindex is checked on the last token itself."""
    short = pilm.Target(target.model, "a", target.potential, max_new_tokens=horizon)
    pilm.testing.check_proposal(ExactLastProposal(top_m=2), short, n=3)
