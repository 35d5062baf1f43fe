"""Step-level samplers against exact enumeration on a tabular model with a step token.

The toy: a random 3-token LM (a, b, c), no EOS; a step ends at "c" or after 2 tokens, a chain
has exactly 2 steps, so there are 7 x 7 = 49 chains, enumerated exactly below. The process
reward is an asymmetric table of probabilities per prefix.
"""

import dataclasses
import functools
import hashlib
import itertools
import math
import warnings

import pytest
import torch
from scipy import stats

import pilm
from pilm.errors import ImpossibleTargetError
from pilm.models import TabularLM
from pilm.potentials import FunctionPotential
from pilm.prm import FunctionPRM, PRMError, ProcessReward, StepBatch
from pilm.steps import Steps


STEP = Steps(delimiter=2, max_steps=2, max_step_tokens=2)
ONE_STEP = [(2,), (0, 2), (1, 2), (0, 0), (0, 1), (1, 0), (1, 1)]  # every possible step


def toy(potential=None):
    return pilm.Target(TabularLM.random(3, seed=5), [0], potential, max_new_tokens=4, steps=STEP)


def chains():
    return [a + b for a, b in itertools.product(ONE_STEP, ONE_STEP)]


def log_p(target, tokens):
    return float(target.log_p0([list(tokens)])[0])


def table_score(tokens) -> float:
    """A fixed pseudo-random score in [0.05, 0.95] per prefix (no symmetry to hide a sign error)."""
    h = hashlib.blake2b(repr(tuple(tokens)).encode(), digest_size=8).digest()
    return 0.05 + 0.9 * int.from_bytes(h, "little") / 2**64


PRM = FunctionPRM(lambda prompt, tokens: table_score(tokens), on="tokens", name="table")


def exact(target, weight):
    """{chain: normalised p(chain) weight(chain)} and log Z."""
    w = {x: math.exp(log_p(target, x)) * weight(x) for x in chains()}
    z = sum(w.values())
    return {x: v / z for x, v in w.items()}, math.log(z)


def ratios(results, log_z):
    return torch.tensor([math.exp(r.log_z - log_z) for r in results], dtype=torch.float64)


def within(x: torch.Tensor, k: float = 4.0) -> bool:
    """mean(x) within k standard errors of 1 (k = 4: a 6e-5 false-alarm rate per test). The
    SE must be below 0.1 / k (0.025 at k = 4), or a 10% bias in Z-hat could hide inside the
    k-SE band: asserted, so that too few runs fail the test instead of passing it."""
    se = float(x.std()) / math.sqrt(len(x))
    assert se < 0.1 / k, f"too few runs to detect a 10% bias: se={se:.4f} (mean {float(x.mean()):.4f})"
    return abs(float(x.mean()) - 1) < k * se


