"""The residual twist log psi_t = a_t log L + head, against exact answers on a tabular target."""

import dataclasses
import math

import pytest
import torch

import pilm
from pilm.inference import engine
from pilm.inference.batch import seeded_generators
from pilm.inference.boundaries import Boundary
from pilm.inference.critics import PrefixCritic
from pilm.inference.resampling import get_scheme
from pilm.inference.rules import Resample
from pilm.inference.smc import run_smc
from pilm.learning import train_twist
from pilm.potentials import FunctionPotential
from pilm.proposals import make_proposal
from pilm.twists import ResidualTwist, TableTwist, Twist, load_twist, optimal_log_psi

from .conftest import mean_and_se, sigma_cells_chi2

POWERS = (0.5, 1.0, 0.7, 1.3)  # one per prefix length, all different: an off-by-one in t shows


def residual_table(target, powers=POWERS) -> dict[tuple[int, ...], float]:
    """log psi*_t - a_t log L_t for every prefix: the head that makes the residual exact."""
    out = {}
    for prefix, value in optimal_log_psi(target).items():
        if prefix:
            ahead = float(target.log_prefix_potential([list(prefix)])[0])
            out[prefix] = value - powers[len(prefix) - 1] * ahead if math.isfinite(value) else -30.0
    return out


def random_head(target, seed: int) -> TableTwist:
    """A head of N(0, 0.5^2) values: far from the residual, with Z-hat's tails light enough for
    1,000 runs (at scale 1, proposing from the head alone, single batches of 1,000 runs
    landed up to 4 SE low while 5,000 gave 0.99 ± 0.009: too heavy-tailed for a 3-SE test)."""
    head = TableTwist(target)
    with torch.no_grad():
        head.values.copy_(0.5 * torch.randn(head.values.shape, generator=torch.Generator().manual_seed(seed)))
    return head


def test_exact_residual_proposing_from_all_tokens_gives_z_on_every_seed(tabular_target):
    log_z = pilm.exact.log_z(tabular_target)
    twist = ResidualTwist(TableTwist(tabular_target, init=residual_table(tabular_target)), POWERS, propose="all")
    errors = [abs(pilm.smc(tabular_target, 8, twist=twist, ess_threshold=th, seed=s, progress=False).log_z - log_z)
              for s in range(8) for th in (0.0, 1.0)]
    assert max(errors) < 1e-4  # float error only: with psi = psi* proposed from, every weight is Z


def test_exact_residual_head_weighs_but_does_not_zero_the_variance(tabular_target):
    """Proposing from the head alone is not the optimal proposal: Z-hat varies (the look-ahead
    of the drawn token moves the weight), so a test that passed above for the wrong reason fails here."""
    twist = ResidualTwist(TableTwist(tabular_target, init=residual_table(tabular_target)), POWERS)
    values = [pilm.smc(tabular_target, 8, twist=twist, seed=s, progress=False).log_z for s in range(8)]
    assert max(values) - min(values) > 1e-3


@pytest.mark.parametrize("propose", ["head", "all"])
def test_random_residual_keeps_z_hat_unbiased_and_sigma(tabular_target, propose):
    twist = ResidualTwist(random_head(tabular_target, 1), POWERS, propose=propose)
    z = math.exp(pilm.exact.log_z(tabular_target))
    runs = pilm.smc([tabular_target] * 1000, 32, twist=twist, ess_threshold=0.5, seed=0, progress=False,
                    on_extinction="return")  # 1,000 independent runs, one batch
    mean, se = mean_and_se([math.exp(r.log_z) / z for r in runs])
    # 3 SE: false alarm < 0.3%; se < 0.033 puts a 10% bias beyond 3 SE (measured se 0.004-0.016
    # over head seeds 0-3 for both proposals).
    assert se < 0.033, f"too few runs to detect a 10% bias: se={se:.4f}"
    assert abs(mean - 1) < 3 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    chi2, cells = sigma_cells_chi2(tabular_target, runs)
    # each cell's mean is ~normal over 1,000 runs: chi2 with `cells` dof; mean + 5 sd is far
    # past its 99.9th percentile, and a sampler off sigma by 10% in a large cell lands beyond it.
    assert chi2 < cells + 5 * math.sqrt(2 * cells), f"chi2 {chi2:.1f} over {cells} cells"


