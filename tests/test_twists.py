"""Twisted SMC and twist learning against exact answers on tabular targets."""

import math

import pytest
import torch

import pilm
from pilm.inference.smc import incremental_log_weight, proposal_log_probs
from pilm.learning import OBJECTIVES, sample_batch
from pilm.potentials import FunctionPotential
from pilm.twists import TableTwist, optimal_log_psi

from .conftest import mean_and_se


@pytest.fixture
def model():
    return pilm.models.TabularLM.random(4, seed=3, eos_id=3)


@pytest.fixture
def soft_target(model):
    """phi <= 1 (FUDGE needs a probability) with a hard zero (no 'c') and no prefix score."""

    def log_phi(s):
        return -math.inf if 2 in s else -0.3 * s.count(0) - 0.2 * s.count(1)

    phi = FunctionPotential(log_phi, on="tokens", name="soft")
    return pilm.Target(model, "a", phi, max_new_tokens=4)


def test_optimal_twist_gives_exact_z_on_every_seed(tabular_target):
    log_z = pilm.exact.log_z(tabular_target)
    twist = pilm.twists.optimal(tabular_target)
    errors = [
        abs(pilm.smc(tabular_target, 8, twist=twist, ess_threshold=th, resample=scheme, seed=s, progress=False).log_z - log_z)
        for s in range(10) for th in (0.0, 0.5, 1.0) for scheme in ("multinomial", "systematic", "residual")
    ]
    assert max(errors) < 1e-5  # float error only: every particle's weight is exactly Z
    assert pilm.exact.enumerate_target(tabular_target, twist=twist).kl_sigma_q() < 1e-6


def test_twist_weight_is_token_independent_for_the_twisted_proposal():
    g = torch.Generator().manual_seed(0)
    log_p0 = torch.log_softmax(torch.randn(3, 7, generator=g), -1)
    log_psi = torch.randn(3, 7, generator=g)
    prev = torch.randn(3, generator=g)
    log_q = proposal_log_probs(log_p0, log_psi)
    for v in range(7):
        w = incremental_log_weight(log_p0[:, v], log_psi[:, v], prev, log_q[:, v])
        expected = torch.logsumexp(log_p0 + log_psi, -1).double() - prev.double()
        assert torch.allclose(w, expected, atol=1e-5)


def test_twist_of_ones_equals_bootstrap_smc(soft_target):
    ones = TableTwist(soft_target)  # log psi = 0 everywhere
    for th in (0.0, 0.5, 1.0):
        a = pilm.smc(soft_target, 16, twist=ones, ess_threshold=th, seed=4, progress=False)
        b = pilm.smc(soft_target, 16, ess_threshold=th, seed=4, progress=False)
        assert a.tokens == b.tokens and a.resampled_at == b.resampled_at
        assert math.isclose(a.log_z, b.log_z, abs_tol=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 1.0])
@pytest.mark.parametrize("proposal", ["twist", "base"])
def test_random_twist_keeps_z_hat_unbiased(tabular_target, threshold, proposal):
    twist = TableTwist(tabular_target)
    with torch.no_grad():
        twist.values.copy_(torch.randn(twist.values.shape, generator=torch.Generator().manual_seed(1)))
    z = math.exp(pilm.exact.log_z(tabular_target))
    runs = pilm.smc([tabular_target] * 1000, 32, twist=twist, proposal=proposal, ess_threshold=threshold, seed=0,
                    progress=False, on_extinction="return")  # 1,000 independent runs, one batch
    mean, se = mean_and_se([math.exp(r.log_z) / z for r in runs])
    # 3 SE: false alarm < 0.3%; se < 0.033 puts a 10% bias beyond 3 SE. A random twist makes
    # Z-hat heavy-tailed: at N = 8, 1,000 runs gave se 0.03-0.08, so N = 32 (measured se
    # 0.015-0.027 over seeds 0-2 and the four configurations).
    assert se < 0.033, f"too few runs to detect a 10% bias: se={se:.4f}"
    assert abs(mean - 1) < 3 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"