def draws(sigma: dict, m: int, seed: int) -> list[list[int]]:
    """m exact draws from an enumerated sigma (chain -> probability)."""
    keys = list(sigma)
    probs = torch.tensor([sigma[k] for k in keys], dtype=torch.float64)
    start = torch.multinomial(probs, m, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [list(keys[i]) for i in start.tolist()]


def references_p_value(sigma: dict, results) -> float:
    """Chi-square p-value of the references after each run's last sweep against sigma (the
    chains expected fewer than 5 times pooled into one bin, as chi-square needs)."""
    keys, m = list(sigma), len(results)
    after = [tuple(r.info["references"][-1]) for r in results]
    counts = torch.tensor([after.count(k) for k in keys], dtype=torch.float64)
    expected = torch.tensor([sigma[k] for k in keys], dtype=torch.float64) * m
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp_ = torch.cat([expected[big], expected[~big].sum().view(1)])
    return float(stats.chisquare(obs.numpy(), exp_.numpy()).pvalue)


def test_every_chain_has_two_steps_and_the_toy_is_enumerated():
    target = toy()
    total = sum(math.exp(log_p(target, x)) for x in chains())
    assert total == pytest.approx(1.0, abs=1e-5)  # the 49 chains are all of them
    res = pilm.self_consistency(target, 64, seed=0)
    assert all(len(s) == 2 for s in res.steps) and set(map(tuple, res.tokens)) <= set(chains())


def test_exact_enumeration_ends_chains_where_the_step_samplers_do():
    """A horizon of 4 tokens holds longer chains than 2 steps ("c" then "c" is 2 tokens):
    enumeration must end each chain at its second step, as the particle filter does, and
    at a step stating the final answer ("a" alone here, so "aa" is final)."""
    target = toy()
    enumerated = pilm.exact.distribution(target)
    assert enumerated.keys() == set(chains())
    for x, p in enumerated.items():
        assert p == pytest.approx(math.exp(log_p(target, x)), rel=1e-4)
    final = pilm.Target(target.model, [0], max_new_tokens=4, steps=dataclasses.replace(STEP, final="^a+$"))
    ends = pilm.exact.distribution(final)
    assert (0, 0) in ends and not any(x[:2] == (0, 0) and len(x) > 2 for x in ends)
    assert sum(ends.values()) == pytest.approx(1.0, abs=1e-5)
    res = pilm.self_consistency(final, 32, seed=0)
    assert set(map(tuple, res.tokens)) <= ends.keys()


def test_token_smc_ends_chains_by_the_steps_too():
    """One target, one sigma: token-level SMC and IS end a chain where its Steps do, so Z-hat
    is unbiased for the enumerated Z and every sample is an enumerated chain; bounds with
    enumerated exact samples (complete by the step rules, not by EOS) sandwich log Z."""
    phi = FunctionPotential(lambda t: math.log(table_score(t)), on="tokens", name="table")
    target = toy(phi)
    final = pilm.Target(target.model, [0], phi, max_new_tokens=4, steps=dataclasses.replace(STEP, final="^a+$"))
    # The same rule by text: enumeration reads it in Steps.chain_end, token SMC in the boundary's own path.
    by_text = pilm.Target(target.model, [0], phi, max_new_tokens=4, steps=dataclasses.replace(STEP, delimiter="c"))
    assert pilm.exact.distribution(by_text).keys() == set(chains())
    for t in (target, final, by_text):
        enumerated, log_z = pilm.exact.distribution(t), pilm.exact.log_z(t)
        for runs in (pilm.smc([t] * 400, 8, seed=3, progress=False), pilm.importance_sample([t] * 400, 8, seed=3)):
            assert within(ratios(runs, log_z))
            assert {tuple(s) for r in runs for s in r.tokens} <= enumerated.keys()
    report = pilm.bounds(final, n_particles=[4], seeds=8, exact_samples="enumerate", methods=["smc"], progress=False)
    row = report.rows[0]
    # E[lower] <= log Z <= E[upper]; each side is checked against twice its 95% t-interval
    # half-width (about 4 standard errors), so a correct sampler fails it with odds below 1e-3.
    assert row["lower"] - 2 * row["lower_ci"] <= report.log_z_exact <= row["upper"] + 2 * row["upper_ci"]


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_twisted_weights_give_unbiased_z_of_p_times_final_score(threshold):
    target = toy()
    _, log_z = exact(target, lambda x: table_score(x))  # phi = the final score (no potential, aggregation last)
    res = pilm.particle_filter([target] * 400, PRM, 4, weights="twisted", ess_threshold=threshold, seed=1)
    assert within(ratios(res, log_z))


def test_twisted_weights_with_a_potential_target_p_times_phi_whatever_the_prm():
    phi = FunctionPotential(lambda t: 0.0 if 1 in t else -math.inf, on="tokens", name="has b")
    target = toy(phi)
    _, log_z = exact(target, lambda x: 1.0 if 1 in x else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pilm.particle_filter([target] * 400, PRM, 4, weights="twisted", seed=2, on_extinction="return")
    assert within(ratios(res, log_z))
    for r in res:  # every particle with weight carries a chain with phi = 1
        assert all(1 in t for t, w in zip(r.tokens, r.weights) if w > 0)


def test_a_masked_filter_keeps_the_format_and_z():
    """An answer format as a regex (at most one "a" in the chain): with mask=True every chain
    drawn keeps it, and twisted weights still give Z-hat unbiased for Z = E_p[phi]."""
    target = toy(pilm.potentials.Regex("[bc]*a?[bc]*"))
    _, log_z = exact(target, lambda x: 1.0 if x.count(0) <= 1 else 0.0)
    res = pilm.particle_filter([target] * 400, PRM, 4, weights="twisted", seed=4, mask=True)
    assert within(ratios(res, log_z))
    assert all(t.count(0) <= 1 for r in res for t in r.tokens)


def test_the_exact_value_as_prm_resampled_at_every_boundary_stays_unbiased():
    """With psi_t = E[phi | x_<=t] and resampling at every boundary, Z-hat stays unbiased.
    Every weight equal to Z would need the locally optimal proposal of a whole step; a
    bootstrap filter draws steps from the policy, so its boundary weights are the value's
    increments, and on this 2-step toy the value lowers Var(Z-hat) only a little (0.59 vs
    0.61 measured at N = 4 over 300 runs), which is not asserted. Z-hat/Z has sd ~0.77 at
    N = 4, so 2,000 runs (SE 0.018-0.020 over seeds 3-6) keep a 10% bias outside the 4-SE band."""
    phi = lambda x: 1.0 if x.count(1) >= 2 else 0.05  # noqa: E731
    target = toy()
    steps_after = {a: [a + b for b in ONE_STEP] for a in ONE_STEP}

    @functools.cache
    def value(tokens):
        tokens = tuple(tokens)
        if tokens in steps_after:
            return min(1.0, sum(math.exp(log_p(target, x) - log_p(target, tokens)) * phi(x) for x in steps_after[tokens]))
        return phi(tokens)

    _, log_z = exact(target, phi)
    flat = FunctionPRM(lambda p, t: 0.5 if tuple(t) in steps_after else phi(tuple(t)), on="tokens", name="flat")
    good = FunctionPRM(lambda p, t: value(tuple(t)), on="tokens", name="value")
    # resampling at every boundary: without it the ratios telescope to phi and the PRM cannot matter
    z_flat = ratios(pilm.particle_filter([target] * 2000, flat, 4, weights="twisted", ess_threshold=1, seed=3), log_z)
    z_good = ratios(pilm.particle_filter([target] * 2000, good, 4, weights="twisted", ess_threshold=1, seed=3), log_z)
    assert within(z_good) and within(z_flat)


def test_paper_weights_target_p_times_the_product_of_g_of_each_score():
    """The paper's current-score weights with resampling at every boundary: with a fixed
    number of steps (here 2) the weighted particles approximate sigma ∝ p g(r_1) g(r_2),
    g(r) = r / (1 - r), not the twisted target p r_2."""
    target = toy()
    g = lambda r: r / (1 - r)  # noqa: E731
    paper, log_z = exact(target, lambda x: g(table_score(x[: len(_first(x))])) * g(table_score(x)))
    twisted, _ = exact(target, lambda x: table_score(x))
    runs = pilm.particle_filter([target] * 300, PRM, 32, weights="paper", seed=4)
    freq = dict.fromkeys(chains(), 0.0)
    for r in runs:
        for t, w in zip(r.tokens, r.weights):
            freq[tuple(t)] += w / len(runs)
    tv = lambda a, b: 0.5 * sum(abs(a[x] - b[x]) for x in chains())  # noqa: E731
    # 300 runs x 32 particles over 49 chains: sampling noise in TV ~ 0.5 sqrt(49 / 9600) = 0.036
    # at worst (less: resampled particles are correlated only within a run); the bias of a
    # self-normalised filter with N = 32 is O(1/N).
    assert tv(freq, paper) < 0.06
    assert tv(paper, twisted) > 0.15  # the two weight rules define different targets
    assert within(ratios(runs, log_z))  # prod_t mean_k g(r_t^k) is unbiased for its normaliser


def _first(x):
    """The first step of chain x."""
    return next(s for s in ONE_STEP if tuple(x[: len(s)]) == s)


def particle_gibbs_p_value(target) -> float:
    """References drawn exactly from the paper weights' sigma ∝ p g(r_1) g(r_2), one conditional
    sweep each: the chi-square p-value of the new references against sigma."""
    g = lambda r: r / (1 - r)  # noqa: E731
    sigma, _ = exact(target, lambda x: g(table_score(x[: len(_first(x))])) * g(table_score(x)))
    res = pilm.particle_gibbs([target] * 1500, PRM, 4, iterations=1, reference=draws(sigma, 1500, 0), seed=5)
    return references_p_value(sigma, res)


def test_particle_gibbs_leaves_its_target_invariant():
    """The new references are again draws from sigma (a false alarm one time in 1,000)."""
    assert particle_gibbs_p_value(toy()) > 1e-3


def test_the_learned_prm_reaches_the_exact_value_on_a_tabular_task():
    """Math-Shepherd labels and a table head (one logit per prefix and token): the fitted
    psi at step ends is E[phi | prefix] (phi = 1[two or more b]), by enumeration."""
    from pilm.twists.exact import TableTwist

    phi = FunctionPotential(lambda t: 0.0 if t.count(1) >= 2 else -math.inf, on="tokens", name="two b")
    target = toy(phi)
    head = TableTwist(target, output="log_sigmoid")
    prm = pilm.train_prm([target], chains=400, rollouts=8, steps=1500, batch_size=256, lr=0.1, twist=head,
                         progress=False).model
    assert prm is head
    visits = {}
    data_prefixes = [x for x in ONE_STEP]
    for a in data_prefixes:
        truth = sum(math.exp(log_p(target, a + b) - log_p(target, a)) * (1.0 if (a + b).count(1) >= 2 else 0.0)
                    for b in ONE_STEP)
        fitted = float(head.log_psi([a[:-1]], torch.zeros(1, 1))[0, a[-1]].exp().detach())
        visits[a] = (truth, fitted, math.exp(log_p(target, a)))
    for a, (truth, fitted, p) in visits.items():
        if p * 400 >= 40:  # >= 40 chains x 8 rollouts: SE <= 0.5 / sqrt(320) = 0.028, so 0.1 is 3.5 SE
            assert abs(fitted - truth) < 0.1, (a, truth, fitted)
    for x in chains():  # finished chains are labelled by phi itself
        if math.exp(log_p(target, x)) * 400 >= 40:
            fitted = float(head.log_psi([x[:-1]], torch.zeros(1, 1))[0, x[-1]].exp().detach())
            assert abs(fitted - (1.0 if x.count(1) >= 2 else 0.0)) < 0.1


def beam_decisions(monkeypatch) -> list:
    """Every (view, decision) of ``BeamSelection`` from now on, in order."""
    from pilm.inference.search import BeamSelection

    decisions, decide = [], BeamSelection.decide

    def spy(self, b):
        d = decide(self, b)
        decisions.append((b, d))
        return d

    monkeypatch.setattr(BeamSelection, "decide", spy)
    return decisions


def test_a_wide_prm_beam_search_finds_the_best_chain(monkeypatch):
    """One-token steps, 3 tokens, 2 steps: with 96 chains and width 32 the 3 distinct
    prefixes are all kept (beam search keeps distinct chains) and each of their 32 copies
    draws a next token (every next-token probability is >= 0.3, checked, so one of the 24
    continuations of both targets is missed with probability < 24 * 0.7^32 < 3e-4), so the
    argmax chain is the exact best chain by its final score. Two targets in one batch (two
    prompts): at every boundary of each, the selection keeps the ceil(96 / 32) = 3 best
    distinct chains, copies each unfinished one 32 times and a finished one once, so never
    more than N chains are alive; at the end exactly the 3 best of the 9 chains remain."""
    decisions = beam_decisions(monkeypatch)
    one = Steps(delimiter=2, max_steps=2, max_step_tokens=1)
    model = TabularLM.random(3, seed=5, concentration=1000)  # near-uniform (seed=5 alone gave one token 0.027)
    assert min(float(model.start(p + x, 1).logprobs.exp().min()) for p in ([0], [1, 2])
               for x in ([], [0], [1], [2])) >= 0.3
    targets = [pilm.Target(model, prompt, max_new_tokens=2, steps=one) for prompt in ([0], [1, 2])]
    every = sorted(itertools.product(range(3), repeat=2), key=table_score, reverse=True)
    results = pilm.prm_beam_search(targets, PRM, 96, width=32, seed=0)
    assert len(decisions) == 2 * 2  # one selection per target and step boundary
    for b, d in decisions:
        alive_rows = b.alive.nonzero().squeeze(1).tolist()
        best_of = {}
        for k in alive_rows:
            best_of[b.chains[k]] = max(best_of.get(b.chains[k], -math.inf), float(b.scores[k]))
        ranked = sorted(best_of, key=lambda c: -best_of[c])
        kept = ranked[:3]  # ceil(N / width) best distinct chains
        copies = [b.chains[int(p)] for p in d.parents[d.alive]]
        assert sorted(copies) == sorted(c for c in kept for _ in range(1 if len(c) == 2 else 32))
        assert int(d.alive.sum()) == len(copies) <= 96 and bool(d.alive[: len(copies)].all())
    for res in results:
        alive = [tuple(res.tokens[k]) for k in range(96) if res.alive[k]]
        assert sorted(alive) == sorted(every[:3])  # the 3 best of all 9 chains, once each
        top = max((k for k in range(96) if res.alive[k]), key=lambda k: res.aggregated[k])
        assert tuple(res.tokens[top]) == every[0]


def test_beam_search_keeps_n_chains_in_flight_when_few_are_distinct():
    """Fewer distinct chains than ceil(N / width): the unfinished ones share all N rows (as the
    reference extends its active beams to N), a finished one keeps one row. The old rule gave
    each unfinished chain ``width`` rows and left the rest dead (4 of 8 here)."""
    from pilm.inference.rules import View
    from pilm.inference.search import BeamSelection

    def view(finished: list[bool]) -> View:
        tokens = torch.tensor([[1]] * 6 + [[2]] * 2)  # two distinct chains: (1,) six times, (2,) twice
        zeros = torch.zeros(8)
        return View(zeros, zeros, zeros, torch.tensor([0.9] * 6 + [0.1] * 2), torch.ones(8, dtype=torch.bool),
                    torch.tensor(finished), torch.ones(8, dtype=torch.bool), True, False, torch.Generator(), tokens,
                    torch.ones(8, dtype=torch.long))

    d = BeamSelection(2).decide(view([False] * 8))
    assert d.parents.tolist() == [0] * 4 + [6] * 4 and bool(d.alive.all())
    d = BeamSelection(2).decide(view([False] * 6 + [True] * 2))  # the worse chain finished: it keeps one row
    assert d.parents.tolist() == [0] * 7 + [6] and bool(d.alive.all())
    d = BeamSelection(8).decide(view([False] * 8))  # ceil(8 / 8) = 1 chain kept, all 8 rows its copies
    assert d.parents.tolist() == [0] * 8 and bool(d.alive.all())
    # without filter_duplicates the ceil(8 / 2) = 4 best rows are kept, all copies of the better chain
    d = BeamSelection(2, filter_duplicates=False).decide(view([False] * 8))
    assert d.parents.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and bool(d.alive.all())
    d = BeamSelection(2, filter_duplicates=False).decide(view([False] * 6 + [True] * 2))  # as above: (2,) not kept
    assert d.parents.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and bool(d.alive.all())
    # a finished chain takes one slot however many rows hold it: the better chain (1,) finished,
    # so the kept rows are its best row and both rows of (2,), which share the other 7 rows
    d = BeamSelection(2, filter_duplicates=False).decide(view([True] * 6 + [False] * 2))
    assert d.parents.tolist() == [0, 6, 6, 6, 6, 7, 7, 7] and bool(d.alive.all())


def test_beam_search_without_duplicate_filter_keeps_the_best_rows(monkeypatch):
    """filter_duplicates=False on a real search: the result's info says so, and at every
    boundary the parents are exactly the ceil(N / width) best-scored alive rows (copies of one
    unfinished chain included), whatever their chains."""
    decisions = beam_decisions(monkeypatch)
    res = pilm.prm_beam_search(toy(), PRM, 8, width=2, seed=0, filter_duplicates=False)
    assert decisions
    for b, d in decisions:
        alive = b.alive.nonzero().squeeze(1).tolist()
        best = sorted(alive, key=lambda k: -float(b.scores[k]))[:4]
        assert set(d.parents[d.alive].tolist()) == set(best)
    assert res.info["filter_duplicates"] is False and res.info["width"] == 2
    assert pilm.prm_beam_search(toy(), PRM, 8, width=2, seed=0).info["filter_duplicates"] is True


def test_dvts_keeps_independent_subtrees():
    res = pilm.dvts(toy(), PRM, 16, width=4, seed=0)
    for lo in range(0, 16, 4):  # within a subtree every chain shares the first step the subtree kept
        kept = [tuple(res.tokens[k]) for k in range(lo, lo + 4) if res.alive[k]]
        assert len({_first(x) for x in kept}) == 1


COLLECTION_SETTINGS = {"chains": 4, "rollouts": 2, "max_rows": 8, "seed": 3, "progress": False}


def collection_targets():
    phi = FunctionPotential(lambda t: 0.0 if t.count(1) >= 2 else -math.inf, on="tokens", name="two b")
    model = TabularLM.random(3, seed=5)
    return [pilm.Target(model, p, phi, max_new_tokens=4, steps=STEP) for p in ([0], [1], [2, 0])]


def counted_batches(monkeypatch, stop_at: int = 0) -> list[str]:
    """Record each batch ``collect_values`` draws (chains or rollouts); raise in the ``stop_at``-th."""
    from pilm.learning import prm_trainer

    calls, real = [], prm_trainer.sample_chains

    def counting(*a, **k):
        calls.append("rollouts" if a[2] is None else "chains")  # rollouts run without a PRM
        if len(calls) == stop_at:
            raise InterruptedError
        return real(*a, **k)

    monkeypatch.setattr(prm_trainer, "sample_chains", counting)
    return calls


def test_a_value_collection_draws_chains_then_rollouts_in_several_batches(monkeypatch):
    from pilm.learning import prm_trainer

    calls = counted_batches(monkeypatch)
    prm_trainer.collect_values(collection_targets(), **COLLECTION_SETTINGS)
    assert calls == ["chains"] * 2 + ["rollouts"] * 3  # 2 targets' 4 chains a batch; 4 step ends' 2 rollouts a batch


@pytest.mark.parametrize("stop_at", range(1, 6))  # in either chain batch, or in any rollout batch
def test_an_interrupted_value_collection_resumes_to_what_one_run_collects(tmp_path, monkeypatch, stop_at):
    """Three targets, chains and rollouts in several batches (max_rows small): a collection
    stopped by an error in any batch, then rerun with the same file, equals the uninterrupted
    one and draws only the batches not saved; other settings are refused, or replaced with
    overwrite=True."""
    from pilm.errors import ResumeMismatchError
    from pilm.learning import prm_trainer

    targets = collection_targets()
    whole = prm_trainer.collect_values(targets, **COLLECTION_SETTINGS)
    batches = ["chains"] * 2 + ["rollouts"] * 3  # as the test above checks
    path = tmp_path / "collection.safetensors"
    calls = counted_batches(monkeypatch, stop_at)
    with pytest.raises(InterruptedError):
        prm_trainer.collect_values(targets, checkpoint=path, **COLLECTION_SETTINGS)
    resumed = prm_trainer.collect_values(targets, checkpoint=path, **COLLECTION_SETTINGS)
    assert calls[stop_at:] == batches[stop_at - 1:]  # the batches before the one that failed were saved
    assert torch.equal(resumed.hidden, whole.hidden) and torch.equal(resumed.last, whole.last)
    assert resumed.tokens == whole.tokens and resumed.target == whole.target
    assert torch.equal(resumed.label, whole.label) and resumed.seconds > 0
    other = {**COLLECTION_SETTINGS, "seed": 4}
    with pytest.raises(ResumeMismatchError, match="delete it"):
        prm_trainer.collect_values(targets, checkpoint=path, **other)
    with pytest.raises(ResumeMismatchError):  # another potential is another collection
        prm_trainer.collect_values([pilm.Target(t.model, t.prompt_ids, None, max_new_tokens=4, steps=STEP)
                                    for t in targets], checkpoint=path, **COLLECTION_SETTINGS)
    before = len(calls)
    prm_trainer.collect_values(targets, checkpoint=path, overwrite=True, **other)
    assert calls[before:] == batches  # replaced: drawn afresh


def test_an_unreadable_value_collection_is_refused_with_its_path(tmp_path):
    from pilm.learning import prm_trainer

    path = tmp_path / "collection.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be read as a train-prm collection.*delete it"):
        prm_trainer.collect_values(collection_targets(), checkpoint=path, **COLLECTION_SETTINGS)
    prm_trainer.collect_values(collection_targets(), checkpoint=path, overwrite=True, **COLLECTION_SETTINGS)


def test_answer_selection():
    steps = Steps(delimiter=2, max_steps=2, max_step_tokens=2, final="(a|b)c$")
    target = pilm.Target(TabularLM.random(3, seed=5), [0], max_new_tokens=4, steps=steps)
    res = pilm.best_of_n(target, PRM, 16, seed=0)
    answers = [a for a in res.answers if a is not None]
    assert answers and res.answer("vote") == max(answers, key=answers.count)  # ties to the first seen
    top = max(range(16), key=lambda k: res.aggregated[k])
    assert res.answer("argmax") == res.answers[top]
    with pytest.raises(ValueError, match="weighted_vote"):
        res.answer("best")
    with pytest.raises(ValueError, match="argmax selection needs"):
        pilm.self_consistency(target, 4).answer("argmax")


class Bad(ProcessReward):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, batch: StepBatch):
        return torch.full((len(batch),), self.value, dtype=torch.float64)


