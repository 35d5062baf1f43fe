"""Rationales as a latent variable: the posterior target against its definition, the E-step
against the enumerated posterior, the posterior predictive against enumeration, EM's
monotone marginal likelihood, saved runs, and bad input."""

import json
import math

import pytest
import torch

import pilm
from pilm.evaluation.exact import enumerate_sampler, enumerate_target
from pilm.latent import Example, LatentReasoner
from pilm.models.tabular import TabularLM
from pilm.tasks import subjectivity

# Tokens a..e; "c" ends the rationale (the middle's first token), labels "d" and "e".
TEMPLATE = "{x}{z}c{y}"
LABELS = ("d", "e")


@pytest.fixture
def reasoner():
    """A random 5-token table (asymmetric: label probabilities differ by X and Z), rationales
    of 1 to 3 tokens: 84 rationales per X (4 + 16 + 64), all enumerable; with the empty one
    (phi = 0) the posterior target has 85 completions."""
    return LatentReasoner(TabularLM.random(5, seed=7), template=TEMPLATE, labels=LABELS, rationale_tokens=(1, 3),
                          separator="")


TRAIN = [Example("ab", "d"), Example("ba", "e"), Example("aa", "e")]


def by_hand(reasoner, x: str, y: str) -> dict[tuple[int, ...], float]:
    """p(Z | X) p(Y | X, Z) for every Z, from the table's probabilities written out."""
    model, lat = reasoner.model, reasoner.latent
    prefix, stop, labels = tuple(model.encode(x)), lat.stop_id, [model.encode(l)[0] for l in LABELS]
    out = {}

    def lp(prefix, v):
        return float(model.logprobs_of(prefix)[v])

    def walk(body):
        ended = [(body + (stop,), True)] if len(body) < 3 else [(body, False)]
        for z, stopped in ended:
            log_prior = sum(lp(prefix + z[:i], z[i]) for i in range(len(z)))
            ctx = prefix + body + (stop,)
            scores = torch.tensor([lp(ctx, v) for v in labels])
            like = torch.softmax(scores, 0)[LABELS.index(y)].item() if body else 0.0
            out[z] = math.exp(log_prior) * like
        if len(body) < 3:
            for v in range(5):
                if v != stop:
                    walk(body + (v,))
    walk(())
    return out


def test_the_posterior_target_is_the_prior_times_the_label_likelihood(reasoner):
    for ex in TRAIN:
        hand = by_hand(reasoner, ex.x, ex.y)
        e = enumerate_target(reasoner.latent.posterior(ex))
        got = dict(zip(e.tokens, torch.exp(e.log_p0 + e.log_phi).tolist()))
        assert set(got) == set(hand) and len(hand) == 85  # 1 + 4 + 16 rationales that stop, 64 truncated
        for z, v in hand.items():
            assert got[z] == pytest.approx(v, rel=1e-5, abs=1e-12), z
        # the marginal sums to 1 over labels, less the prior's mass on the too-short rationale
        total = sum(sum(by_hand(reasoner, ex.x, y).values()) for y in LABELS)
        short = math.exp(reasoner.model.logprobs_of(tuple(reasoner.model.encode(ex.x)))[2].item())
        assert total == pytest.approx(1 - short, rel=1e-5)


# SubTB, 300 steps of 16 on the free logits of every prefix (lr 0.05), amortised over three X:
# measured KL(sigma || q) 0.005-0.011 from 0.27-0.46 at q = prior (seed 0); the bound leaves a
# 3x margin. KL(q || sigma) is infinite for any q with mass on the empty rationale (phi = 0):
# that mass is bounded instead (the floor e^-100 drives it to ~0; measured < 0.002).
def test_the_e_step_reaches_the_exact_posterior(reasoner):
    targets = [reasoner.latent.posterior(ex) for ex in TRAIN]
    before = [enumerate_sampler(t, reasoner.model).kl_sigma_q() for t in targets]
    q = reasoner.e_step(TRAIN, steps=300, batch_size=16, lr=0.05, warmup=1, seed=0, progress=False).model
    for t, b in zip(targets, before):
        e = enumerate_sampler(t, q)
        assert b > 0.1
        assert e.kl_sigma_q() < 0.035, t.prompt
        short = math.exp(float(q.log_prob(t.prompt_ids, [[reasoner.latent.stop_id]])[0]))
        assert short < 0.01


