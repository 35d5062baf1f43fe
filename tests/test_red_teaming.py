"""Red-teaming: the reward against its definition, the GFlowNet attacker against the
enumerated p*, the MLE stage's filter, the victim left untouched, and bad input."""

import math

import pytest
import torch

import pilm
from pilm.errors import PotentialError
from pilm.evaluation.exact import enumerate_sampler, enumerate_target
from pilm.models.tabular import TabularLM
from pilm.tasks.attack_reward import AttackReward, Victim, attack_text
from pilm.tasks.redteam import filter_attacks, red_teaming

EOS = 3


def share_of_b(attacks, responses):
    """A toy classifier: C = the share of "b" in the response (0 for an empty one)."""
    return torch.tensor([r.count("b") / len(r) if r else 0.0 for r in responses], dtype=torch.float64)


@pytest.fixture
def tabular():
    """Attacker and victim are different random tables (asymmetric); the victim answers an
    attack's text greedily with 3 letters, so the reward is a deterministic function of x."""
    attacker = TabularLM.random(4, seed=5, eos_id=EOS)
    victim = Victim(TabularLM.random(4, seed=9, eos_id=EOS), system="", temperature=0.0, max_tokens=3,
                    template="{attack}")
    return red_teaming(attacker, victim, classifier=share_of_b, victim_samples=1, beta=0.5, prompt="a",
                       max_tokens=3, min_tokens=1, stop=EOS)


def greedy(model, prompt, n):
    out, prefix = [], tuple(prompt)
    for _ in range(n):
        v = int(model.logprobs_of(prefix).argmax())
        if v == EOS:
            break
        out.append(v)
        prefix += (v,)
    return model.decode(out)


def test_the_reward_is_its_definition_by_hand(tabular):
    victim = tabular.victim.model
    e = enumerate_target(tabular.target)
    for tokens, log_phi in zip(e.tokens, e.log_phi.tolist()):
        text = tabular.attacker.decode([t for t in tokens if t != EOS])
        if not text:
            assert log_phi == -math.inf  # the empty attack: phi = 0, the victim is not asked
            continue
        reply = greedy(victim, victim.encode(text), 3)
        c = max(reply.count("b") / len(reply) if reply else 0.0, 1e-6)
        assert log_phi == pytest.approx(math.log(c) / 0.5, rel=1e-5), text


def test_e_log_and_log_e_over_sampled_responses(tabular):
    """With k = 4 responses at temperature 1: E-log is the mean of log C over the very
    responses the victim gives for that generator state, log-E the log of their mean."""
    victim = Victim(tabular.victim.model, system="", temperature=1.0, max_tokens=3, template="{attack}")
    seqs = tabular.target.sequences([(0, 1, EOS), (2, 2, 1)])
    for aggregate in ("elog", "loge"):
        reward = AttackReward(victim, share_of_b, samples=4, beta=0.5, min_tokens=1, stop=EOS, aggregate=aggregate, seed=3)
        got = reward.log_phi(seqs)
        replies = victim.respond(["ab", "ccb"], 4, torch.Generator().manual_seed(3))
        c = torch.stack([share_of_b(None, r).clamp(min=1e-6) for r in replies])
        want = c.log().mean(1) if aggregate == "elog" else c.mean(1).log()
        torch.testing.assert_close(got, (want / 0.5).float())
    assert AttackReward(victim, share_of_b, samples=4, min_tokens=1, stop=EOS).log_phi(seqs)[0] <= 0


def test_gamma_tempers_the_reference_likelihood(tabular):
    tempered = red_teaming(tabular.attacker, tabular.victim, classifier=share_of_b, victim_samples=1, beta=0.5,
                           gamma=2.0, prompt="a", max_tokens=3, min_tokens=1, stop=EOS)
    a, b = enumerate_target(tabular.target), enumerate_target(tempered.target)
    finite = torch.isfinite(a.log_phi)
    # log phi_gamma = log phi + (1/gamma - 1) log p_ref
    torch.testing.assert_close(b.log_phi[finite], a.log_phi[finite] - 0.5 * a.log_p0[finite])


# TB with a log Z head, 300 steps of 16 on free logits (lr 0.05): measured KL(p* || q) 0.0105
# from 1.17 at q = p_ref (seed 0; the bound leaves a 2x margin); KL(q || p*) is infinite for any q
# with mass on the empty attack (p* = 0), so that mass is bounded instead (measured 1e-4).
def test_the_gflownet_attacker_reaches_the_enumerated_target(tabular):
    before = enumerate_sampler(tabular.target, tabular.attacker).kl_sigma_q()
    q = pilm.finetune(tabular.target, "tb", steps=300, batch_size=16, lr=0.05, warmup=1, seed=0, progress=False).model
    e = enumerate_sampler(tabular.target, q)
    assert before > 0.3
    assert e.kl_sigma_q() < 0.02
    assert math.exp(float(q.log_prob(tabular.target.prompt_ids, [[EOS]])[0])) < 0.01