@pytest.mark.parametrize("value", [math.nan, 1.5, -0.1])
def test_a_prm_outside_zero_one_is_refused_with_its_name(value):
    with pytest.raises(PRMError, match=r"process reward Bad returned .* for 4 of 4 rows .*probabilities in \[0, 1\]"):
        pilm.particle_filter(toy(), Bad(value), 4)


def test_a_function_prm_must_return_a_number():
    with pytest.raises(PRMError, match=r"returned None \(NoneType\).*a float in \[0, 1\]"):
        pilm.particle_filter(toy(), FunctionPRM(lambda q, s: None, name="none"), 4)


def test_a_regex_delimiter_cuts_steps_on_the_text():
    import re

    target = pilm.Target(TabularLM.random(3, seed=5), [0], max_new_tokens=6,
                         steps=Steps(delimiter=re.compile("c"), max_steps=2, max_step_tokens=3))
    res = pilm.self_consistency(target, 16, seed=0)
    for steps in res.steps:
        assert all(s.endswith("c") or len(s) == 3 for s in steps)


def test_every_particle_at_score_zero_is_extinction():
    with pytest.raises(ImpossibleTargetError, match="score 0"):
        pilm.particle_filter(toy(), Bad(0.0), 4, weights="twisted", on_extinction="raise")
    res = pilm.particle_filter(toy(), Bad(0.0), 4, weights="paper", on_extinction="return")
    assert res.log_z == -math.inf and res.info["extinct_at"] == 1


