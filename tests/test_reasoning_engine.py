"""The reasoning parts on transformers models: process rewards that read the policy's forward
or run an LM, the arithmetic-chain and GSM8K tasks, and ``pilm scale`` (resume, accelerate)."""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pilm
from pilm.config import ScaleConfig
from pilm.models.prompt_cache import PromptCache
from pilm.prm import LMJudge, StepBatch, StepTagPRM, TwistPRM
from pilm.tasks import arithmetic_chain as chain
from pilm.tasks import gsm8k
from pilm.twists import Twist


def test_the_step_verifier_is_exact_on_worked_and_broken_chains():
    q = "6 + 4 - 6 - 7"
    right = chain.solution(q).split("\n")
    assert right == ["6 + 4 = 10", "10 - 6 = 4", "4 - 7 = -3", "The answer is -3."]
    assert chain.chain_is_right(q, [s + "\n" for s in right])
    assert chain.chain_is_right(q, right[:2])  # a right prefix
    assert not chain.chain_is_right(q, ["6 + 4 = 12"])  # wrong result
    assert not chain.chain_is_right(q, ["6 + 4 = 10", "10 - 7 = 3"])  # skipped an operand
    assert not chain.chain_is_right(q, right[:3] + ["The answer is 3."])  # wrong answer line
    assert not chain.chain_is_right(q, right + ["more"])  # a step after the answer
    check = chain.answer_checker()
    assert check(q, "-3") and not check(q, "3") and not check(q, None)
    with pytest.raises(ValueError, match="not an arithmetic chain"):
        chain.solve("6 + 44")


