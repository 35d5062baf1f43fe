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


def test_joint_samples_are_exact_for_their_own_suffix(tiny):
    pairs = pilm.tasks.joint_samples(tiny, "Once upon", max_new_tokens=3, suffix_tokens=2, n=3, seed=0)
    assert len(pairs) == 3
    for middle, suffix in pairs:
        assert 1 <= len(middle) <= 3 and len(suffix) == 2
    again = pilm.tasks.joint_samples(tiny, "Once upon", max_new_tokens=3, suffix_tokens=2, n=3, seed=0)
    assert again == pairs
