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
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    def untimed(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert untimed(straight.history) == untimed(resumed.history) and len(resumed.history) == 4


def test_a_lora_body_takes_a_tied_head(fresh_tiny):
    target = pilm.Target(fresh_tiny, "Hello", max_new_tokens=2)
    trained = pilm.train_twist(target, "ctl", steps=1, batch_size=2, body="lora", head="tied", progress=False)
    assert trained.model.head._lm_embeddings is not None and math.isfinite(trained.history[-1]["loss"])


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
    trained = pilm.train_twist(target, "ctl", steps=2, batch_size=4, lr=1e-2, twist=twist, progress=False).model
    after = trained.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora" in k)
    trained.save_pretrained(tmp_path / "lt")
    back = pilm.twists.LoRATwist.from_pretrained(tmp_path / "lt", tiny)
    assert all(torch.equal(after[k], back.trainable_state()[k]) for k in after)


def test_conditional_twist_trains_across_suffixes(tiny):
    targets = [pilm.tasks.infilling(tiny, prompt="Once", suffix=c, max_new_tokens=3) for c in ([11, 12], [13, 14, 15])]
    trained = pilm.train_twist(targets, "ctl", steps=2, batch_size=4, lr=1e-3, head="linear", progress=False)
    twist = trained.model
    assert twist.config.conditional and len(trained.history) == 2
    # Step i draws for targets[i % 2]: its SIS log Z-hat is about log p0(suffix), and the random
    # tiny Llama is near uniform over its vocabulary (-log V = -10.8 a token; measured within
    # 0.15 of -21.6 and -32.4 over three seeds), so a step on the other suffix is 10.8 nats off.
    per_token = -math.log(tiny.vocab_size)
    assert [h["log_z"] for h in trained.history] == pytest.approx([2 * per_token, 3 * per_token], abs=1.0)
    # The head reads each target's own condition (its suffix), and training moved the weights
    # that read it.
    h = torch.randn(3, twist.config.hidden_size, generator=torch.Generator().manual_seed(0))
    a, b = (twist.log_psi(None, h, twist.condition_for(t)) for t in targets)
    assert (a - b).abs().max() > 1e-2
    init = pilm.train_twist(targets, "ctl", steps=0, batch_size=4, lr=1e-3, head="linear", progress=False).model
    reads_condition = slice(twist.config.hidden_size, None)
    assert not torch.equal(init.net[0].weight[:, reads_condition], twist.net[0].weight[:, reads_condition])
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


@pytest.mark.parametrize("kind,output", [("linear", "log"), ("mlp", "log_sigmoid"), ("tied", "log")])
def test_head_at_drawn_tokens_equals_the_full_head(tiny, kind, output):
    twist = Twist.for_model(tiny, kind=kind, layers=2, output=output, conditional=True)
    h, c = torch.randn(5, twist.config.hidden_size), torch.randn(twist.config.hidden_size)
    tokens = torch.tensor([0, 3, 7, tiny.vocab_size - 1, 3])
    full = twist.log_psi(None, h, c).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(twist.log_psi_at(None, h, tokens, c), full, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "tied"])
def test_base_init_starts_at_bootstrap_smc(target, tiny, kind):
    twist = Twist.for_model(tiny, kind=kind, init="base")
    assert twist.log_psi(None, torch.randn(3, twist.config.hidden_size)).abs().max() == 0
    a = pilm.smc(target, 8, twist=twist, ess_threshold=1.0, seed=2, progress=False)
    b = pilm.smc(target, 8, ess_threshold=1.0, seed=2, progress=False)
    assert a.tokens == b.tokens and abs(a.log_z - b.log_z) < 1e-5
    with pytest.raises(ValueError, match="init"):
        Twist.for_model(tiny, init="zeros")


def test_reuse_updates_on_cached_states_without_lm_forwards(target, tiny, monkeypatch):
    """reuse=R: R head updates per draw, and the LM runs only to draw (one forward per token)."""
    calls = []
    forward = type(tiny)._forward
    monkeypatch.setattr(type(tiny), "_forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    trained = pilm.train_twist(target, "ctl", steps=2, batch_size=4, reuse=5, head="tied", init="base", seed=1,
                               progress=False)
    per_draw = target.max_new_tokens + 1  # the prompt, then one step per token (the potential runs no LM here)
    assert len(calls) <= 2 * per_draw + 1  # + the hidden-size probe of Twist.for_model
    assert [h["updates"] for h in trained.history] == [5, 10]
    assert trained.history[-1]["lm_tokens"] >= trained.history[0]["lm_tokens"] > 0


@pytest.mark.parametrize("objective", ["ctl", "sixo", "fudge"])
def test_drawn_token_batches_give_the_same_loss_and_gradient(target, tiny, objective):
    from pilm.learning.objectives import get_objective
    from pilm.learning.twist_trainer import draw, twist_batch

    spec = get_objective(objective)
    twist = Twist.for_model(tiny, kind="mlp", layers=2, output=spec.twist_output)
    g = torch.Generator().manual_seed(0)
    drawn, _ = draw(target, twist, 6, g, keep_logprobs=False)
    base, _ = draw(target, None, 6, g, keep_logprobs=False)
    grads = []
    for every in (True, False):
        twist.zero_grad()
        loss = spec.loss(twist_batch(target, drawn, twist, all_tokens=every),
                         twist_batch(target, base, twist, all_tokens=every))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in twist.parameters()]))
    (la, ga), (lb, gb) = grads
    assert torch.allclose(la, lb, atol=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ga, gb))


