"""The particle engine on a backend that generates natively (a serving engine's requests,
``pilm.inference.native``), checked without one: ``Requests`` answers requests by exact
sampling from a tabular model, and is sloppy on purpose (it overshoots its stops and stops
short at random), as an engine whose stop rule differs from pilm's could be. Samplers on it
must still hit sigma exactly, refuse what they cannot run exactly, and draw per target."""

import dataclasses
import json
import math
import warnings

import pytest
import torch
from scipy import stats

import pilm
from pilm.errors import BackendError
from pilm.models import TabularLM
from pilm.models.base import Generation, LanguageModel, StepRequest
from pilm.potentials import FunctionPotential
from pilm.prm import ProcessReward
from pilm.steps import Steps
from pilm.twists.exact import ExactTwist

from .conftest import sigma_cells_chi2
from .test_reasoning import (PRM, STEP, _first, chains, exact, log_p, particle_gibbs_p_value, ratios, table_score,
                             within)


class Requests(LanguageModel):
    """A model (tabular, or a tiny transformers one) behind a request interface. Each request
    draws exactly from p0^(1/T) with its own seed; with ``sloppy`` it ignores a stop one time in
    three (draws past it) and stops short one time in four (the engine then asks again)."""

    generates_steps = True

    def __init__(self, base: LanguageModel, sloppy: bool = True):
        self.base, self.sloppy, self.name = base, sloppy, "requests"
        self.vocab_size, self.eos_token_id, self.bos_token_id = base.vocab_size, base.eos_token_id, base.bos_token_id
        self.calls: list[int] = []

    def encode(self, text):
        return self.base.encode(text)

    def encode_prompt(self, prompt, *, chat=False):
        return self.base.encode_prompt(prompt, chat=chat)

    def decode(self, ids):
        return self.base.decode(ids)

    def score(self, sequences, starts):
        return self.base.score(sequences, starts)

    def start(self, prompt_ids, n):
        raise BackendError("token by token: backend='hf'")

    advance = reindex = start

    def generate(self, requests: list[StepRequest]) -> list[Generation]:
        self.calls.append(len(requests))
        out = []
        for r in requests:
            g = torch.Generator().manual_seed(r.seed)
            state, drawn = self.base.start(list(r.context), 1), []
            while len(drawn) < r.max_tokens:
                lp = state.logprobs[0] / r.temperature if r.temperature > 0 else state.logprobs[0]
                v = int(torch.multinomial(lp.softmax(0), 1, generator=g)) if r.temperature > 0 else int(lp.argmax())
                drawn.append(v)
                stop = v in r.stop_ids or any(s in self.decode(drawn) for s in r.stop_texts)
                if self.sloppy and torch.rand((), generator=g) < (0.25 if not stop else 0.0):
                    break  # short
                if stop and not (self.sloppy and torch.rand((), generator=g) < 1 / 3):
                    break
                state = self.base.advance(state, torch.tensor([v]))
            out.append(Generation(tuple(drawn)))
        return out


class HiddenReader(ProcessReward):
    """A process reward that reads the policy's hidden states (as a learned value head does)."""

    reads_hidden = True

    def score(self, batch):
        return torch.full((len(batch),), 0.5)


def toy(potential=None, sloppy=True, steps=STEP):
    return pilm.Target(Requests(TabularLM.random(3, seed=5), sloppy), [0], potential, max_new_tokens=4, steps=steps)


def test_chains_are_drawn_from_p_with_each_steps_end_where_pilms_rule_puts_it():
    """Independent chains on the sloppy engine: frequencies match p0 (chi-square over the 49
    chains, 4,000 draws: a false alarm one time in 1e4), and every chain has its two steps."""
    target = toy()
    res = pilm.self_consistency(target, 4000, seed=0)
    assert all(len(s) == 2 for s in res.steps)
    counts = {x: 0 for x in chains()}
    for t in res.tokens:
        counts[tuple(t)] += 1
    expected = [4000 * math.exp(log_p(target, x)) for x in chains()]
    pooled = [(c, e) for c, e in zip(counts.values(), expected, strict=True) if e >= 5]
    chi2 = sum((c - e) ** 2 / e for c, e in pooled)
    assert stats.chi2.sf(chi2, len(pooled) - 1) > 1e-4
    assert res.info["requests"] > 0 and res.info["forwards"] == 0  # no token-by-token forward ran