def exact_predictive(reasoner, x: str, likelihood=None) -> list[float]:
    """p(Y = y | X) = sum_Z p(Z | X) p(y | X, Z) = Z of the posterior target, by enumeration."""
    return [math.exp(pilm.exact.log_z(reasoner.latent.posterior(Example(x, y), likelihood))) for y in LABELS]


def test_the_posterior_predictive_with_the_prior_matches_enumeration(reasoner):
    """With q the prior (exact for unlabelled X), the soft vote is the Monte Carlo estimate of
    sum_Z p(Z | X) p(Y | X, Z): within 4 standard errors of the enumerated value."""
    n = 2000
    pred = reasoner.predict(["ab", "ba"], None, samples=n, vote="soft", seed=1)
    assert pred.accuracy is None
    for i, x in enumerate(["ab", "ba"]):
        each = torch.tensor(pred.per_rationale[i])  # (n, labels)
        se = each.std(0) / math.sqrt(n)
        exact = torch.tensor(exact_predictive(reasoner, x))
        assert (torch.tensor(pred.probs[i]) - exact).abs().le(4 * se + 1e-9).all(), (pred.probs[i], exact)
    assert pred.labels == [LABELS[int(torch.tensor(p).argmax())] for p in pred.probs]


def test_hard_and_soft_votes_and_accuracy(reasoner):
    test = [Example("ab", "d"), Example("ba", "e")]
    hard = reasoner.predict(test, None, samples=50, vote="hard", seed=0)
    assert all(sum(v) <= 50 for v in hard.votes)
    for v, label in zip(hard.votes, hard.labels):
        assert LABELS[max(range(2), key=lambda k: (v[k], 0))] == label or v[0] == v[1]
    assert hard.accuracy == sum(a == b.y for a, b in zip(hard.labels, test)) / 2
    soft = reasoner.predict(test, None, samples=50, vote="soft", seed=0)
    assert hard.revote("soft") == soft.__class__(**{**soft.__dict__, "seconds": hard.seconds})
    # The interval is Wilson's 95% score interval at k = correct of n = 2, written out here
    # (any interval contains the accuracy; a Wald interval, for one, would be (0, 0) at k = 0).
    k, n, z = round(hard.accuracy * 2), 2, 1.959964
    centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert hard.ci == pytest.approx((centre - half, centre + half), abs=1e-9)
    from pilm.latent import wilson

    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook value at 8 of 10


def marginal(reasoner, data, likelihood=None) -> float:
    return sum(math.log(exact_predictive(reasoner, ex.x, likelihood)[LABELS.index(ex.y)]) for ex in data)


# One EM round on a table: the E-step (SubTB, as above) then an M-step on free label logits
# for every context (64 rationales per pair, 200 steps of 8 at lr 0.1). EM's guarantee needs
# q = the posterior; with the E-step's q the marginal still rose, measured from -2.59 to -1.33.
def test_an_em_round_does_not_decrease_the_exact_marginal_likelihood(reasoner):
    before = marginal(reasoner, TRAIN)
    result = reasoner.em(TRAIN, rounds=1, e_steps=300, m_steps=200, m_samples=64, samples=16,
                         e_kwargs={"batch_size": 16, "lr": 0.05, "warmup": 1},
                         m_kwargs={"batch_size": 8, "lr": 0.1}, progress=False)
    after = marginal(reasoner, TRAIN, result.likelihood)
    assert after >= before + 0.1, (before, after)
    e, m = result.history
    assert (e["step"], m["step"]) == ("E", "M")
    assert m["iwae"] > e["iwae"]  # the bound on the same marginal rose with it
    # With many samples the IWAE bound reaches log p(Y | X) (measured within 0.004 at 4,000)
    # and the ELBO stays below it (q puts < 0.3% on the too-short rationale, left out of it).
    for ex in TRAIN:
        b = reasoner.elbo([ex], result.posterior, result.likelihood, samples=4000)
        exact = marginal(reasoner, [ex], result.likelihood)
        assert b["iwae"] == pytest.approx(exact, abs=0.05) and b["elbo"] < exact and b["short"] < 0.01


