"""The transformers backend: cached stepping, reindexing and batching equal plain forwards.

A tiny random Llama with the embedded model's real tokenizer keeps these fast.
"""

import pytest
import torch

import pilm
from pilm.models import HFModel


def full_logprobs(model, seq):
    with torch.no_grad():
        out = model.hf(torch.tensor([seq]), output_hidden_states=True)
    return torch.log_softmax(out.logits[0, -1].float(), -1), out.hidden_states[-1][0, -1]


def test_protocol(tiny):
    pilm.testing.check_language_model(tiny, tiny.encode("Hello world"))


def test_the_protocol_check_catches_a_reindex_that_ignores_row_order():
    class SortedRows(pilm.models.TabularLM):
        def reindex(self, state, idx):
            return super().reindex(state, idx.sort().values)  # the bug: rows come back in the wrong order

    good = pilm.models.TabularLM.random(5, seed=0)
    pilm.testing.check_language_model(good)
    bad = SortedRows(good.next_logprobs, 5, None)
    with pytest.raises(AssertionError, match="reindexed row 0 is not row 1"):
        pilm.testing.check_language_model(bad)


def test_the_protocol_check_catches_a_model_that_ignores_hold():
    class NoHold(pilm.models.TabularLM):
        def advance(self, state, tokens, hold=None):
            return super().advance(state, tokens)  # the bug: held rows append their token anyway

    good = pilm.models.TabularLM.random(5, seed=0)
    with pytest.raises(AssertionError, match="a held row must keep its state"):
        pilm.testing.check_language_model(NoHold(good.next_logprobs, 5, None))


def test_cached_steps_equal_full_forward(tiny):
    prompt = tiny.encode("The movie was")
    state = tiny.start(prompt, 3)
    seqs = [list(prompt) for _ in range(3)]
    for step in range(4):
        for i in range(3):
            lp, h = full_logprobs(tiny, seqs[i])
            assert torch.allclose(state.logprobs[i], lp, atol=1e-5)
            assert torch.allclose(state.hidden[i], h, atol=1e-5)
        tokens = torch.tensor([100 + step, 2000 + 7 * step, 31 * step + 5])
        state = tiny.advance(state, tokens)
        for i in range(3):
            seqs[i].append(int(tokens[i]))


def test_reindexed_cache_equals_recomputed_prefixes(tiny):
    prompt = tiny.encode("Once upon")
    state = tiny.start(prompt, 3)
    seqs = [list(prompt) for _ in range(3)]
    for step in range(3):
        tokens = torch.tensor([10 + step, 500 + step, 9000 + step])
        state = tiny.advance(state, tokens)
        for i in range(3):
            seqs[i].append(int(tokens[i]))
    idx = torch.tensor([2, 0, 0, 1])
    state = tiny.advance(tiny.reindex(state, idx), torch.tensor([1, 2, 3, 4]))
    for row, (src, tok) in enumerate(zip(idx.tolist(), [1, 2, 3, 4])):
        lp, h = full_logprobs(tiny, seqs[src] + [tok])
        assert torch.allclose(state.logprobs[row], lp, atol=1e-5)
        assert torch.allclose(state.hidden[row], h, atol=1e-5)


def test_batched_scoring_equals_one_by_one(tiny):
    comps = [tiny.encode(" a short one"), tiny.encode(" and a rather longer completion here"), [], [tiny.eos_token_id]]
    batch = tiny.log_prob("The movie was", comps)
    alone = torch.cat([tiny.log_prob("The movie was", [c]) for c in comps])
    assert torch.allclose(batch, alone, atol=1e-4)
    assert batch[2] == 0.0