def test_critic_weighs_by_head_plus_a_t_log_l_at_each_length(tabular_target):
    """Proposing from the head, the psi each row is weighed by at step t is the head at its
    drawn token plus POWERS[t-1] log L of its prefix: the index of a_t, read off the engine."""
    head = random_head(tabular_target, 2)
    proposal = make_proposal(ResidualTwist(head, POWERS))
    sampler = engine.Sampler(proposal, Boundary(), PrefixCritic(False, proposal.prefix_powers),
                             Resample(get_scheme("multinomial"), 0.0))  # no resampling: row r keeps its own past
    run = engine.run([tabular_target], 32, sampler, [torch.Generator().manual_seed(0)])
    tokens, checked = run.particles.tokens.tolist(), 0
    for info in run.steps:
        for r, finished, now in zip(info.rows.tolist(), info.finished.tolist(), info.log_psi_now.tolist(), strict=True):
            if finished:  # phi there
                continue
            s = tokens[r][: info.t]
            want = float(head.log_psi([tuple(s[:-1])], torch.zeros(1, 1))[0, s[-1]].detach())
            want += POWERS[info.t - 1] * float(tabular_target.log_prefix_potential([s])[0])
            assert now == want if math.isinf(want) else now == pytest.approx(want, abs=1e-5), (info.t, s)
            checked += 1
    assert checked > 40


def test_wrapping_proposals_keep_the_residual_s_look_ahead(tabular_target):
    """exact-last and masked proposals around a residual still weigh by its look-ahead: without it
    the run stays unbiased but is no longer the twist asked for, so no other test would notice."""
    twist = ResidualTwist(random_head(tabular_target, 4), POWERS)
    for name in ("twist", "base", "exact-last", "masked", "masked+exact-last"):
        assert make_proposal(twist, name).prefix_powers is twist, name
    assert make_proposal(ResidualTwist(TableTwist(tabular_target), propose="all")).prefix_powers is None
    assert make_proposal(None, "masked").prefix_powers is None


def test_residual_batches_distinct_targets_as_it_runs_them_apart(tabular_target):
    """Targets with other look-aheads and horizons (rows finish and leave at different steps)
    in one batch, proposing from every next token's look-ahead (each row reads its own
    target's): the same draws and estimates as each target run alone with its own generator."""

    def other(weight: float):
        def f(s):
            return weight * (s.count(1) - s.count(0))
        return FunctionPotential(f, on="tokens", prefix_fn=f, name=f"other {weight}")

    targets = [tabular_target, dataclasses.replace(tabular_target, potential=other(1.5), max_new_tokens=3),
               dataclasses.replace(tabular_target, potential=other(-2.0), max_new_tokens=2)]
    twist = ResidualTwist(random_head(tabular_target, 3), POWERS, propose="all")
    together = pilm.smc(targets, 8, twist=twist, seed=5, progress=False, on_extinction="return")
    g = seeded_generators(5, len(targets), torch.device("cpu"))
    apart = [run_smc(t, 8, g[i], twist=twist, on_extinction="return") for i, t in enumerate(targets)]
    assert [r.tokens for r in together] == [r.tokens for r in apart]
    assert [r.log_z for r in together] == pytest.approx([r.log_z for r in apart], abs=1e-5)


def test_zero_head_is_smc_on_the_look_ahead(tabular_target):
    """With head = 0 and a_t = 1 the residual is the potential's own prefix score: the same
    particles and log Z-hat as bootstrap SMC that resamples on it."""
    twist = ResidualTwist(TableTwist(tabular_target), 1.0)
    for seed in range(3):
        a = pilm.smc(tabular_target, 16, twist=twist, seed=seed, progress=False)
        b = pilm.smc(tabular_target, 16, seed=seed, progress=False)
        assert a.tokens == b.tokens
        assert math.isclose(a.log_z, b.log_z, abs_tol=1e-5)