def test_unknown_options_list_the_choices():
    with pytest.raises(ValueError, match="last, min, prod, mean"):
        pilm.particle_filter(toy(), PRM, 4, aggregation="median")
    with pytest.raises(ValueError, match="paper, twisted"):
        pilm.particle_filter(toy(), PRM, 4, weights="fancy")
    with pytest.raises(ValueError, match="resamples multinomially at every step boundary"):
        pilm.particle_filter(toy(), PRM, 4, weights="paper", ess_threshold=0.5)


def test_a_step_that_never_ends_is_cut_and_counted():
    never = Steps(delimiter="z", max_steps=3, max_step_tokens=2)  # "z" is not in the vocabulary's texts
    target = pilm.Target(TabularLM.random(3, seed=5), [0], max_new_tokens=8, steps=never)
    res = pilm.self_consistency(target, 8, seed=0)
    assert all(len(s) == 3 and all(len(step) == 2 for step in s) for s in res.steps)
    assert res.info["cut_steps"] == 8 * 3  # every step was cut at max_step_tokens


def test_aggregations():
    from pilm.prm import aggregate

    assert aggregate([0.5, 0.2, 0.8], "last") == 0.8
    assert aggregate([0.5, 0.2, 0.8], "min") == 0.2
    assert aggregate([0.5, 0.2, 0.8], "prod") == pytest.approx(0.08)
    assert aggregate([0.5, 0.2, 0.8], "mean") == pytest.approx(0.5)