@pytest.mark.parametrize("weights", ["twisted", "paper"])
def test_the_particle_filter_on_requests_has_unbiased_z(weights):
    """Twisted weights: Z-hat unbiased for Z = E_p[final score]; the paper's weights (every
    chain has 2 steps): for the normaliser of p g(r_1) g(r_2), g(r) = r / (1 - r). Each within
    4 SE, with SE < 0.025 asserted (``within``)."""
    target = toy()
    g = lambda r: r / (1 - r)  # noqa: E731
    weight = table_score if weights == "twisted" else lambda x: g(table_score(x[: len(_first(x))])) * g(table_score(x))
    _, log_z = exact(target, weight)
    res = pilm.particle_filter([target] * 400, PRM, 4 if weights == "twisted" else 32, weights=weights, seed=1)
    assert within(ratios(res, log_z))


def test_token_smc_on_one_token_requests_targets_sigma():
    """Bootstrap token SMC (one-token requests): the sigma cells E[Z-hat w 1{s}] = p0 phi
    (chi-square from the runs' own SEs, p > 1e-4)."""
    phi = FunctionPotential(lambda t: math.log(table_score(t)), on="tokens", name="table")
    target = toy(phi)
    runs = pilm.smc([target] * 300, 8, seed=3, progress=False)
    chi2, cells = sigma_cells_chi2(dataclasses.replace(target, model=target.model.base), runs)  # enumerated on the LM
    assert stats.chi2.sf(chi2, cells) > 1e-4


def test_particle_gibbs_on_requests_leaves_its_target_invariant():
    """As on the token engine (the reference row replays its reference, no request): the new
    references are again sigma's (chi-square, p > 1e-3)."""
    assert particle_gibbs_p_value(toy()) > 1e-3


def test_a_delimiter_given_as_text_stops_on_every_token_holding_it():
    target = toy(steps=Steps(delimiter="c", max_steps=2, max_step_tokens=2))
    res = pilm.self_consistency(target, 200, seed=0)
    assert {tuple(t) for t in res.tokens} <= set(chains())


def test_a_target_draws_the_same_alone_in_a_batch_and_twice():
    """Seeds come from each target's own generator, so a target's chains do not depend on the
    batch it runs in: what makes a sharded run equal one process's."""
    a, b = toy(), toy()
    b = pilm.Target(a.model, [1], max_new_tokens=4, steps=STEP)
    alone = pilm.particle_filter([a], PRM, 8, weights="twisted", seed=4)[0]
    both = pilm.particle_filter([a, b], PRM, 8, weights="twisted", seed=4)[0]
    again = pilm.particle_filter([a, b], PRM, 8, weights="twisted", seed=4)[0]
    assert alone.tokens == both.tokens == again.tokens and alone.log_z == both.log_z


def test_what_needs_every_tokens_log_probs_is_refused_before_any_work():
    phi = FunctionPotential(lambda t: 0.0 if 1 in t else -math.inf, on="tokens", name="has b")
    target = toy(phi)
    cases = [
        lambda: pilm.smc(target, 4, twist=ExactTwist({}, 3), progress=False),
        lambda: pilm.particle_filter(target, HiddenReader(), 4, weights="twisted"),
        lambda: pilm.particle_filter(target, PRM, 4, weights="twisted", mask=True),
        lambda: pilm.particle_gibbs(target, PRM, 4, weights="twisted", ancestor_sampling=True),
    ]
    for case in cases:
        target.model.calls.clear()
        with warnings.catch_warnings(), pytest.raises(BackendError, match="backend='hf'"):
            warnings.simplefilter("ignore")
            case()
        assert not target.model.calls  # refused before a request was sent