def test_problems_are_distinct_reproducible_and_never_a_worked_example():
    a, b = chain.problems(200, seed=0), chain.problems(200, seed=0)
    assert a == b and len({p["question"] for p in a}) == 200
    assert not {p["question"] for p in a} & set(chain.SHOTS)
    assert chain.problems(30, seed=0) == a[:30]  # a smaller run is a prefix of a larger one (resumable grids)
    assert all(str(chain.solve(p["question"])) == p["answer"] for p in a)
    assert all(3 <= len(p["question"].split()) // 2 + 1 <= 5 for p in a)
    every = chain.problems(chain.distinct((2, 2)), (2, 2), seed=1)  # all 10 * 10 * 2 (no worked example has 2)
    assert len({p["question"] for p in every}) == 200 and chain.distinct((3, 3)) == 4000 - 2
    with pytest.raises(ValueError, match="fewer than 201 distinct problems with 2 to 2 operands"):
        chain.problems(201, (2, 2))
    with pytest.raises(ValueError, match=r"2 <= lo <= hi, got \(5, 3\)"):
        chain.problems(1, (5, 3))


def test_the_learned_prm_reads_the_hidden_state_the_forward_already_made(tiny):
    """Inside the filter a tied value head scores a step from the hidden state its last token
    was drawn from: the same number a teacher-forced forward of the chain gives."""
    torch.manual_seed(0)
    head = Twist.for_model(tiny, kind="tied", layers=2, output="log_sigmoid")
    seen = []

    class Spy(TwistPRM):
        def score(self, batch: StepBatch):
            out = super().score(batch)
            seen.append((batch, out))
            return out

    target = chain.target(tiny, "3 + 4 - 6", max_new_tokens=12)
    target = pilm.Target(tiny, target.prompt_ids, max_new_tokens=12, question=target.question,
                         steps=pilm.Steps(delimiter="\n", max_steps=3, max_step_tokens=4))
    pilm.particle_filter(target, Spy(head), 3, seed=0)
    batch, scores = seen[1]
    for k in range(len(batch)):
        toks = list(batch.tokens[k])
        state = tiny.start(list(target.prompt_ids) + toks[:-1], 1)
        manual = head.log_psi(None, state.hidden)[0, toks[-1]].exp().detach()
        assert float(scores[k]) == pytest.approx(float(manual), abs=1e-4)


def test_the_learned_prm_is_also_a_twist(tiny):
    """The PRM's value head drives twisted SMC: without resampling each particle's weight is
    p0(s) / q(s), q(s) = prod_t p0(s_t) psi(s_<=t) / sum_v p0(v) psi(s_<t v) with psi read
    from the head at teacher-forced hidden states, here by hand (the target has no potential,
    so phi = 1). The head's token bias is spread (sd 1) so that q is far from p0: the log
    weights are of order 1 (measured 2.1, -2.7, -0.9, -1.4), where a sampler that ignored the
    twist would give 0 and the by-hand values agree to ~1e-5."""
    torch.manual_seed(0)
    head = Twist.for_model(tiny, kind="tied", layers=2, output="log_sigmoid")
    with torch.no_grad():
        head.token_bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    target = chain.target(tiny, "3 + 4 - 6", max_new_tokens=6)
    res = pilm.smc(target, 4, twist=head, ess_threshold=0.0, seed=0, progress=False)
    for tokens, log_w in zip(res.tokens, res.log_weights):
        by_hand = 0.0
        for t in range(len(tokens)):
            state = tiny.start(list(target.prompt_ids) + tokens[:t], 1)
            log_p0 = state.logprobs[0].double()
            with torch.no_grad():
                log_psi = head.log_psi(None, state.hidden)[0].double()
            log_q = log_p0 + log_psi - torch.logsumexp(log_p0 + log_psi, 0)
            by_hand += float(log_p0[tokens[t]] - log_q[tokens[t]])
        assert log_w == pytest.approx(by_hand, abs=1e-3), (tokens, log_w, by_hand)
    assert max(abs(w) for w in res.log_weights) > 0.5  # the twist moved the proposal off p0
    assert math.isfinite(pilm.smc(target, 4, twist=head, seed=0, progress=False).log_z)  # with resampling too


def test_a_twist_with_unbounded_psi_is_not_a_prm(tiny):
    with pytest.raises(ValueError, match="psi in \\[0, 1\\]"):
        TwistPRM(Twist.for_model(tiny, kind="tied", layers=2))


def test_the_judge_reads_yes_against_no_in_one_batch(tiny):
    judge = LMJudge(tiny)
    batch = StepBatch(["1 + 1", "2 + 2"], [(), ()], [["1 + 1 = 2\n"], ["2 + 2 = 5\n", "The answer is 5."]], [(), ()])
    scores = judge.score(batch)
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    text = judge.template.format(question="2 + 2", steps="2 + 2 = 5\n\nThe answer is 5.")
    lp = tiny.start(tiny.encode_prompt(text), 1).logprobs[0, [judge.yes, judge.no]]
    assert float(scores[1]) == pytest.approx(float(torch.softmax(lp.double(), 0)[0]), abs=1e-4)
    assert judge.lm_tokens > 0
    with pytest.raises(ValueError, match="slots"):
        LMJudge(tiny, template="Is it right? {steps}")


def test_the_judge_runs_a_questions_shared_prefix_once_and_scores_as_each_prompt_alone(tiny):
    """Rows of one question share the judge's instructions and the question: transformers runs
    that prefix once and the rest of each prompt after it (left-padded), which gives what each
    prompt alone gives (float32, to rounding); lm_tokens counts the positions run."""
    from pilm.models.base import LanguageModel

    judge = LMJudge(tiny)
    steps = [["1 + 1 = 2\n"], ["2 + 2 = 4\n"], ["1 + 1 = 3\n", "The answer is 3."], ["2 + 2 = 5\n", "The answer is 5."],
             ["1 + 1 = 2\n", "The answer is 2."], ["3 + 3 = 6\n"]]
    questions = ["1 + 1", "2 + 2", "1 + 1", "2 + 2", "1 + 1", "3 + 3"]  # interleaved, and one alone
    batch = StepBatch(questions, [()] * 6, steps, [()] * 6)
    scores = judge.score(batch)
    prompts = [tiny.encode_prompt(judge.template.format(question=q, steps="\n".join(s).strip()))
               for q, s in zip(questions, steps, strict=True)]
    alone = torch.cat([LanguageModel.choice_logprobs(tiny, [p], [judge.yes, judge.no]) for p in prompts])
    assert torch.allclose(scores, torch.softmax(alone.double(), -1)[:, 0], atol=1e-5)  # each back in its row
    ones = [prompts[i] for i in (0, 2, 4)]
    counted = PromptCache()
    assert torch.allclose(tiny.choice_logprobs(ones, [judge.yes, judge.no], cache=counted), alone[[0, 2, 4]], atol=1e-4)
    shared = len(os.path.commonprefix(ones))
    assert 0 < shared and counted.positions == shared + sum(len(p) - shared for p in ones)
    # the judge's next calls (the other question's rows, then the lone row) start where the first call's forward ends
    twos, lone = [prompts[1], prompts[3]], prompts[5]
    two = len(os.path.commonprefix(twos))
    ran = [ones[0][:shared], *ones]
    twos_ran = two - _longest_run(twos[0][:two], ran) + sum(len(p) - two for p in twos)
    lone_ran = len(lone) - _longest_run(lone, ran + [twos[0][:two], *twos])
    assert judge.lm_tokens == counted.positions + twos_ran + lone_ran < sum(map(len, prompts))
    nothing_shared = PromptCache()
    LanguageModel.choice_logprobs(tiny, prompts, [judge.yes], cache=nothing_shared)  # a backend that keeps nothing
    assert nothing_shared.positions == sum(map(len, prompts))


def test_the_judge_asks_rows_with_the_same_steps_once(tiny):
    """Copies of a row (what resampling makes) get the score their prompt gets alone, and the
    judge runs each distinct prompt once: the positions of the batch without its copies."""
    steps = [["1 + 1 = 2\n"], ["1 + 1 = 3\n"], ["1 + 1 = 2\n"], ["2 + 2 = 4\n"], ["1 + 1 = 2\n"], ["2 + 2 = 4\n"]]
    questions = ["1 + 1", "1 + 1", "1 + 1", "2 + 2", "1 + 1", "2 + 2"]
    copies, distinct = LMJudge(tiny), LMJudge(tiny)
    scores = copies.score(StepBatch(questions, [()] * 6, steps, [()] * 6))
    once = distinct.score(StepBatch([questions[i] for i in (0, 1, 3)], [()] * 3, [steps[i] for i in (0, 1, 3)], [()] * 3))
    assert torch.equal(scores, once[[0, 1, 0, 2, 0, 2]])
    assert copies.lm_tokens == distinct.lm_tokens > 0


def _longest_run(prompt: list[int], earlier: list[list[int]]) -> int:
    return max((len(os.path.commonprefix([prompt, e])) for e in earlier), default=0)


def _sharp(tiny, config_class, model_class, **extra):
    """A tiny random model whose next token depends strongly on its context (large initial
    weights), so a wrong position or key moves its log-probabilities by far more than rounding."""
    from pilm.models import HFModel

    torch.manual_seed(1)
    config = config_class(vocab_size=len(tiny.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, **extra)
    return HFModel(model_class(config).float(), tiny.tokenizer, name="sharp")


@pytest.fixture(scope="module")
def sharp(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _sharp(tiny, LlamaConfig, LlamaForCausalLM)


def _alone(model, prompts, choices):
    from pilm.models.base import LanguageModel

    return torch.cat([LanguageModel.choice_logprobs(model, [p], choices) for p in prompts])


def _judged(model, question: str, steps: list[str]) -> list[int]:
    return model.encode_prompt(f"Question: {question}\nSo far:\n" + "\n".join(steps) + "\nIs it right? Answer:")


def test_a_prompt_cache_runs_only_what_follows_the_longest_prefix_already_run(sharp):
    """A chain judged after each step, its rows resampled (one copied to two rows, rows
    reordered, one unchanged), for two questions: each call with a PromptCache runs only what
    follows the longest prefix an earlier call ran, whichever row ran it, and gives the
    log-probabilities each prompt alone gives (float32; a position off by one moves them by
    about 10 on this model, rounding by 1e-5). Another model sharing the cache (other keys
    and values) reuses none of it."""
    choices = [sharp.encode(" Yes")[0], sharp.encode(" No")[0], 13, 500]
    rounds = [
        [_judged(sharp, "1 + 1", ["a = 2"]), _judged(sharp, "1 + 1", ["a = 3"]), _judged(sharp, "2 + 2", ["b = 4"])],
        [_judged(sharp, "1 + 1", ["a = 2", "c = 5"]), _judged(sharp, "1 + 1", ["a = 2", "c = 6"]),
         _judged(sharp, "2 + 2", ["b = 4", "d = 1"])],
        [_judged(sharp, "2 + 2", ["b = 4", "d = 1", "e = 7"]), _judged(sharp, "1 + 1", ["a = 2", "c = 6"])],
    ]
    cache, earlier = PromptCache(), []
    for k, prompts in enumerate(rounds):
        before = cache.positions
        got = sharp.choice_logprobs(prompts, choices, cache=cache)
        assert torch.allclose(got, _alone(sharp, prompts, choices), atol=1e-4), k
        if k == 0:  # nothing ran before: the prefix all three share runs once
            shared = len(os.path.commonprefix(prompts))
            assert cache.positions == shared + sum(len(p) - shared for p in prompts)
            earlier.append(prompts[0][:shared])
        else:  # each prompt after its longest earlier prefix, at least its last position run
            ran = sum(len(p) - min(_longest_run(p, earlier), len(p) - 1) for p in prompts)
            assert cache.positions - before == ran < sum(map(len, prompts)) // 2
        earlier += prompts
    other = copy.deepcopy(sharp)
    with torch.no_grad():
        for layer in other.hf.model.layers:
            layer.self_attn.k_proj.weight.mul_(2.0)
            layer.self_attn.v_proj.weight.mul_(0.5)
    before = cache.positions
    got = other.choice_logprobs(rounds[-1], choices, cache=cache)
    assert torch.allclose(got, _alone(other, rounds[-1], choices), atol=1e-4)
    shared = len(os.path.commonprefix(rounds[-1]))
    assert cache.positions - before == shared + sum(len(p) - shared for p in rounds[-1])


def test_a_prompt_cache_keeps_the_runs_its_budget_holds_extended_ones_out_first(sharp):
    """Over its budget a cache evicts first the runs a later call extended, then the least
    recently used; what it keeps stays exact, and a cache of 0 bytes keeps nothing (each call
    then shares only its own prompts' prefix)."""
    prompts = [sharp.encode_prompt(f"Question: 5 - {k}\nSo far:\nx = {k}\nRight?") for k in range(2)]
    calls = [[p + sharp.encode(" y"), p + sharp.encode(" no")] for p in prompts]
    calls.append([calls[0][0] + sharp.encode(" and z"), calls[0][1] + sharp.encode(" and w")])  # extends the first
    unbounded = PromptCache()
    for call in calls:
        sharp.choice_logprobs(call, [13], cache=unbounded)
    sizes = [r.nbytes for r in unbounded.runs]
    cache = PromptCache(max_bytes=sizes[1] + sizes[2])  # two of the three calls' runs
    for call in calls:
        got = sharp.choice_logprobs(call, [13, 500], cache=cache)
        assert torch.allclose(got, _alone(sharp, call, [13, 500]), atol=1e-4)
        assert cache.nbytes <= cache.max_bytes
    assert [r.tokens for r in cache.runs] == calls[1:]  # the first call's run went: the third extended it
    before = cache.positions
    sharp.choice_logprobs(calls[1], [13], cache=cache)
    assert cache.positions - before == 2  # each prompt's last position only
    cache.clear()
    assert not cache.runs and cache.nbytes == 0
    none = PromptCache(max_bytes=0)
    for call in calls:
        before = none.positions
        sharp.choice_logprobs(call, [13], cache=none)
        shared = len(os.path.commonprefix(call))
        assert not none.runs and none.positions - before == shared + sum(len(q) - shared for q in call)


def test_a_sliding_window_model_runs_whole_prompts_and_scores_them_as_alone(tiny):
    """Padding between a prefix and its rest would move a sliding window (it counts cache
    slots): such a model runs each prompt whole, exact, and its cache counts every position."""
    from transformers import MistralConfig, MistralForCausalLM

    windowed = _sharp(tiny, MistralConfig, MistralForCausalLM, sliding_window=8)
    prompts = [_judged(windowed, "1 + 1", ["a = 2", "c = 5"]), _judged(windowed, "1 + 1", ["a = 2"])]
    cache, choices = PromptCache(), [13, 500]
    for _ in range(2):
        assert torch.allclose(windowed.choice_logprobs(prompts, choices, cache=cache), _alone(windowed, prompts, choices),
                              atol=1e-4)
    assert cache.positions == 2 * sum(map(len, prompts)) and not cache.runs


def test_a_step_tag_prm_reads_good_against_bad_after_the_last_tag(tiny):
    prm = StepTagPRM(tiny, step_tag=" ки", good="+", bad="-")
    batch = StepBatch(["1 + 1"], [()], [["1 + 1 = 2\n", "The answer is 2."]], [()])
    score = prm.score(batch)
    text = "1 + 1 1 + 1 = 2 ки\nThe answer is 2. ки"
    lp = tiny.start(tiny.encode_prompt(text), 1).logprobs[0, [prm.yes, prm.no]]
    assert float(score[0]) == pytest.approx(float(torch.softmax(lp.double(), 0)[0]), abs=1e-4)


def test_gsm8k_loads_offline_and_checks_numbers(tmp_path):
    every = gsm8k.load()
    assert len(every) == 1319 and every[0]["answer"] == "18"
    assert gsm8k.problems(5, seed=1) == gsm8k.problems(5, seed=1)
    check = gsm8k.answer_checker({"q": "1200"})
    assert check("q", "1,200") and check("q", "1200.0") and not check("q", "120")
    assert gsm8k.steps().answer("so\nThe answer is $1,200.") == "1200"
    assert gsm8k.steps().answer("the average is:\n\\[ \\boxed{61} \\]") == "61"  # a chat model's LaTeX answer
    assert gsm8k.steps().answer("\\[ \\boxed{\\$1,200.50} \\]") == "1200.5" and gsm8k.steps().answer("\\boxed{x}") is None
    assert gsm8k.steps().finishes(3, "so it is \\( \\boxed{7} \\)")
    ends = gsm8k.steps().ends
    assert not ends("\n", 0) and not ends("\n\n", 0) and not ends("\n  \n\\[", 0)  # blank lines join the next step
    assert ends("Tom has 12 pens.\n", 0) and ends("\n\n\\[\n", 0) and ends("x = 1\n\n", 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gsm8k.load(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "12"}) + "\n")
    with pytest.raises(ValueError, match="line 1: the answer must end with '#### N'"):
        gsm8k.load(tmp_path / "bad.jsonl")


def test_scale_writes_one_row_per_cell_and_resumes(tiny, tmp_path):
    from pilm.commands.scale_report import report, summarise, table
    from pilm.commands.scaling import run_scale

    cfg = ScaleConfig(methods=("greedy", "sc", "bon", "pf", "pf-twisted", "beam", "beam-all"), n=(1, 2), problems=3)
    rows = run_scale(cfg, tmp_path, model=tiny, progress=False)
    lines = rows.read_text().splitlines()
    keys = {(r["method"], r["prm"], r["n"], r["problem"]) for r in map(json.loads, lines)}
    assert len(lines) == len(keys) == 3 * (1 + 6 * 2)  # greedy once; every other method at N = 1, 2
    for r in map(json.loads, lines):  # a right answer is some chain's; one chain's is its own (pass@1)
        assert r["any_correct"] >= r["correct"] and (r["n"] > 1 or r["any_correct"] == r["correct"]), r
    run_scale(cfg, tmp_path, model=tiny, progress=False)  # resumes: nothing left to do
    assert rows.read_text().splitlines() == lines
    summary = summarise(rows)
    assert {s["method"] for s in summary} == set(cfg.methods)
    # Each cell's interval is Wilson's 95% score interval at k of n = 3 problems, written out here
    # (any interval contains the accuracy; a Wald one, for one, is (0, 0) at k = 0).
    for s in summary:
        n, z = s["problems"], 1.959964  # the normal 97.5% quantile
        k = round(s["accuracy"] * n)
        centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert n == 3 and (s["low"], s["high"]) == pytest.approx((centre - half, centre + half), abs=1e-9), s
    from pilm.evaluation.metrics import wilson

    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook value at 8 of 10
    assert "| pf | verifier | 2 |" in table(summary)
    text = report(rows)  # table.md: the pairs against the filter, and growth between its two largest N
    assert "| beam (verifier, 2) | pf (verifier, 2) | 3 |" in text and "| pf (verifier) | beam (verifier) | 1 → 2 | 3 |" in text


def test_scale_runs_every_method_on_a_block_before_the_next(tiny, tmp_path, capsys):
    """A run stopped anywhere leaves the methods on the same problems, the pairs McNemar's test
    compares: the cells go block by block, each block through every method (greedy at the first N)."""
    from pilm.commands.scaling import run_scale

    cfg = ScaleConfig(methods=("greedy", "sc", "pf"), n=(1, 2), problems=3, max_rows=2)
    run_scale(cfg, tmp_path, model=tiny)
    cells = [line.split(" ...")[0].removeprefix("scale: ") for line in capsys.readouterr().out.splitlines()]
    assert cells == [f"{m} N={n} prm=verifier: problems {lo}..{hi}"
                     for n, blocks in ((1, ((0, 1), (2, 2))), (2, ((0, 0), (1, 1), (2, 2))))
                     for lo, hi in blocks for m in ("greedy", "sc", "pf") if m != "greedy" or n == 1]


def test_each_method_meets_the_particle_filter_on_the_same_problems(tmp_path):
    """McNemar's exact test: 11 problems only one method gets right against 1 only the other
    does is p = 2 * 13 / 2**12 (the binomial tail written out); self-consistency (no PRM) and
    greedy (N = 1 only) meet the filter at its N, and a problem only one of them ran is left out."""
    from pilm.commands.scale_report import families, families_text, paired, paired_table
    from pilm.evaluation.metrics import mcnemar

    assert mcnemar([True] * 11 + [False] + [True] * 5, [False] * 11 + [True] + [True] * 5) == (
        11, 1, pytest.approx(2 * 13 / 2**12, rel=1e-12))
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same items"):
        mcnemar([True], [True, False])
    right = {("pf", "verifier", 4): [1, 1, 1, 0, 1, 1], ("sc", "none", 4): [0, 1, 0, 0, 1, 1],
             ("greedy", "none", 1): [1, 0, 0, 0, 0, 1], ("bon", "verifier", 4): [1, 1, 1, 1, 1],
             ("bon", "judge", 4): [0, 0, 0, 0, 0, 0]}
    rows = [{"method": m, "prm": prm, "n": n, "problem": i, "correct": bool(c)}
            for (m, prm, n), cs in right.items() for i, c in enumerate(cs)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = paired(tmp_path / "rows.jsonl")
    assert [(c["method"], c["prm"], c["n"]) for c in out] == [("greedy", "none", 1), ("sc", "none", 4),
                                                              ("bon", "verifier", 4)]  # not bon with the judge
    assert all((c["reference_prm"], c["reference_n"]) == ("verifier", 4) for c in out)
    got = {c["method"]: c for c in out}
    assert (got["sc"]["only_method"], got["sc"]["only_reference"], got["sc"]["p"]) == (0, 2, 0.5)
    assert (got["greedy"]["only_method"], got["greedy"]["only_reference"]) == (0, 3)
    assert got["bon"]["problems"] == 5 and (got["bon"]["only_method"], got["bon"]["only_reference"]) == (1, 0)
    assert "| sc (none, 4) | pf (verifier, 4) | 6 | 3 | 5 | 0 / 2 | 0.5 |" in paired_table(out)
    against_sc = paired(tmp_path / "rows.jsonl", reference="sc")  # a reference without a PRM meets every PRM's
    assert {(c["method"], c["prm"]) for c in against_sc} == {("greedy", "none"), ("pf", "verifier"),
                                                             ("bon", "verifier"), ("bon", "judge")}
    # A Bonferroni family per PRM: the pair of self-consistency and the filter is listed against
    # each, and counts once; the judge's two pairs are apart; greedy against self-consistency has no PRM.
    listed = [c for ref in ("pf", "sc", "greedy") for c in paired(tmp_path / "rows.jsonl", reference=ref)]
    assert len(listed) == 11 and families(listed, []) == {"judge": 2, "none": 1, "verifier": 5}
    assert "verifier 5 (0.05 / 5 = 0.01)" in families_text(families(listed, []))
    with pytest.raises(ValueError, match="two PRMs"):
        families([{**listed[0], "prm": "judge", "reference_prm": "verifier"}], [])


def test_growth_pairs_each_methods_change_and_the_filters_against_it(tmp_path):
    """Per PRM between the filter's two largest N (4 -> 16 with the verifier, 1 -> 4 with the
    judge). With the verifier the filter's change minus beam search's is +2, +1, +1, -1, 0, -1
    on the problems all four cells ran: net +2, 3 problems against 2, and the sign-flip p sums
    the patterns of (+-2, +-1 x 4) whose |sum| reaches 2: 24 of 32 (all but the 4 + 4 where the
    four ones sum to -+2 against the +-2). Problem 6 (only the filter ran it at 16) stays out,
    self-consistency (no PRM) meets both PRMs' filters, its own change once per pair of N, and
    beam search with the judge meets only the judge's filter."""
    from pilm.commands.scale_report import families, growth, growth_table
    from pilm.evaluation.metrics import mcnemar, sign_flip

    assert sign_flip([2, 2, -1]) == 0.5 and sign_flip([0, 0]) == 1.0
    assert sign_flip([1] * 11 + [-1, 0]) == pytest.approx(mcnemar([True] * 11 + [False], [False] * 11 + [True])[2])
    right = {("pf", "verifier", 1): [1] * 6, ("pf", "verifier", 4): [0, 0, 1, 1, 0, 0],
             ("pf", "verifier", 16): [1, 1, 1, 0, 0, 0, 1],
             ("beam", "verifier", 4): [1, 1, 1, 0, 1, 0], ("beam", "verifier", 16): [0, 1, 0, 0, 1, 1],
             ("pf", "judge", 1): [0, 0, 0, 0, 0, 0], ("pf", "judge", 4): [1, 1, 0, 0, 0, 0],
             ("beam", "judge", 1): [1, 1, 1, 1, 1, 1], ("beam", "judge", 4): [0, 0, 0, 0, 0, 0],
             ("sc", "none", 4): [1, 1, 1, 1, 1, 1], ("sc", "none", 16): [1, 1, 1, 1, 1, 0],
             ("sc", "none", 1): [0, 0, 0, 0, 0, 0]}
    rows = [{"method": m, "prm": prm, "n": n, "problem": i, "correct": bool(c)}
            for (m, prm, n), cs in right.items() for i, c in enumerate(cs)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = growth(tmp_path / "rows.jsonl")
    got = {(g["method"], g["prm"], g["low"], g["against"], g["against_prm"] if g["against"] else None): g for g in out}
    assert len(got) == len(out) == 10
    assert {(g["prm"], g["low"], g["high"]) for g in out} == {("judge", 1, 4), ("verifier", 4, 16), ("none", 1, 4),
                                                             ("none", 4, 16)}
    own = got[("pf", "verifier", 4, None, None)]
    assert (own["problems"], own["first"], own["second"], own["p"]) == (6, 2, 1, 1.0)
    vs = got[("pf", "verifier", 4, "beam", "verifier")]
    assert (vs["problems"], vs["net"], vs["first"], vs["second"]) == (6, 2, 3, 2)
    assert vs["p"] == pytest.approx(24 / 32, rel=1e-12)
    assert got[("pf", "judge", 1, "beam", "judge")]["net"] == 2 + 6  # wrong -> right twice; right -> wrong six times
    assert got[("pf", "verifier", 4, "sc", "none")]["net"] == 1 - (-1)  # the filter +1 net, self-consistency -1
    assert "| pf (verifier) | beam (verifier) | 4 → 16 | 6 | +2 | 3 / 2 | 0.75 |" in growth_table(out)
    # each PRM's own changes and the filter's against beam search and self-consistency; sc's own two changes have none
    assert families([], out) == {"judge": 4, "none": 2, "verifier": 4}


def test_two_learned_prms_in_one_folder_stay_apart_in_every_table(tmp_path, monkeypatch):
    """Rows of two learned PRM folders in one run folder are two PRMs in the tables, the pairs and
    the plot, not one cell that mixes them; one folder alone keeps the plain name."""
    from pilm.commands.scale_report import cell_rows, paired, panels, plot, read_rows, summarise

    cells = {("pf", "learned", "a"): [1, 1, 0], ("pf", "learned", "b"): [0, 0, 0], ("beam", "learned", "a"): [1, 0, 0]}
    rows = [{"method": m, "prm": prm, "prm_path": path, "n": 4, "problem": i, "correct": bool(c), "tokens": 10.0,
             "prm_tokens": 0.0, "seconds": 1.0} for (m, prm, path), cs in cells.items() for i, c in enumerate(cs)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {(s["method"], s["prm"]): s["accuracy"] for s in summarise(tmp_path / "rows.jsonl")}
    assert summary == {("beam", "learned (a)"): pytest.approx(1 / 3), ("pf", "learned (a)"): pytest.approx(2 / 3),
                       ("pf", "learned (b)"): 0.0}
    assert [(c["method"], c["reference_prm"]) for c in paired(tmp_path / "rows.jsonl")] == [("beam", "learned (a)")]
    assert panels(summarise(tmp_path / "rows.jsonl")) == ["learned (a)", "learned (b)"]  # a panel each
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figure to read its legends
    plot(summarise(tmp_path / "rows.jsonl"), tmp_path / "scale.png")
    fig = plt.gcf()
    monkeypatch.undo()
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]  # every panel has one
    plt.close(fig)
    assert legends == [["beam", "pf"], ["pf"]]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["prm_path"] == "a"))
    assert {r["prm"] for r in cell_rows(tmp_path / "one.jsonl")} == {"learned"}
    assert {r["prm"] for r in read_rows(tmp_path / "rows.jsonl")} == {"learned"}  # what resuming reads: as written


def test_scale_with_the_chat_template_prompts_an_instruct_model_in_turns(tiny, tmp_path):
    """--chat: the worked examples are earlier turns of the model's chat template, the question
    the last user turn (for both tasks); a folder keeps the choice, and one run without it is
    not resumed with it."""
    from pilm.commands.scaling import run_scale
    from pilm.errors import ResumeMismatchError
    from pilm.tasks import arithmetic_chain, gsm8k

    q = "1 + 2 - 3"
    chat = arithmetic_chain.target(tiny, q, chat=True)
    turns = arithmetic_chain.turns(q)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3 + ["user"] and turns[-1]["content"] == f"Question: {q}"
    assert turns[1]["content"] == arithmetic_chain.solution(arithmetic_chain.SHOTS[0])
    want = tiny.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert tiny.decode(chat.prompt_ids) == want and chat.prompt_ids != arithmetic_chain.target(tiny, q).prompt_ids
    asked = gsm8k.turns("How many?")
    assert [t["role"] for t in asked] == ["user", "assistant"] * len(gsm8k.SHOTS) + ["user"]
    assert asked[1]["content"] == gsm8k.SHOTS[0][1] and asked[-1]["content"] == "Question: How many?"
    assert gsm8k.target(tiny, "How many?", chat=True).prompt_ids[-3:] == chat.prompt_ids[-3:]  # the generation prompt
    cfg = ScaleConfig(methods=("greedy",), n=(1,), problems=2, chat=True)
    run_scale(cfg, tmp_path / "chat", model=tiny, progress=False)
    assert json.loads((tmp_path / "chat" / "run.json").read_text())["chat"] is True
    run_scale(dataclasses.replace(cfg, chat=False), tmp_path / "plain", model=tiny, progress=False)
    assert "chat" not in json.loads((tmp_path / "plain" / "run.json").read_text())  # as folders from before it
    with pytest.raises(ResumeMismatchError):
        run_scale(cfg, tmp_path / "plain", model=tiny, progress=False)



def test_scale_refuses_a_learned_prm_of_other_prompts_or_trained_on_its_problems(tiny, tmp_path):
    """A learned PRM reads the hidden states of the prompts it was trained on, and must not have
    seen the evaluation problems: both refused before anything runs, from its training.json."""
    from pilm.commands.scaling import run_scale
    from pilm.tasks import arithmetic_chain

    cfg = ScaleConfig(methods=("pf",), n=(2,), problems=2, prm="learned")
    prm = tmp_path / "prm"
    prm.mkdir()
    (prm / "training.json").write_text(json.dumps({"step_ends": 3}))  # from before train-prm had --chat: plain
    with pytest.raises(ValueError, match=r"trained on prompts without the chat template .* chat=False \(--no-chat\), "
                                         r"or train one with pilm train-prm --chat"):
        run_scale(dataclasses.replace(cfg, chat=True), tmp_path / "a", prm_path=str(prm), model=tiny)
    seen = arithmetic_chain.problems(2, cfg.operands, seed=cfg.seed)[1]["question"]
    (prm / "training.json").write_text(json.dumps({"chat": True, "questions": ["1 + 1", seen]}))
    with pytest.raises(ValueError, match="trained on prompts with the chat template"):
        run_scale(cfg, tmp_path / "b", prm_path=str(prm), model=tiny)
    with pytest.raises(ValueError, match=r"trained on 1 of the 2 evaluation problems \(e\.g\. '"):
        run_scale(dataclasses.replace(cfg, chat=True), tmp_path / "c", prm_path=str(prm), model=tiny)
    assert not (tmp_path / "c").exists()  # refused before the folder was made
    Twist.for_model(tiny, kind="linear", output="log_sigmoid").save_pretrained(prm)
    (prm / "training.json").write_text(json.dumps({"chat": True, "questions": ["1 + 1"]}))
    rows = run_scale(dataclasses.replace(cfg, chat=True), tmp_path / "d", prm_path=str(prm), model=tiny, progress=False)
    assert [r["prm_path"] for r in map(json.loads, rows.read_text().splitlines())] == [str(prm)] * 2


def test_scale_refuses_a_verifier_for_gsm8k_and_learned_without_a_path(tmp_path):
    from pilm.commands.cli import main

    assert main(["scale", "--prm", "learned", "--out", str(tmp_path / "x")]) == 2
    assert main(["scale", "--task", "gsm8k", "--prm", "verifier", "--problems", "1", "--out", str(tmp_path / "y")]) == 2
    assert main(["scale", "--n", "0", "--out", str(tmp_path / "z")]) == 2


SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from pilm.config import ScaleConfig
    from pilm.models import HFModel
    from pilm.models.registry import embedded_path
    from pilm.commands.scaling import run_scale
    tok = AutoTokenizer.from_pretrained(embedded_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = HFModel(LlamaForCausalLM(cfg).float(), tok, name="tiny-llama")
    cfg = ScaleConfig(methods=("sc", "pf"), n=(2,), problems=5, max_rows=4, temperature=1.0)  # blocks of 2 problems
    run_scale(cfg, sys.argv[1], model=model, progress=False)
""")


def test_scale_under_two_processes_shares_the_problems_and_draws_what_one_process_does(tmp_path):
    """Two processes take alternate blocks of problems and merge their rows; each block is the
    batch, and has the seed, it has in one process, so every chain is the one-process run's."""
    from tests.test_distributed import free_port

    (tmp_path / "run.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "run.py"), str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]
    alone = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "alone")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    runs = [{(r["method"], r["problem"]): r for r in map(json.loads, (tmp_path / d / "rows.jsonl").read_text().splitlines())}
            for d in ("out", "alone")]
    assert sorted(runs[0]) == sorted((m, i) for m in ("sc", "pf") for i in range(5)) == sorted(runs[1])
    same = ("predicted", "tokens", "log_z")
    assert all({k: runs[0][c][k] for k in same} == {k: runs[1][c][k] for k in same} for c in runs[0])
    assert len({runs[1][("pf", i)]["log_z"] for i in range(5)}) > 1  # the runs differ between problems
    assert not list((tmp_path / "out").glob("rows.part*"))


@pytest.mark.slow
def test_a_particle_filter_with_the_verifier_on_the_embedded_model(real_model):
    problems = chain.problems(2, seed=0)
    targets = [chain.target(real_model, p["question"]) for p in problems]
    res = pilm.particle_filter(targets, chain.step_verifier(), 4, temperature=0.8, seed=0)
    for r in res:
        assert len(r.samples) == 4 and all(r.steps) and r.info["tokens"] > 0
        assert all(s == pytest.approx(1.0) or s == pytest.approx(0.01) for chain_scores in r.scores for s in chain_scores)
        # a chain the verifier passes at every step states the right answer, or none yet
        for k in range(4):
            if r.scores[k][-1] == 1.0 and r.answers[k] is not None:
                assert r.answers[k] == str(chain.solve(r.info["question"]))


def test_a_judge_serving_two_runs_counts_each_runs_own_tokens(tiny):
    judge = LMJudge(tiny)
    target = chain.target(tiny, "3 + 4 - 6", max_new_tokens=8)
    first = pilm.best_of_n(target, judge, 2, seed=0)
    second = pilm.best_of_n(target, judge, 2, seed=0)
    assert first.info["prm_lm_tokens"] == second.info["prm_lm_tokens"] > 0


@pytest.mark.slow
def test_train_prm_then_scale_with_it_on_the_command_line(tmp_path, capsys):
    from pilm.commands.cli import main

    prm = tmp_path / "prm"
    assert main(["train-prm", "--problems", "2", "--rollouts", "2", "--steps", "3", "--out", str(prm)]) == 0
    assert (prm / "twist_config.json").exists() and json.loads((prm / "training.json").read_text())["step_ends"] > 0
    out = tmp_path / "scale"
    assert main(["scale", "--prm", "learned", "--prm-path", str(prm), "--methods", "pf,bon", "--n", "2", "--problems",
                 "2", "--out", str(out)]) == 0
    assert len((out / "rows.jsonl").read_text().splitlines()) == 4
    assert (out / "scale.png").exists() and "| bon (learned, 2) | pf (learned, 2) |" in (out / "table.md").read_text()
    assert "use: pilm scale --prm learned" in capsys.readouterr().out


def test_the_judge_cache_leg_runs_fewer_judge_positions_on_the_same_chains(tiny):
    from pilm.commands.bench_legs import judge_prompt_cache

    leg = judge_prompt_cache(tiny, n_problems=2, n_particles=2, repeats=1)
    assert 0 < leg["judge_positions_cache_over_none"] < 1


def test_the_judge_passes_the_prm_conformance_check_each_row_alone_from_an_empty_cache(sharp):
    from pilm.testing import check_prm

    target = chain.target(sharp, "1 + 1 + 3", max_new_tokens=16)
    chains = [sharp.encode(t) for t in ("1 + 1 = 2\n", "1 + 1 = 2\n2 + 3 = 5\n", "1 + 1 = 3\n3 + 3 = 6\nThe answer is 6.")]
    check_prm(LMJudge(sharp), target, chains)