def test_held_rows_wait_and_resume_where_they_were(tiny):
    """A row held for some forwards (a hole in its cache) then continued gives the logits
    of the same tokens decoded without waiting."""
    model = tiny
    ids = model.encode("The answer is")
    state = model.start(ids, 2)
    a = model.advance(state, torch.tensor([11, 11]))
    a_row = a.logprobs[1].clone()  # advance consumes (releases) the state it is given
    held = model.advance(a, torch.tensor([12, 0]), hold=torch.tensor([False, True]))
    assert torch.equal(held.logprobs[1], a_row)
    held = model.advance(held, torch.tensor([13, 0]), hold=torch.tensor([False, True]))
    b = model.advance(held, torch.tensor([14, 12]))  # row 1 resumes with token 12
    direct = model.advance(model.advance(model.start(ids, 1), torch.tensor([11])), torch.tensor([12]))
    assert torch.allclose(b.logprobs[1], direct.logprobs[0], atol=1e-4)
    straight = model.advance(model.advance(model.advance(model.advance(model.start(ids, 1), torch.tensor([11])),
                                                         torch.tensor([12])), torch.tensor([13])), torch.tensor([14]))
    assert torch.allclose(b.logprobs[0], straight.logprobs[0], atol=1e-4)


def test_a_target_draws_the_same_alone_and_in_a_batch():
    from pilm.inference.smc import seeded_generators

    model = TabularLM.random(3, seed=5)
    first = pilm.Target(model, [0], max_new_tokens=4, steps=STEP)
    second = pilm.Target(model, [1, 1], max_new_tokens=6, steps=Steps(delimiter=2, max_steps=3, max_step_tokens=2))
    both = pilm.particle_filter([first, second], PRM, 8, weights="twisted", seed=0)
    alone = pilm.particle_filter(second, PRM, 8, weights="twisted", seed=seeded_generators(0, 2)[1].initial_seed())
    assert both[1].tokens == alone.tokens and both[1].log_z == pytest.approx(alone.log_z)
    assert both[0].tokens == pilm.particle_filter(first, PRM, 8, weights="twisted", seed=0).tokens