def test_a_tempered_policy_is_drawn_exactly():
    """Temperature 0.7: chain frequencies match p_M(x) = prod_t p0^(1/0.7)(x_t | .) renormalised
    token by token, from the tabular model's own log-probs (chi-square, p > 1e-4)."""
    target, t = toy(), 0.7
    base = target.model.base

    def log_p_m(x):
        state, total = base.start([0], 1), 0.0
        for v in x:
            total += float(torch.log_softmax(state.logprobs[0] / t, 0)[v])
            state = base.advance(state, torch.tensor([v]))
        return total

    probs = {x: math.exp(log_p_m(x)) for x in chains()}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)  # the 49 chains are all of p_M's
    res = pilm.self_consistency(target, 4000, temperature=t, seed=2)
    counts = {x: 0 for x in chains()}
    for tokens in res.tokens:
        counts[tuple(tokens)] += 1
    big = [x for x in chains() if 4000 * probs[x] >= 5]  # the rare chains pooled into one bin
    rest = [x for x in chains() if x not in big]
    observed = [counts[x] for x in big] + [sum(counts[x] for x in rest)]
    expected = torch.tensor([probs[x] for x in big] + [sum(probs[x] for x in rest)], dtype=torch.float64)
    assert stats.chisquare(observed, (4000 * expected / expected.sum()).numpy()).pvalue > 1e-4


def test_a_longer_delimiter_is_the_engines_stop_text_and_pilms_rule_still_decides():
    """"ab" ends a step: the engine stops on the text (stop_texts), and every chain's steps are
    those exact enumeration finds by the same rule."""
    steps = Steps(delimiter="ab", max_steps=2, max_step_tokens=3)
    target = toy(steps=steps)
    enumerated = pilm.exact.distribution(dataclasses.replace(target, model=target.model.base))
    res = pilm.self_consistency(target, 300, seed=3)
    assert {tuple(t) for t in res.tokens} <= enumerated.keys()
    assert any("ab" in s[0] for s in res.steps)  # the text stop did end steps


def test_an_impossible_target_on_requests_warns_instead_of_enumerating():
    """Extinction: a model that generates by requests cannot enumerate, so the run returns
    Z-hat = 0 with a warning (no token-by-token proof of impossibility is attempted)."""
    never = FunctionPotential(lambda t: -math.inf, on="tokens", name="never")
    with pytest.warns(pilm.errors.ExtinctionWarning):
        res = pilm.smc(toy(never), 4, seed=0, progress=False)
    assert res.log_z == -math.inf


def test_a_reference_that_ends_too_soon_is_an_error_not_a_loop():
    with pytest.raises(ValueError, match="the reference of target 0 ends after 1 tokens"):
        pilm.particle_filter(toy(), PRM, 4, weights="twisted", reference=[0])


def test_pilm_scale_on_a_request_engine_keeps_finished_rows_when_the_engine_dies(tiny, tmp_path):
    """Every method of the grid runs on a request engine; an engine that dies mid-run stops the
    run with its own message, the blocks finished before stay in rows.jsonl, and a rerun
    completes the grid."""
    from pilm.commands.scaling import run_scale
    from pilm.config import ScaleConfig

    methods = ("greedy", "sc", "bon", "wbon", "beam", "dvts", "pf", "pf-twisted", "pg")
    cfg = ScaleConfig(backend="vllm", methods=methods, n=(2,), problems=4, max_rows=4)  # blocks of 2 problems
    model, rows = Requests(tiny, sloppy=False), tmp_path / "rows.jsonl"
    healthy = model.generate

    def dying(requests):
        if rows.exists() and rows.read_text():  # once the first block's rows are written
            raise RuntimeError("EngineDeadError: the engine core died")
        return healthy(requests)

    model.generate = dying
    with pytest.raises(RuntimeError, match="the engine core died"):
        run_scale(cfg, tmp_path, model=model, progress=False)
    kept = {(r["method"], r["problem"]) for r in map(json.loads, rows.read_text().splitlines())}
    assert kept == {("greedy", 0), ("greedy", 1)}
    model.generate = healthy
    run_scale(cfg, tmp_path, model=model, progress=False)
    done = [json.loads(line) for line in rows.read_text().splitlines()]
    assert {(r["method"], r["problem"]) for r in done} == {(m, i) for m in methods for i in range(4)}
    assert all(r["backend"] == "vllm" for r in done) and len(done) == len(methods) * 4


