"""Beam search and diverse beam search against enumeration and independent scoring."""

import pytest
import torch

import pilm
from pilm.inference.search import beam_search
from pilm.learning.policy_trainer import sample_trajectories


@pytest.fixture
def small():
    model = pilm.models.TabularLM.random(5, seed=7, eos_id=4)
    return pilm.Target(model, prompt="a", max_new_tokens=3)


def test_a_wide_beam_returns_the_exact_top_sequences(small):
    """With at least as many beams as live prefixes (4^2 = 16 at depth 2), beam search is
    exhaustive: its k best equal the k most likely completions by enumeration."""
    e = pilm.exact.enumerate_target(small)
    best = sorted(zip(e.log_sigma_unnormalized.tolist(), map(tuple, e.tokens)), reverse=True)[:16]
    hyps = beam_search(small.model, small.prompt_ids, beams=16, max_new_tokens=3)
    assert [h.tokens for h in hyps] == [s for _, s in best]
    assert [h.log_p for h in hyps] == pytest.approx([v for v, _ in best], abs=1e-5)
    assert all(h.finished == (h.tokens[-1] == 4) for h in hyps)


def test_one_beam_is_greedy_decoding(small):
    greedy = sample_trajectories(small.model, small, 1, torch.Generator(), temperature=0.0)[0]
    (h,) = beam_search(small.model, small.prompt_ids, beams=1, max_new_tokens=3)
    assert list(h.tokens) == [t for t in greedy.tolist() if t >= 0]


def test_diverse_groups_start_differently_and_plain_groups_repeat(small):
    """Hamming diversity: with a large penalty each group's first token differs from those
    earlier groups chose; without it, every group is the same beam search."""
    diverse = beam_search(small.model, small.prompt_ids, beams=4, max_new_tokens=3, groups=4, diversity=50.0)
    assert len({h.tokens[0] for h in diverse}) == 4
    same = beam_search(small.model, small.prompt_ids, beams=4, max_new_tokens=3, groups=4, diversity=0.0)
    assert len({h.tokens for h in same}) == 1
    with pytest.raises(ValueError, match="multiple of groups"):
        beam_search(small.model, small.prompt_ids, beams=5, max_new_tokens=3, groups=2)


def test_beam_scores_with_the_reindexed_cache_equal_fresh_scoring(tiny):
    """On a transformers model the beams reorder the KV cache every step; each returned
    log p0 equals the sequence scored from scratch."""
    prompt = tiny.encode_prompt("Once upon")
    hyps = beam_search(tiny, prompt, beams=6, max_new_tokens=5, groups=3, diversity=1.0)
    fresh = tiny.log_prob(prompt, [list(h.tokens) for h in hyps])
    assert [h.log_p for h in hyps] == pytest.approx(fresh.tolist(), abs=1e-3)
