"""Twist heads on a transformers model: persistence, compatibility, resume."""

import math

import pytest
import torch

import pilm
from pilm.twists import Twist


@pytest.fixture
def target(tiny):
    return pilm.Target(tiny, "Hi", pilm.potentials.Sentiment("positive", prefix=False) ** 4, max_new_tokens=4)


def test_head_shapes_and_init(tiny):
    twist = Twist.for_model(tiny, kind="mlp", layers=3)
    state = tiny.start(tiny.encode("Hello"), 2)
    out = twist.log_psi(None, state.hidden)
    assert out.shape == (2, tiny.vocab_size)
    assert all(m.bias.abs().max().item() == 0 for m in twist.net if isinstance(m, torch.nn.Linear))
    linear = Twist.for_model(tiny, kind="linear", output="log_sigmoid")
    assert (linear.log_psi(None, state.hidden) <= 0).all()


def test_zero_head_equals_bootstrap_smc(target, tiny):
    twist = Twist.for_model(tiny, kind="linear")
    torch.nn.init.zeros_(twist.net[-1].weight)
    a = pilm.smc(target, 8, twist=twist, ess_threshold=1.0, seed=2, progress=False)
    b = pilm.smc(target, 8, ess_threshold=1.0, seed=2, progress=False)
    assert a.tokens == b.tokens and abs(a.log_z - b.log_z) < 1e-5


def test_save_and_load_roundtrip_and_refuse_other_models(tmp_path, tiny):
    twist = Twist.for_model(tiny, kind="mlp", layers=2, conditional=False)
    twist.save_pretrained(tmp_path / "tw")
    back = Twist.from_pretrained(tmp_path / "tw", tiny)
    h = torch.randn(3, twist.config.hidden_size)
    assert torch.equal(twist.log_psi(None, h), back.log_psi(None, h))
    other = pilm.models.TabularLM.random(4, seed=0, eos_id=3)
    with pytest.raises(ValueError, match="does not fit"):
        Twist.from_pretrained(tmp_path / "tw", other)
    with pytest.raises(FileNotFoundError, match="no saved twist"):
        Twist.from_pretrained(tmp_path / "nothing", tiny)


def test_conditional_twist_needs_a_suffix(tiny):
    infill = pilm.Target(tiny, "Once", pilm.potentials.SuffixLikelihood(tiny, " the end"), max_new_tokens=3)
    twist = Twist.for_model(tiny, kind="linear", conditional=True)
    res = pilm.smc(infill, 4, twist=twist, seed=0, progress=False)
    assert len(res.samples) == 4 and twist.condition_for(infill).shape == (twist.config.hidden_size,)
    with pytest.raises(ValueError, match="suffix"):
        twist.condition_for(pilm.Target(tiny, "Once", None, max_new_tokens=3))


@pytest.mark.parametrize("objective", ["ctl", "rl", "sixo", "fudge", "dpg"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, target, objective):
    kw = dict(batch_size=4, lr=1e-3, seed=5, head="linear", checkpoint_every=2, progress=False)
    straight = pilm.train_twist(target, objective, steps=4, checkpoint_dir=tmp_path / "a", **kw)
    pilm.train_twist(target, objective, steps=2, checkpoint_dir=tmp_path / "b", **kw)  # "interrupted" after 2
    resumed = pilm.train_twist(target, objective, steps=4, checkpoint_dir=tmp_path / "b", **kw)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    def untimed(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert untimed(straight.history) == untimed(resumed.history) and len(resumed.history) == 4


def test_a_lora_body_takes_a_tied_head(fresh_tiny):
    target = pilm.Target(fresh_tiny, "Hello", max_new_tokens=2)
    twist = pilm.train_twist(target, "ctl", steps=1, batch_size=2, body="lora", head="tied", progress=False)
    assert twist.head._embeddings is not None and math.isfinite(twist.history[-1]["loss"])


def test_lora_body_twist_steps_in_lock_step_and_trains(tmp_path, target, tiny):
    twist = pilm.twists.LoRATwist(tiny, rank=2, kind="linear")
    # Stepped sampling and the teacher-forced training path see the same hidden states.
    res = pilm.smc(target, 4, twist=twist, ess_threshold=1.0, seed=0, progress=False)
    assert len(res.samples) == 4
    g = torch.Generator().manual_seed(0)
    batch, _ = pilm.learning.sample_batch(target, twist, twist, 3, g, keep_logprobs=False)
    stepped = []
    trace_twist = pilm.twists.LoRATwist(tiny, rank=2, kind="linear")
    trace_twist.load_state_dict(twist.state_dict())
    tokens = batch.tokens
    trace_twist.begin([target], 3)
    for t in range(tokens.shape[1]):
        stepped.append(trace_twist.log_psi(None, None))
        trace_twist.advance(tokens[:, t].clamp(min=0))
    stepped = torch.stack(stepped, 1)
    assert torch.allclose(stepped[batch.mask], batch.log_psi_all[batch.mask].detach(), atol=1e-4)
    # Training moves only the adapters and the head; save/load round-trips them.
    before = {k: v.clone() for k, v in twist.trainable_state().items()}
    trained = pilm.train_twist(target, "ctl", steps=2, batch_size=4, lr=1e-2, twist=twist, progress=False)
    after = trained.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora" in k)
    trained.save_pretrained(tmp_path / "lt")
    back = pilm.twists.LoRATwist.from_pretrained(tmp_path / "lt", tiny)
    assert all(torch.equal(after[k], back.trainable_state()[k]) for k in after)


def test_conditional_twist_trains_across_suffixes(tiny):
    targets = [pilm.tasks.infilling(tiny, prompt="Once", suffix=c, max_new_tokens=3) for c in ([11, 12], [13, 14, 15])]
    twist = pilm.train_twist(targets, "ctl", steps=2, batch_size=4, lr=1e-3, head="linear", progress=False)
    assert twist.config.conditional and len(twist.history) == 2
    with pytest.raises(ValueError, match="sharing one model"):
        pilm.train_twist([targets[0], pilm.Target(pilm.models.TabularLM.random(3, eos_id=2), "a")], steps=1,
                         progress=False)


def test_tied_head_scores_against_output_embeddings(tmp_path, tiny):
    twist = Twist.for_model(tiny, kind="tied", layers=2)
    state = tiny.start(tiny.encode("Hello"), 2)
    out = twist.log_psi(None, state.hidden)
    emb = tiny.hf.get_output_embeddings().weight.detach()
    expected = twist.net(state.hidden) @ emb.T / twist.config.hidden_size**0.5 + twist.token_bias
    assert out.shape == (2, tiny.vocab_size) and torch.allclose(out, expected, atol=1e-5)
    twist.save_pretrained(tmp_path / "t")
    assert torch.allclose(Twist.from_pretrained(tmp_path / "t", tiny).log_psi(None, state.hidden), out)
    with pytest.raises(ValueError, match="attached"):
        Twist.from_pretrained(tmp_path / "t").log_psi(None, state.hidden)
    with pytest.raises(ValueError, match="output embeddings"):
        Twist.for_model(pilm.models.TabularLM.random(4, eos_id=3), kind="tied")
