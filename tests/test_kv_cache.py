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


def tiny_of(tiny, model_type: str, **overrides) -> HFModel:
    """A tiny random model of ``model_type`` with the session's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny.hf.config
    config = AutoConfig.for_model(model_type, vocab_size=cfg.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, **overrides)
    torch.manual_seed(0)
    return HFModel(AutoModelForCausalLM.from_config(config).float(), tiny.tokenizer, name=f"tiny-{model_type}")


def decode_against_full_forwards(model, prompts, hold_rate: float, steps: int = 9) -> None:
    """3 rows a prompt; each step rows wait with probability ``hold_rate``; every third step a
    resampling keeps, duplicates and drops rows across the prompts (so rows of one prompt are
    not contiguous). Every row's next-token log-probs must equal its own full forward, to
    1e-5: float32 rounding of the same sums in another order."""
    state = model.start_many(prompts, 3)
    seqs = [list(prompts[i // 3]) for i in range(3 * len(prompts))]
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for i, seq in enumerate(seqs):
            assert torch.allclose(state.logprobs[i], full_logprobs(model, seq), atol=1e-5), (step, i)
        if step % 3 == 2:
            idx = torch.randint(0, len(seqs), (len(seqs) - (step == 5),), generator=g)
            state, seqs = model.reindex(state, idx), [list(seqs[j]) for j in idx.tolist()]
        tokens = torch.randint(10, 5000, (len(seqs),), generator=g)
        hold = torch.rand(len(seqs), generator=g) < hold_rate
        state = model.advance(state, tokens, hold if hold_rate else None)
        for seq, t, h in zip(seqs, tokens.tolist(), hold.tolist(), strict=True):
            if not h or not hold_rate:
                seq.append(t)


@pytest.mark.parametrize("which", ["shared", "dynamic"])
@pytest.mark.parametrize("hold_rate", [0.0, 0.3])
def test_rows_equal_their_own_full_forward_through_holds_resampling_and_growth(pair, which, hold_rate, monkeypatch):
    """Two prompts of different lengths (left padding, a prompt bias), with and without rows
    that wait; first buffers of 2 positions make them double three times."""
    monkeypatch.setattr(kv_cache, "CHUNK", 2)
    model = pair[0] if which == "shared" else pair[1]
    decode_against_full_forwards(model, [model.encode("The old lighthouse keeper"), model.encode("Once")], hold_rate)


def test_prompts_of_one_length_share_without_padding(tiny):
    """Three different prompts of equal length: no prompt bias, a layout of three blocks."""
    prompts = [tiny.encode(w) for w in (" red", " green", " blue")]
    assert len({len(p) for p in prompts}) == 1 and len({tuple(p) for p in prompts}) == 3
    decode_against_full_forwards(tiny, prompts, hold_rate=0.0)


@pytest.mark.parametrize("model_type, overrides, shares", [
    ("qwen2", {}, True), ("qwen3", {"head_dim": 8}, True), ("mistral", {"sliding_window": None}, True),
    ("mistral", {}, False),  # its default 4,096-token window: a copy per row
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4}, False),
    ("opt", None, False),  # its decoder reads more of the cache than update: a copy per row
])
def test_each_architecture_shares_exactly_or_keeps_a_copy_per_row(tiny, model_type, overrides, shares):
    model = _tiny_opt(tiny) if overrides is None else tiny_of(tiny, model_type, **overrides)
    assert model.shares_prefixes == shares
    decode_against_full_forwards(model, [model.encode("The old lighthouse keeper"), model.encode("Once")], 0.3, steps=6)


def _tiny_opt(tiny) -> HFModel:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = tiny.hf.config
    config = OPTConfig(vocab_size=cfg.vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=32, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                       pad_token_id=cfg.eos_token_id)
    torch.manual_seed(0)
    return HFModel(OPTForCausalLM(config).float(), tiny.tokenizer, name="tiny-opt")


@pytest.mark.parametrize("hold", [None, [True, False]])
def test_switching_the_attention_after_the_prompt_is_an_error_not_a_wrong_number(fresh_tiny, hold):
    """With held rows the switched attention gets fewer queries than keys and fails inside the
    forward: the error still says what happened."""
    state = fresh_tiny.start(fresh_tiny.encode("The movie was"), 2)
    fresh_tiny.hf.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attention implementation changed after the prompt"):
        fresh_tiny.advance(state, torch.tensor([5, 6]), None if hold is None else torch.tensor(hold))


def test_a_policy_and_a_twist_body_keep_the_base_models_choice(fresh_tiny):
    from pilm.models import LoRAPolicy

    fresh_tiny.kv_cache = "per-row"
    assert LoRAPolicy(fresh_tiny).kv_cache == "per-row"


def test_a_step_writes_in_place_and_resampling_gathers_only_the_rows_own_positions(tiny, monkeypatch):
    """No whole-cache copy per step: the buffers keep their storage until they fill; the
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
    state = tiny.advance(state, torch.tensor([1, 2, 3]))  # the fifth position: the buffers double
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