def test_residual_refuses_what_it_cannot_twist(tabular_target):
    no_prefix = pilm.Target(tabular_target.model, "a", FunctionPotential(lambda s: 0.0, on="tokens"), max_new_tokens=4)
    with pytest.raises(ValueError, match="has none"):
        pilm.smc(no_prefix, 4, twist=ResidualTwist(TableTwist(no_prefix)), progress=False)
    with pytest.raises(ValueError, match="powers for 2 tokens"):
        pilm.smc(tabular_target, 4, twist=ResidualTwist(TableTwist(tabular_target), (1.0, 1.0)), progress=False)
    for bad in (-1.0, (1.0, math.nan), ()):
        with pytest.raises(ValueError, match="powers"):
            ResidualTwist(TableTwist(tabular_target), bad)
    with pytest.raises(ValueError, match="propose"):
        ResidualTwist(TableTwist(tabular_target), propose="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output"):
        ResidualTwist(TableTwist(tabular_target, output="log_sigmoid"))
    with pytest.raises(ValueError, match="every next token"):
        train_twist(tabular_target, "rl", twist=ResidualTwist(TableTwist(tabular_target)), steps=1, progress=False)
    with pytest.raises(ValueError, match="needs a twist with output 'log'"):  # checked before a pool is drawn
        train_twist(tabular_target, "ctl", twist=TableTwist(tabular_target, output="log_sigmoid"), pool=64, steps=1,
                    progress=False)
    stateful = TableTwist(tabular_target)
    stateful.stateful = True  # as a LoRATwist, which runs a body of its own
    with pytest.raises(ValueError, match="body of its own"):
        ResidualTwist(stateful)
    costly = FunctionPotential(lambda s: -0.1 * len(s), on="tokens", prefix_fn=lambda s: -0.1 * len(s))
    costly.costly_prefix = True  # as a skip model's or a rollout look-ahead
    run_model = dataclasses.replace(tabular_target, potential=costly)
    with pytest.raises(ValueError, match="runs a model"):
        pilm.smc(run_model, 4, twist=ResidualTwist(TableTwist(run_model), propose="all"), progress=False)


def misfit(twist: ResidualTwist, target) -> float:
    """Sum over t of the sigma-weighted variance, over the unfinished prefixes of t tokens, of the
    whole twist's log psi_t minus log psi*_t (a constant per t is free: ctl's gradient ignores
    it; at a complete sequence SMC reads phi, never psi)."""
    exact = pilm.exact.enumerate_target(target)
    sigma = torch.exp(exact.log_sigma_unnormalized - exact.log_z).tolist()
    star = optimal_log_psi(target)
    mass: dict[tuple[int, ...], float] = {}
    for s, w in zip(exact.tokens, sigma, strict=True):
        for t in range(1, len(s) + 1):
            mass[s[:t]] = mass.get(s[:t], 0.0) + w
    total = 0.0
    for t in range(1, target.max_new_tokens + 1):
        prefixes = [p for p in mass if len(p) == t and mass[p] > 0 and not target.is_complete(list(p))]
        if not prefixes:
            continue
        with torch.no_grad():
            head = twist.head.log_psi([p[:-1] for p in prefixes], torch.zeros(len(prefixes), 1))
        mine = head[torch.arange(len(prefixes)), [p[-1] for p in prefixes]].double()
        mine += twist.look_ahead(target, prefixes)
        d = mine - torch.tensor([star[p] for p in prefixes], dtype=torch.float64)
        w = torch.tensor([mass[p] for p in prefixes], dtype=torch.float64)
        w /= w.sum()
        total += float((w * (d - (w * d).sum()) ** 2).sum())
    return total


@pytest.mark.parametrize("negatives", ["sis", "smc"])
def test_ctl_with_sigma_positives_teaches_the_residual_the_rest(tabular_target, negatives):
    """ctl on a residual (head from zero, a_t fixed) with exact sigma samples as positives, and
    negatives from each draw's SIS weights or from a twisted SMC population: the whole twist
    a_t log L + head approaches psi* (up to a constant per t)."""
    exact = pilm.exact.enumerate_target(tabular_target)
    rng = torch.Generator().manual_seed(5)
    draws = torch.multinomial(torch.exp(exact.log_sigma_unnormalized - exact.log_z), 4096, True, generator=rng)
    positives = [exact.tokens[i] for i in draws.tolist()]
    twist = ResidualTwist(TableTwist(tabular_target), POWERS)
    before = misfit(twist, tabular_target)
    train_twist(tabular_target, "ctl", twist=twist, positives=positives, steps=300, batch_size=64, lr=0.1,
                seed=0, progress=False, negatives=negatives)
    after = misfit(twist, tabular_target)
    # measured 0.56 -> 0.072 (sis) and 0.034 (smc): 64 negatives a step leave some error, so not 0.
    assert after < 0.25 * before, f"misfit {before:.3f} -> {after:.3f}"
    with pytest.raises(ValueError, match="positives"):
        train_twist(tabular_target, "sixo", twist=twist, positives=positives, steps=1, progress=False)
    with pytest.raises(ValueError, match="give positives or pool"):
        train_twist(tabular_target, "ctl", twist=twist, negatives="smc", steps=1, progress=False)