def test_bench_times_one_head_update_on_cached_states(target, tiny):
    from pilm.commands.bench import _head_update_seconds

    twist = Twist.for_model(tiny, kind="tied", layers=2)
    before = [p.detach().clone() for p in twist.parameters()]
    assert _head_update_seconds(target, twist, batch_size=4, repeats=2) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, twist.parameters()))  # it did update


def test_calibration_reads_each_prefix_with_its_own_condition(tiny):
    """Batched over prefixes of different targets (left-padded, one condition per row), the
    twist values equal those of each prefix read alone."""
    twist = Twist.for_model(tiny, kind="mlp", layers=2, conditional=True)
    targets = [pilm.tasks.infilling(tiny, prompt="Once", suffix=c, max_new_tokens=3) for c in ([11, 12], [13, 14, 15])]
    pairs = [(targets[0], [5, 6, 7]), (targets[1], [8, 9, 10])]
    rows = pilm.evaluation.twist_calibration(pairs, twist, [1, 3], rollouts=2)["rows"]
    assert [(r["pair"], r["t"]) for r in rows] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    for r in rows:
        target, seq = pairs[r["pair"]]
        prefix = seq[: r["t"]]
        hidden = tiny.start(list(target.prompt_ids) + prefix[:-1], 1).hidden
        alone = twist.log_psi_at(None, hidden, torch.tensor([prefix[-1]]), twist.condition_for(target))
        assert abs(r["log_psi"] - float(alone[0])) < 1e-3


@pytest.mark.parametrize("kind", ["mlp", "tied"])
def test_sampling_reads_the_head_in_a_bfloat16_models_dtype_and_recasts_it_after_an_update(tiny, kind):
    """Without a gradient the head runs in the model's dtype (what a bfloat16 copy of it gives,
    exactly), with one gradient in float32; an optimizer step is seen by the next draw."""
    import copy

    from transformers import LlamaForCausalLM

    from pilm.models import HFModel

    torch.manual_seed(0)
    model = HFModel(LlamaForCausalLM(tiny.hf.config).to(torch.bfloat16), tiny.tokenizer, name="tiny-bf16")
    twist = Twist.for_model(model, kind=kind, layers=2)
    torch.nn.init.normal_(twist.net[-1].weight, std=0.3)  # Xavier on the output layer is too small to round
    hidden = model.start(model.encode("Hello there"), 3).hidden
    tokens = torch.tensor([5, 70, 900])

    def in_bfloat16():
        low = copy.deepcopy(twist).to(torch.bfloat16)
        out = low.net(hidden.bfloat16())
        if kind == "tied":
            out = out @ model.hf.get_output_embeddings().weight.T / twist.config.hidden_size**0.5 + low.token_bias
        return out.float()

    with torch.no_grad():
        sampled, at = twist.log_psi(None, hidden), twist.log_psi_at(None, hidden, tokens)
    assert twist._embeddings is None  # sampling made no float32 copy of the output embeddings (tied)
    assert twist.log_psi_at(None, hidden, tokens).requires_grad and twist._embeddings is None  # nor one token a row
    trained = twist.log_psi(None, hidden)  # a gradient is taken: float32
    assert kind == "mlp" or twist._embeddings.dtype == torch.float32
    assert sampled.dtype == trained.dtype == torch.float32 and trained.requires_grad
    assert torch.equal(sampled, in_bfloat16()) and not torch.equal(sampled, trained.detach())
    assert torch.allclose(sampled, trained.detach(), atol=0.05 * trained.abs().max().item())
    assert torch.equal(at, sampled.gather(-1, tokens[:, None]).squeeze(-1))  # the weights read what was proposed
    many = torch.randn(700, hidden.shape[-1], dtype=torch.bfloat16)  # more rows than one (rows, V) block
    picks = torch.randint(0, model.vocab_size, (700,))
    with torch.no_grad():
        assert torch.equal(twist.log_psi_at(None, many, picks), twist.log_psi(None, many).gather(-1, picks[:, None])[:, 0])
    optimizer = torch.optim.SGD(twist.parameters(), lr=1.0)
    trained.sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = twist.log_psi(None, hidden)
    assert not torch.equal(after, sampled) and torch.equal(after, in_bfloat16())


def test_a_float32_models_head_samples_in_float32(tiny):
    twist = Twist.for_model(tiny, kind="mlp", layers=2)
    hidden = tiny.start(tiny.encode("Hello"), 2).hidden
    with torch.no_grad():
        sampled = twist.log_psi(None, hidden)
    assert torch.equal(sampled, twist.log_psi(None, hidden).detach())


def test_a_head_built_under_inference_mode_samples_on_a_bfloat16_model(tiny):
    from transformers import LlamaForCausalLM

    from pilm.models import HFModel

    model = HFModel(LlamaForCausalLM(tiny.hf.config).to(torch.bfloat16), tiny.tokenizer, name="tiny-bf16")
    with torch.inference_mode():
        twist = Twist.for_model(model, kind="mlp", layers=2)  # parameters without version counters
        assert twist.log_psi(None, model.start(model.encode("Hi"), 2).hidden).shape == (2, model.vocab_size)
