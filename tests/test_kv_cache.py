"""The decode cache (``pilm.models.kv_cache``): rows that share their prompt's keys and values
compute what each row's own full forward computes, through holds, resampling that mixes
prompts, and buffer growth; the prompt is held once; a step copies nothing it does not add."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from pilm.models import HFModel, kv_cache


def full_logprobs(model, seq):
    with torch.no_grad():
        return torch.log_softmax(model.hf(torch.tensor([seq])).logits[0, -1].float(), -1)


@pytest.fixture(scope="module")
def pair(tiny):
    """The session's tiny Llama (shared prefixes) and the same weights under eager attention,
    which keeps the per-row ``DynamicCache``."""
    hf = LlamaForCausalLM(copy.deepcopy(tiny.hf.config)).float()
    hf.load_state_dict(tiny.hf.state_dict())
    hf.set_attn_implementation("eager")
    eager = HFModel(hf, tiny.tokenizer, name="tiny-eager")
    assert tiny.shares_prefixes and not eager.shares_prefixes
    return tiny, eager


@pytest.mark.parametrize("which", ["shared", "dynamic"])
def test_rows_equal_their_own_full_forward_through_holds_resampling_and_growth(pair, which, monkeypatch):
    """Two prompts of different lengths (left padding), 3 rows each; every step some rows wait
    and a resampling keeps, duplicates and drops rows across the two prompts (so rows of one
    prompt are not contiguous); chunks of 2 positions make the buffers grow four times.
    Tolerance 1e-5: float32 rounding of the same sums in another order."""
    monkeypatch.setattr(kv_cache, "CHUNK", 2)
    model = pair[0] if which == "shared" else pair[1]
    prompts = [model.encode("The old lighthouse keeper"), model.encode("Once")]
    state = model.start_many(prompts, 3)
    seqs = [list(prompts[i // 3]) for i in range(6)]
    g = torch.Generator().manual_seed(0)
    for step in range(9):
        for i, seq in enumerate(seqs):
            assert torch.allclose(state.logprobs[i], full_logprobs(model, seq), atol=1e-5), (step, i)
        if step % 3 == 2:
            idx = torch.randint(0, len(seqs), (len(seqs) - (step == 5),), generator=g)
            state, seqs = model.reindex(state, idx), [list(seqs[j]) for j in idx.tolist()]
        tokens = torch.randint(10, 5000, (len(seqs),), generator=g)
        hold = torch.rand(len(seqs), generator=g) < 0.3
        state = model.advance(state, tokens, hold)
        for seq, t, h in zip(seqs, tokens.tolist(), hold.tolist(), strict=True):
            if not h:
                seq.append(t)


def test_a_step_writes_in_place_and_resampling_gathers_only_the_rows_own_positions(tiny, monkeypatch):
    """No whole-cache copy per step: the buffers keep their storage until a chunk fills; the
    prompt's keys are never copied, not even by a resampling."""
    monkeypatch.setattr(kv_cache, "CHUNK", 4)
    state = tiny.start(tiny.encode("The movie was"), 3)
    cache = state.cache
    prompt_keys = cache.prefix[0][0].data_ptr()
    state = tiny.advance(state, torch.tensor([5, 6, 7]))
    first = cache.keys[0].data_ptr()
    for t in range(3):
        state = tiny.advance(state, torch.tensor([8, 9, 10 + t]))
        assert cache.keys[0].data_ptr() == first
    state = tiny.advance(state, torch.tensor([1, 2, 3]))  # the fifth position: a new chunk
    assert cache.keys[0].data_ptr() != first
    state = tiny.reindex(state, torch.tensor([2, 2, 0]))
    assert cache.prefix[0][0].data_ptr() == prompt_keys and cache.prefix[0][0].shape[0] == 1


@pytest.mark.parametrize("which, ratio", [("shared", 1.0), ("dynamic", 2.5)])
def test_the_long_prompt_leg_holds_the_prompt_once(pair, which, ratio):
    """Shared: one prompt (8 positions) plus 4 particles' own 2 tokens, over that: exactly 1.
    A per-row cache holds a prompt copy per particle: 4 x (8 + 2) / 16 = 2.5."""
    from pilm.commands.bench_legs import long_prompt

    model = pair[0] if which == "shared" else pair[1]
    leg = long_prompt(model, prompt_tokens=8, n_particles=4, new_tokens=2)
    assert leg["long_prompt_cache_over_shared"] == pytest.approx(ratio)


def test_forwards_outside_a_decode_step_are_sdpa(pair):
    """The cascade implementation is sdpa itself for scoring and teacher forcing."""
    shared, eager = pair
    comps = [shared.encode(" a short one"), shared.encode(" and longer")]
    assert torch.allclose(shared.log_prob("The movie was", comps), eager.log_prob("The movie was", comps), atol=1e-5)