def test_particle_gibbs_with_ancestor_sampling_leaves_its_target_invariant():
    """PGAS (Lindsten et al. 2014) on twisted weights: references drawn exactly from
    sigma ∝ p phi, one conditional sweep with ancestor sampling each; the new references are
    again draws from sigma (chi-square against enumeration). Steps of one or two tokens, so a
    stitched chain is a new chain, and the PRM as psi (not the exact value) so that the
    ancestor weights do not reduce to the plain ones."""
    phi = FunctionPotential(lambda t: math.log(table_score(t[::-1])), on="tokens", name="table phi")
    target = toy(phi)
    sigma, _ = exact(target, lambda x: table_score(x[::-1]))
    m = 1500
    refs = draws(sigma, m, 1)
    switched = []
    from pilm.inference.particle_filter import AncestorSampling

    decide = AncestorSampling.decide

    def spy(self, v):
        d = decide(self, v)
        if d.reference is not None:
            switched.append(d.reference != v.reference_tokens)
        return d

    AncestorSampling.decide = spy
    try:
        res = pilm.particle_gibbs([target] * m, PRM, 4, iterations=1, reference=refs, seed=5, weights="twisted",
                                  ancestor_sampling=True, ess_threshold=1.0)
    finally:
        AncestorSampling.decide = decide
    assert sum(switched) > 0.2 * m  # the references' pasts did move
    assert references_p_value(sigma, res) > 1e-3


def test_ancestor_sampling_needs_twisted_weights_and_a_potential():
    with pytest.raises(ValueError, match="use weights='twisted' on targets with a potential"):
        pilm.particle_gibbs(toy(), PRM, 4, ancestor_sampling=True, weights="twisted")