def test_max_rows_counts_a_shared_prompt_once(pair, monkeypatch):
    """Rows that share the prompt's cache cost its positions once per prompt (plus their own
    positions in doubling buffers): a 512-position prompt with 64 particles fits more rows than
    a copy per row would (here the V-wide tensors of the tiny model dominate a row), exactly
    what the arithmetic says; a cache per row ignores the prompt's sharing."""
    from pilm.models import hf

    shared, eager = pair
    monkeypatch.setattr(hf, "free_memory", lambda device: 2**30)
    cfg = shared.hf.config
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    rest = 8 * shared.vocab_size * 4 + 16 * cfg.hidden_size * 4
    assert eager.max_rows(577, prompt=512, per_prompt=64) == eager.max_rows(577) == 2**29 // (577 * per_position + rest)
    assert shared.max_rows(577, prompt=512, per_prompt=64) == int(2**29 // ((512 / 64 + 128) * per_position + rest))
    assert shared.max_rows(577, prompt=512, per_prompt=64) > eager.max_rows(577)


def test_held_rows_are_left_out_of_the_forward_and_resume_exactly(tiny, monkeypatch):
    """A step's forward runs the rows that append only (its cost follows them); a step where
    every row waits runs none; a held row keeps its log-probs and hidden state exactly, its
    cache column stays zeros (never uninitialised memory, whose NaN a masked weight of 0 would
    still spread) through buffer growth, and each row's log-probs stay its own full forward's."""
    monkeypatch.setattr(kv_cache, "CHUNK", 2)  # the buffers double during held steps
    prompt = tiny.encode("The movie was")
    state = tiny.start(prompt, 4)
    cache, seqs = state.cache, [list(prompt) for _ in range(4)]
    ran: list[int] = []  # the rows of every forward of the model
    steps: list[list[int]] = []  # those of each step's
    hook = tiny.hf.get_input_embeddings().register_forward_hook(lambda _, args, out: ran.append(args[0].shape[0]))
    try:
        for tokens, hold in (([5, 6, 7, 8], [False, True, False, True]), ([9, 10, 11, 12], [True] * 4),
                             ([13, 14, 15, 16], [True, False, False, True]), ([17, 18, 19, 20], None)):
            before, start = (state.logprobs.clone(), state.hidden.clone()), len(ran)
            state = tiny.advance(state, torch.tensor(tokens), None if hold is None else torch.tensor(hold))
            steps.append(ran[start:])
            for i, (seq, t, h) in enumerate(zip(seqs, tokens, hold or [False] * 4, strict=True)):
                if h:
                    assert torch.equal(state.logprobs[i], before[0][i]) and torch.equal(state.hidden[i], before[1][i])
                    assert all(not bool(b[i, :, cache.used - 1].any()) for b in (*cache.keys, *cache.values)), i
                else:
                    seq.append(t)
                assert torch.allclose(state.logprobs[i], full_logprobs(tiny, seq), atol=1e-5), (tokens, i)
    finally:
        hook.remove()
    assert steps == [[2], [], [2], [4]]