def fixed_point(target, objective):
    """Each objective's optimum: psi* (CTL, RL, DPG, FUDGE) or psi*/Z (SIXO's density ratio)."""
    table = optimal_log_psi(target)
    if objective == "sixo":
        log_z = table[()]
        table = {k: v - log_z for k, v in table.items()}
    return TableTwist(target, table, output=OBJECTIVES[objective].twist_output)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_gradient_is_zero_in_expectation_at_the_fixed_point(soft_target, objective):
    spec = OBJECTIVES[objective]
    twist = fixed_point(soft_target, objective)
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(400):  # FUDGE with a per-sequence mean over t (biased) gave |z| 3.7-5.8 at 150 draws
        batch, _ = sample_batch(soft_target, twist, twist, 16, g, keep_logprobs=spec.needs_logprobs)
        base = sample_batch(soft_target, None, twist, 16, g, keep_logprobs=False)[0] if spec.needs_base_samples else None
        twist.zero_grad()
        spec.loss(batch, base).backward()
        grads.append(twist.values.grad.flatten().clone())
    grads = torch.stack(grads).double()
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    # DPG pushes every token's psi at every visited prefix: a rare token's coordinate takes
    # many small pushes and, when drawn, one large jump that a run may never see; its sample SE
    # then measures the pushes alone (|z| 5-9 with an exact sampler). The SE is floored at one
    # unseen jump of the largest size observed (DPG: |z| <= 2.2 on 3 seeds; FUDGE with a
    # per-sequence mean over t, which is biased, still |z| 8.2-9.8).
    se = (se**2 + (grads.abs().max() / len(grads)) ** 2).sqrt()
    # Each coordinate must lie within 5 SE of 0 (over a few hundred coordinates a false alarm
    # is < 1e-3), plus 1e-6 for float32 rounding (deterministic coordinates have SE ~ 0).
    z = (mean.abs() - 1e-6).clamp(min=0) / se.clamp(min=1e-12)
    assert (z < 5).all(), f"max |z| = {z.max():.1f}"


# KL(sigma || q) of the twisted proposal starts at 0.765; 200 steps of batch 32 (lr 0.1) reach
# 0.010-0.066 for every objective over training seeds 0-2 (measured). Bound: 0.1.
KL_AFTER_TRAINING = 0.1


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_training_brings_exact_kl_down(soft_target, objective):
    twist = TableTwist(soft_target, output=OBJECTIVES[objective].twist_output)
    before = pilm.exact.enumerate_target(soft_target, twist=twist).kl_sigma_q()
    pilm.train_twist(soft_target, objective, steps=200, batch_size=32, lr=0.1, twist=twist, seed=0, progress=False)
    after = pilm.exact.enumerate_target(soft_target, twist=twist).kl_sigma_q()
    assert after < KL_AFTER_TRAINING < before, (before, after)


def test_unknown_objective_and_output_mismatch(soft_target):
    with pytest.raises(ValueError, match="known: ctl"):
        pilm.train_twist(soft_target, "magic", steps=1, progress=False)
    with pytest.raises(ValueError, match="log_sigmoid"):
        pilm.train_twist(soft_target, "fudge", steps=1, twist=TableTwist(soft_target), progress=False)


def test_a_lora_twist_reads_the_ending_it_is_conditioned_on(tiny, tmp_path):
    """An amortised LoRA twist (infilling several endings) is conditional like a frozen-body
    twist: before, train_twist built it without ``conditional`` and its log psi dropped the
    condition, so it never saw the ending it was trained for."""
    from pilm.potentials import SuffixLikelihood
    from pilm.twists.lora import LoRATwist

    ends = [pilm.Target(tiny, "The cat", SuffixLikelihood(tiny, e), max_new_tokens=3) for e in (" sat down.", " ran!")]
    twist = pilm.train_twist(ends, "ctl", body="lora", steps=1, batch_size=2, seed=0, progress=False).model
    assert twist.head.config.conditional
    tokens, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        first, second = (twist.log_psi_teacher_forced(t, tokens, mask) for t in ends)
        assert not torch.allclose(first, second)
        again = LoRATwist.from_pretrained(twist.save_pretrained(tmp_path / "t"), tiny)
        assert again.head.config.conditional
        assert torch.allclose(again.log_psi_teacher_forced(ends[0], tokens, mask), first, atol=1e-5)