def test_scoring_with_a_shared_prompt_cache_equals_plain_forwards(tiny):
    """``score`` runs the prefix the rows share once; the sums must equal uncached forwards."""
    prompt = tiny.encode("The movie was")
    seqs = [prompt + tiny.encode(" fine"), prompt + tiny.encode(" not good at all"), prompt[:2] + [7, 8]]
    starts = [len(prompt), len(prompt), 2]
    got = tiny.score(seqs, starts)
    for seq, start, value in zip(seqs, starts, got):
        ctx = tiny.context(seq[:start])
        full = ctx + seq[start:]
        expected = sum(float(full_logprobs(tiny, full[:t])[0][full[t]]) for t in range(len(ctx), len(full)))
        assert value == pytest.approx(expected, abs=1e-4)


def test_suffix_likelihood_batched_equals_alone(tiny):
    potential = pilm.potentials.SuffixLikelihood(tiny, " and they lived happily")
    pilm.testing.check_potential(potential, tiny, "Once upon a time", [(), (11,), (11, 12, 13), (tiny.eos_token_id,)])


def test_smc_on_transformers_model_is_seeded(tiny):
    target = pilm.Target(tiny, "Hi", pilm.potentials.Regex(r"[^0-9]*"), max_new_tokens=5)
    a = pilm.smc(target, 8, ess_threshold=1.0, seed=3, progress=False)
    b = pilm.smc(target, 8, ess_threshold=1.0, seed=3, progress=False)
    assert a.tokens == b.tokens and a.log_z == b.log_z and len(a.resampled_at) >= 1
    assert all(not any(ch.isdigit() for ch in s) for s in a.samples)


def test_importance_sampling_on_transformers_model_matches_exact_log_z(tiny):
    """T = 1 is enumerable over the whole 49k vocabulary: mean Z-hat/Z within 3 SE of 1
    (false alarm < 0.3%), with se < 0.033 so that a 10% bias lies beyond 3 SE. Z = 0.68 and
    Z-hat is a binomial share at N = 16: sd(Z-hat/Z) = sqrt((1 - Z) / (16 Z)) = 0.17, so 100
    seeds give se 0.017 (measured 0.012 over 200), where a 10% bias is ~6 SE away."""
    target = pilm.Target(tiny, "Hi", pilm.potentials.Regex(r"[a-z ]*"), max_new_tokens=1)
    z = torch.exp(torch.tensor(pilm.exact.log_z(target), dtype=torch.float64))
    r = torch.tensor([pilm.importance_sample(target, 16, seed=s, on_extinction="return").log_z for s in range(100)],
                     dtype=torch.float64).exp() / z
    se = float(r.std()) / 100**0.5
    assert se < 0.033, f"too few runs to detect a 10% bias: se={se:.4f}"
    assert abs(float(r.mean()) - 1) < 3 * se, (float(r.mean()), se)


def test_empty_prompt_uses_bos_and_fails_clearly_without_one(tiny):
    assert pilm.Target(tiny, "", max_new_tokens=2).model.context([]) == [tiny.bos_token_id]
    no_bos = HFModel(tiny.hf, tiny.tokenizer, name="no-bos")
    no_bos.bos_token_id = None
    with pytest.raises(pilm.EmptyPromptError, match="no BOS token"):
        pilm.Target(no_bos, "", max_new_tokens=2)


def test_chat_prompt_uses_template(tiny):
    ids = tiny.encode_prompt("Hello", chat=True)
    text = tiny.decode(ids)
    assert "Hello" in text and text != "Hello"


def test_teacher_forced_prefix_logprobs_equal_cached_stepping(tiny):
    """One forward over a shared prompt cache = stepping token by token (the generic path)."""
    from pilm.models.base import LanguageModel

    prompt = tiny.encode_prompt("Once upon")
    tokens = torch.tensor([[11, 12, 13], [500, 501, -1]])
    fast = tiny.prefix_logprobs(prompt, tokens)
    slow = LanguageModel.prefix_logprobs(tiny, prompt, tokens)
    assert fast.shape == (2, 4, tiny.vocab_size)
    assert torch.allclose(fast[0], slow[0], atol=1e-5) and torch.allclose(fast[1, :3], slow[1, :3], atol=1e-5)
