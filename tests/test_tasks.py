import math

import pytest
import torch

import pilm
from pilm.potentials import Toxicity


def test_toxicity_is_a_probability_and_keeps_the_protocol(tiny):
    clean, toxic = Toxicity("clean"), Toxicity("toxic")
    texts = ["what a lovely day", "you stupid idiot"]
    p, q = clean.probability(texts), toxic.probability(texts)
    assert torch.allclose(p + q, torch.ones(2, dtype=torch.float64))
    assert q[1] > 0.9 > 0.1 > q[0]
    pilm.testing.check_potential(clean ** 2, tiny, "Hi", [(), (100,), (100, 200)])
    with pytest.raises(ValueError, match="clean"):
        Toxicity("rude")


def test_task_targets(tiny):
    s = pilm.tasks.sentiment(tiny, "negative", beta=3.0, max_new_tokens=4)
    assert s.potential.name == "(sentiment(negative))**3" and not s.has_prefix_potential
    t = pilm.tasks.toxicity(tiny, "clean", max_new_tokens=4)
    assert math.isfinite(pilm.smc(t, 4, seed=0, progress=False).log_z)
    i = pilm.tasks.infilling(tiny, prompt="Once", suffix=[11, 12], max_new_tokens=3)
    assert i.potential.suffix_ids == [11, 12] and pilm.twists.condition_ids(i) == [11, 12]


def test_joint_samples_are_deterministic_and_shaped(tiny):
    pairs = pilm.tasks.joint_samples(tiny, "Once upon", max_new_tokens=3, suffix_tokens=2, n=3, seed=0)
    assert len(pairs) == 3 and all(1 <= len(m) <= 3 and len(c) == 2 for m, c in pairs)
    assert pilm.tasks.joint_samples(tiny, "Once upon", max_new_tokens=3, suffix_tokens=2, n=3, seed=0) == pairs


def test_joint_samples_are_exact_samples_of_each_suffix_posterior():
    """Group joint draws by their suffix c: the middles must follow sigma(. | c) from
    enumeration of the infilling target with that suffix (chi-square, p > 1e-3)."""
    from collections import Counter, defaultdict

    from scipy import stats

    model = pilm.models.TabularLM.random(3, seed=4)  # no EOS: every middle has 2 tokens
    pairs = pilm.tasks.joint_samples(model, "a", max_new_tokens=2, suffix_tokens=1, n=3000, seed=0)
    by_suffix = defaultdict(list)
    for middle, suffix in pairs:
        by_suffix[tuple(suffix)].append(tuple(middle))
    for suffix, middles in by_suffix.items():
        sigma = pilm.exact.distribution(pilm.tasks.infilling(model, prompt="a", suffix=list(suffix), max_new_tokens=2))
        keys = sorted(sigma)
        counts = Counter(middles)
        observed = [counts[k] for k in keys]
        expected = [sigma[k] * len(middles) for k in keys]
        assert sum(observed) == len(middles)
        assert stats.chisquare(observed, expected).pvalue > 1e-3, suffix


def test_arithmetic_problems_tool_and_answers(tiny):
    """Worked rationales are right, the calculator completes each step the model writes
    (only the last two operands, as the paper's limit), a demonstration follows the tool
    exactly where results stand, and sampled rows obey it on the real tokenizer."""
    from pilm.learning.policy_trainer import prefix_log_rewards, sample_trajectories
    from pilm.learning.tools import forced_mask
    from pilm.tasks import arithmetic as arith

    p = arith.Problem((6, 0, 4, 8), ("-", "-", "-"))
    assert (p.question, p.answer, p.rationale) == ("6 - 0 - 4 - 8", -6, " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6.")
    items = arith.problems(30, (3, 4), seed=0)
    assert len(set(items)) == 30 and {len(q.operands) for q in items} == {3, 4}
    assert all(eval(q.question) == q.answer for q in items)
    with pytest.raises(ValueError, match="fewer than"):
        arith.problems(100, 1, seed=0)
    tool = arith.calculator(tiny)
    assert tiny.decode(tool(tiny.encode(" 7 - 9 ="))) == " -2" and tool(tiny.encode(" 7 - 9")) == []
    assert tiny.decode(tool(tiny.encode(" 1 + 2 + 3 ="))) == " 5"
    demo = torch.tensor([arith.demonstration(p, tiny)])
    forced = forced_mask(demo, tool, tiny.encode(".")[0])
    assert tiny.decode(demo[forced].tolist()).split() == ["6", "2", "-6"]
    assert arith.answer_of(tiny, demo[0].tolist()) == -6
    target = arith.arithmetic(p, tiny)
    r = prefix_log_rewards(target, demo, every_prefix=True, forced=forced)
    assert torch.isfinite(r[0]).sum() == 3  # a rationale may stop right after each of its 3 results
    rows = sample_trajectories(tiny, target, 6, torch.Generator().manual_seed(0), tool=tool)
    forced_mask(rows, tool, target.stop_token_id)  # raises if a row skipped the calculator


def test_one_infilling_policy_for_many_endings(fresh_tiny):
    """ending_first puts each target's ending before its beginning: distinct policy prompts
    for distinct endings, the policy fine-tunes over several endings, and the same prompt
    function makes it a proposal that ``pilm.bounds`` scores on joint samples, each seed
    conditioning the policy on its own sampled ending."""
    from pilm.inference import ModelProposal
    from pilm.tasks import ending_first, infilling

    targets = [infilling(fresh_tiny, prompt="Once upon a time", suffix=s, max_new_tokens=3)
               for s in (" the end.", " a cat.")]
    cues = [ending_first(t) for t in targets]
    assert cues[0] != cues[1] and fresh_tiny.decode(cues[0]).startswith("The story ends with: the end.")
    assert tuple(cues[0][-len(targets[0].prompt_ids):]) == targets[0].prompt_ids
    policy = pilm.finetune(targets, "subtb", steps=2, batch_size=4, lora_rank=4, seed=0, policy_prompt=ending_first,
                           progress=False).model
    seen = []  # the ending of every target the proposal is asked to condition on, in order

    def cue(target):
        seen.append(tuple(pilm.twists.condition_ids(target)))
        return ending_first(target)

    report = pilm.bounds(targets[0], {"gfn": ModelProposal(policy, prompt=cue)}, [2], exact_samples="joint",
                         seeds=2, methods=["sis"], progress=False)
    row = next(r for r in report.rows if r["sampler"] == "gfn")
    assert math.isfinite(row["lower"]) and math.isfinite(row["upper"])
    # The endings bounds samples from the joint (seed 0, as bounds draws them), one per seed:
    # distinct, none of them the target's own; every run of seed i (its lower and its upper
    # bound) conditions the policy on seed i's ending, seed by seed.
    endings = [tuple(pilm.twists.condition_ids(t))
               for t, _ in pilm.evaluation.exact_sigma_samples(targets[0], 2, "joint", seed=0)]
    assert len(set(endings)) == 2 and tuple(targets[0].potential.suffix_ids) not in endings
    assert seen == [endings[0]] * 2 + [endings[1]] * 2, (seen, endings)
    with pytest.raises(ValueError, match="infilling target"):
        ending_first(pilm.Target(fresh_tiny, "Hi", max_new_tokens=2))