def test_residual_twist_saves_and_loads(tiny, tmp_path):
    twist = ResidualTwist(Twist.for_model(tiny, kind="tied", init="base"), (1.0, 0.5, 0.25))
    with torch.no_grad():
        twist.head.token_bias.add_(torch.randn(twist.head.token_bias.shape, generator=torch.Generator().manual_seed(0)))
    back = ResidualTwist.from_pretrained(twist.save_pretrained(tmp_path / "residual"), tiny)
    assert back.powers == twist.powers and back.propose == "head"
    hidden = torch.randn(2, back.head.config.hidden_size)
    assert torch.equal(back.log_psi(None, hidden), twist.log_psi(None, hidden))
    with pytest.raises(FileNotFoundError, match="residual"):
        ResidualTwist.from_pretrained(tmp_path, tiny)
    assert isinstance(load_twist(tmp_path / "residual", tiny), ResidualTwist)  # what pilm sample --twist reads
    assert type(load_twist(twist.head.save_pretrained(tmp_path / "head"), tiny)) is Twist
    with pytest.raises(FileNotFoundError, match="no saved twist"):
        load_twist(tmp_path, tiny)


def test_smc_negatives_estimate_the_twisted_targets_expectation(tabular_target):
    """negative_term at step t estimates E_{pi_t}[log psi_t], pi_t ∝ p0 psi_t over prefixes of t
    tokens, against the same sum by enumeration; and after the twist changes it reweighs the
    same population to the new pi_t (what reuse > 1 reads)."""
    from pilm.learning.contrast import negative_term, smc_populations

    def exact(twist) -> list[float]:
        e = pilm.exact.enumerate_target(tabular_target)
        prefixes = sorted({s[:t] for s in e.tokens for t in range(1, len(s) + 1)})
        out = []
        for t in range(1, tabular_target.max_new_tokens + 1):
            mine = [p for p in prefixes if len(p) == t and not tabular_target.is_complete(list(p[:-1]))]
            log_p0 = tabular_target.log_p0([list(p) for p in mine]).double()
            with torch.no_grad():
                head = twist.head.log_psi([p[:-1] for p in mine], torch.zeros(len(mine), 1))
            log_psi = head[torch.arange(len(mine)), [p[-1] for p in mine]].double() + twist.look_ahead(tabular_target, mine)
            ok = torch.isfinite(log_psi)
            w = torch.softmax((log_p0 + log_psi)[ok], 0)
            out.append(float((w * log_psi[ok]).sum()))
        return out

    twist = ResidualTwist(random_head(tabular_target, 7), POWERS)
    populations, _ = smc_populations(tabular_target, twist, 4000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        estimate = negative_term(tabular_target, twist, populations).tolist()
        errors = [abs(a - b) for a, b in zip(estimate, exact(twist), strict=True)]
        twist.head.values.mul_(0.5)  # another twist (as after updates): the same draws, reweighed
        again = negative_term(tabular_target, twist, populations).tolist()
        errors += [abs(a - b) for a, b in zip(again, exact(twist), strict=True)]
    # 4,000 particles: measured errors 0.002-0.039 over the 4 steps and both twists; leaving out
    # psi'_{t-1} in the weight (checked by breaking it) fails this.
    assert max(errors) < 0.06, errors


def test_smc_populations_follow_the_run_and_refuse_what_they_cannot_read(tabular_target):
    """Each step's population is the rows that drew it, with prefixes of t tokens; a LoRA-like
    twist is refused; a run that goes extinct still has finite negatives (weighed by the current
    twist), and a twist that rules every row out gives none (NaN: the trainer skips the step)."""
    from pilm.learning.contrast import negative_term, smc_populations

    twist = ResidualTwist(random_head(tabular_target, 6), POWERS)
    populations, run = smc_populations(tabular_target, twist, 16, torch.Generator().manual_seed(0))
    assert len(populations) == len(run.steps)
    assert all(len(p) == t + 1 for t, pop in enumerate(populations) for p in pop.prefixes)
    stateful = TableTwist(tabular_target)
    stateful.stateful = True
    with pytest.raises(ValueError, match="body of its own"):
        smc_populations(tabular_target, stateful, 4, torch.Generator().manual_seed(0))
    never = dataclasses.replace(tabular_target, potential=FunctionPotential(lambda s: -math.inf, on="tokens",
                                                                            prefix_fn=lambda s: 0.0))
    never_twist = ResidualTwist(TableTwist(never))
    populations, run = smc_populations(never, never_twist, 4, torch.Generator().manual_seed(0))
    assert any(bool(info.extinct[0]) for info in run.steps)
    assert torch.isfinite(negative_term(never, never_twist, populations)).all()
    with torch.no_grad():
        never_twist.head.values.fill_(-math.inf)  # a twist that now rules every row out: no estimate at any step
    assert torch.isnan(negative_term(never, never_twist, populations)).all()