def test_a_learned_prm_reads_its_hidden_states_with_a_transformers_copy_on_requests(tiny):
    """A value head on a policy that returns no hidden states: with ``reader`` it scores each
    chain off the hidden state the reader computes teacher-forced (left-padded, in forwards of
    at most 3 rows here), which is the state the token-by-token forward made (float32: equal
    within 1e-5); without one, the request engine refuses it. On requests, every final chain's
    last score is the one the token engine's hidden state gives."""
    from pilm.prm import StepBatch, TwistPRM
    from pilm.testing import _state_before_last
    from pilm.twists import Twist

    torch.manual_seed(3)
    twist = Twist.for_model(tiny, output="log_sigmoid", kind="mlp")
    for p in twist.parameters():
        p.data.normal_(0, 0.3)  # not the zero-initialised head: scores that differ between chains
    target = pilm.Target(tiny, "Count:", max_new_tokens=9, steps=Steps(delimiter=tiny.encode(".")[0], max_step_tokens=3))
    chains = [tuple(torch.randint(tiny.vocab_size, (k,)).tolist()) for k in (1, 4, 7, 2, 5)]

    def scores(prm, hidden=None):
        return prm.score(StepBatch(questions=["Count:"] * 5, prompts=[tuple(target.prompt_ids)] * 5,
                                   steps=[["x"]] * 5, tokens=chains, hidden=hidden,
                                   last=torch.tensor([c[-1] for c in chains])))

    hidden = torch.cat([_state_before_last(tiny, target.prompt_ids, c).hidden for c in chains]).float()
    read = TwistPRM(twist, reader=tiny, batch_rows=3)
    assert not read.reads_hidden and TwistPRM(twist).reads_hidden
    assert torch.allclose(scores(read), scores(TwistPRM(twist), hidden), atol=1e-5)
    assert scores(read).std() > 1e-3  # the comparison has teeth
    assert read.lm_tokens == 2 * sum(len(tiny.context(target.prompt_ids)) + len(c) - 1 for c in chains)
    empty = pilm.Target(tiny, "", max_new_tokens=4)  # a BOS stands in for the prompt, as the token engine's start
    batch = StepBatch(questions=[""], prompts=[()], steps=[["x"]], tokens=[chains[1]], last=torch.tensor([chains[1][-1]]))
    alone = _state_before_last(tiny, empty.prompt_ids, chains[1]).hidden.float()
    assert torch.allclose(read.score(batch), TwistPRM(twist).score(dataclasses.replace(batch, hidden=alone)), atol=1e-5)

    engine = Requests(tiny, sloppy=True)
    with pytest.raises(ValueError, match="generates by requests"):
        TwistPRM(twist, reader=engine)
    on_requests = dataclasses.replace(target, model=engine)
    with pytest.raises(BackendError, match="reader="):
        pilm.particle_filter(on_requests, TwistPRM(twist), 4, seed=0)
    res = pilm.particle_filter(on_requests, read, 4, seed=0)
    assert res.info["prm_lm_tokens"] > 0
    for tokens, got in zip(res.tokens, res.scores, strict=True):
        state = _state_before_last(tiny, target.prompt_ids, tokens)
        with torch.no_grad():
            want = float(twist.log_psi(None, state.hidden.float()).exp()[0, tokens[-1]])
        assert abs(got[-1] - want) < 1e-5