def test_direct_baselines_normalise_over_the_labels(reasoner):
    zero = reasoner.direct(["ab"])
    few = reasoner.direct(["ab"], shots=TRAIN[:2])
    for pred in (zero, few):
        assert sum(pred.probs[0]) == pytest.approx(1.0, abs=1e-5)
    lp = reasoner.model.logprobs_of(tuple(reasoner.model.encode("ab")))[[3, 4]]
    assert zero.probs[0] == pytest.approx(torch.softmax(lp, 0).tolist(), abs=1e-5)
    sft = reasoner.fit_direct(TRAIN, steps=100, lr=0.1, seed=0).model
    fitted = reasoner.direct([ex.x for ex in TRAIN], sft)
    assert fitted.labels == [ex.y for ex in TRAIN]  # free logits memorise three labels


def test_a_saved_run_predicts_the_same(fresh_tiny, tmp_path):
    r = LatentReasoner(fresh_tiny, template=subjectivity.TEMPLATE, labels=subjectivity.LABELS)
    train = [Example("a fine film .", "subjective"), Example("he goes home .", "objective")]
    q = r.e_step(train, steps=1, batch_size=2, progress=False).model
    lik = r.m_step(train, q, steps=1, samples=2, batch_size=2).model
    before = r.predict(train, q, lik, samples=3, seed=4)
    r.save(tmp_path / "run", q, lik)
    assert json.loads((tmp_path / "run" / "latent.json").read_text())["labels"] == list(subjectivity.LABELS)
    assert (tmp_path / "run" / "posterior" / "adapter_config.json").exists()
    again, q2, lik2 = LatentReasoner.load(fresh_tiny, tmp_path / "run")
    after = again.predict(train, q2, lik2, samples=3, seed=4)
    assert after.rationales == before.rationales
    torch.testing.assert_close(torch.tensor(after.probs), torch.tensor(before.probs), atol=1e-5, rtol=0)


def test_subjectivity_data_ships_with_pilm_and_loads_without_a_path():
    """The SUBJ split of Hu et al. is package data: its sizes, both labels in every file, no
    sentence in both the training and the test file."""
    for labels, n in ((10, 10), (20, 20), (50, 50), (None, 8000)):
        data = subjectivity.load(labels=labels)
        assert len(data.train) == n and len(data.test) == 1500
        assert {ex.y for ex in data.train} == set(subjectivity.LABELS)
    assert {ex.y for ex in data.test} == set(subjectivity.LABELS)
    assert not {ex.x for ex in data.train} & {ex.x for ex in data.test}
    assert len(subjectivity.load(labels=10, test_limit=5).test) == 5
    assert subjectivity.load_test() == data.test
    assert (subjectivity.SHIPPED / "LICENSE").is_file() and (subjectivity.SHIPPED / "README.md").is_file()


# -- bad input ---------------------------------------------------------------------------
def test_a_label_outside_the_label_set_is_refused(reasoner):
    with pytest.raises(ValueError, match="not in the label set"):
        reasoner.e_step([Example("ab", "x")], steps=1)
    with pytest.raises(ValueError, match="not in the label set"):
        reasoner.predict([Example("ab", "x")])


def test_a_data_file_with_a_foreign_label_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok", "label_text": "objective"}\n{"text": "no", "label_text": "neutral"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: label 'neutral' is not in the label set"):
        subjectivity.read_jsonl(f)


def test_an_empty_data_file_is_refused(tmp_path):
    (tmp_path / "train.10.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no examples"):
        subjectivity.load(tmp_path, labels=10)


def test_a_template_without_a_slot_is_refused():
    model = TabularLM.random(5, seed=7)
    for bad in ("{x}c{y}", "{z}{x}c{y}", "{x}{z}c", "{x}{z}{y}"):
        with pytest.raises(ValueError, match="slot|between"):
            LatentReasoner(model, template=bad, labels=LABELS)


def test_a_missing_data_path_says_where_the_data_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist: give a folder .* shipped with pilm"):
        subjectivity.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train.7.jsonl does not exist"):
        subjectivity.load(labels=7)


def test_prompt_is_another_name_for_the_template():
    model = TabularLM.random(5, seed=7)
    a = LatentReasoner(model, prompt=TEMPLATE, labels=LABELS)
    assert a.latent.template == TEMPLATE
    with pytest.raises(ValueError, match="give the template"):
        LatentReasoner(model, labels=LABELS)