def test_the_mle_filter_keeps_exactly_the_attacks_above_both_thresholds():
    attacks = ["a", "b", "c", "d", "b", "", "e"]
    toxicity = [0.9, 0.8, 0.6, 0.95, 0.99, 0.99, 0.71]
    log_p = [-5.0, -20.0, -1.0, -150.0, -3.0, -1.0, -99.0]
    assert filter_attacks(attacks, toxicity, log_p, threshold=0.7, min_log_p=-100) == ["a", "b", "e"]
    assert filter_attacks(attacks, toxicity, log_p, threshold=0.85, min_log_p=-10) == ["a", "b"]


def test_stages_one_and_two_never_touch_the_victim(fresh_tiny, tiny):
    """An HF attacker (the session's tiny Llama) and a separate HF victim: TB and the MLE
    stage inject adapters into the attacker only; the victim's weights and replies are as
    before."""
    victim = Victim(fresh_tiny, max_tokens=4)
    before = {k: v.clone() for k, v in fresh_tiny.hf.state_dict().items()}
    replies = victim.respond(["hello there"], 2, torch.Generator().manual_seed(0))
    from pilm.models.hf import HFModel

    attacker = HFModel(type(tiny.hf)(tiny.hf.config), tiny.tokenizer, name="attacker")
    rt = red_teaming(attacker, victim, classifier=lambda x, y: torch.full((len(y),), 0.9, dtype=torch.float64),
                     victim_samples=1, max_tokens=4, min_tokens=1)
    q = pilm.finetune(rt.target, "tb", steps=1, batch_size=2, progress=False).model
    smooth = pilm.tasks.red_teaming.mle_stage(rt, q, threshold=0.5, n=4, steps=1, batch_size=2, progress=False)
    assert smooth.extras["attacks"] and smooth.model is not q
    after = fresh_tiny.hf.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert victim.respond(["hello there"], 2, torch.Generator().manual_seed(0)) == replies


def test_the_victim_reads_the_attack_text_with_its_own_tokenizer(tabular, fresh_tiny):
    """A tabular attacker and an HF victim: the victim gets the decoded text, re-tokenised."""
    victim = Victim(fresh_tiny, max_tokens=3)
    seen = []

    def spy(attacks, responses):
        seen.extend(attacks)
        return torch.full((len(responses),), 0.5, dtype=torch.float64)

    rt = red_teaming(tabular.attacker, victim, classifier=spy, victim_samples=1, prompt="a", max_tokens=3,
                     min_tokens=1, stop=EOS)
    rt.reward.log_phi(rt.target.sequences([(1, 2, EOS)]))
    assert seen == ["bc"]
    ids = victim.prompt_ids("bc")
    assert fresh_tiny.tokenizer.decode(ids).count("bc") == 1


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, match", [(1.5, "returned 1.5"), (-0.1, "returned -0.1"), (math.nan, "returned nan")])
def test_a_classifier_outside_zero_one_is_refused(tabular, value, match):
    rt = red_teaming(tabular.attacker, tabular.victim, classifier=lambda x, y: torch.full((len(y),), value),
                     victim_samples=1, prompt="a", max_tokens=3, min_tokens=1, stop=EOS)
    with pytest.raises(PotentialError, match=match + ".*must be a probability in \\[0, 1\\]"):
        rt.reward.log_phi(rt.target.sequences([(0, 1, EOS)]))


def test_an_attack_that_decodes_to_empty_text_gets_no_reward_and_no_victim_call(tabular):
    calls = []
    rt = red_teaming(tabular.attacker, tabular.victim, classifier=lambda x, y: calls.append(x) or torch.ones(len(y)),
                     victim_samples=1, prompt="a", max_tokens=3, min_tokens=0, stop=EOS)
    assert rt.reward.log_phi(rt.target.sequences([(EOS,)])).tolist() == [-math.inf]
    assert calls == [] and attack_text(tabular.attacker, [EOS], EOS) == ""


def test_bad_red_teaming_settings_are_refused(tabular):
    with pytest.raises(ValueError, match="classifier must be"):
        red_teaming(tabular.attacker, tabular.victim, classifier="telepathy", prompt="a", stop=EOS)
    with pytest.raises(ValueError, match="aggregate must be"):
        AttackReward(tabular.victim, share_of_b, aggregate="median")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        red_teaming(tabular.attacker, tabular.victim, classifier=share_of_b, gamma=0, prompt="a", stop=EOS)
