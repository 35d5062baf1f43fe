"""The one training loop (``pilm.learning.fit``), what trainers return (``Trained``) and how
they take their config dataclass (``config=``)."""

import json
import math

import pytest
import torch

import pilm
from pilm.config import FinetuneConfig, TwistTrainingConfig
from pilm.errors import ResumeMismatchError
from pilm.learning import Checkpointing, Trained, fit
from pilm.potentials import FunctionPotential


@pytest.fixture
def soft_target():
    model = pilm.models.TabularLM.random(4, seed=3, eos_id=3)
    potential = FunctionPotential(lambda t: 0.8 * t.count(0) - 0.5 * t.count(1), on="tokens", name="soft")
    return pilm.Target(model, prompt="a", potential=potential, max_new_tokens=3)


def quadratic_run(tmp_path, steps, *, warmup=0, grad_clip=None, every=2):
    """Fit w to noisy targets drawn from the run's generator (so resuming must restore it)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)

    def step(i, update):
        y = 2.0 + 0.1 * torch.randn((), generator=generator)
        loss = (module.weight.sum() - y) ** 2
        update(loss)
        return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}

    history = fit(module, optimizer, step, steps=steps, name="quadratic", grad_clip=grad_clip, generator=generator,
                  warmup=warmup, checkpoint=Checkpointing(tmp_path / "ckpt", {"run": "quadratic"}, every),
                  log_path=tmp_path / "log.jsonl", log_tag={"objective": "l2"}, progress=False)
    return module, history


def test_fit_warms_up_logs_each_step_and_resumes_bit_identically(tmp_path):
    whole, history = quadratic_run(tmp_path / "a", 6, warmup=4)
    assert [h["lr"] for h in history] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert [h["step"] for h in history] == list(range(1, 7)) and history[-1]["loss"] < history[0]["loss"]
    lines = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7)) and all(x["objective"] == "l2" for x in lines)
    quadratic_run(tmp_path / "b", 4, warmup=4)  # "interrupted" after 4, checkpointed at 4
    resumed, again = quadratic_run(tmp_path / "b", 6, warmup=4)
    assert torch.equal(whole.weight, resumed.weight)
    assert [h["loss"] for h in again] == [h["loss"] for h in history]
    # the log holds the run's steps once each, the resumed ones included
    assert [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_fit_clips_the_gradient_norm(tmp_path):
    """A loss with a gradient of norm 40 at w = 0 moves w by lr x 40 unclipped, lr x 1 clipped."""
    for clip, moved in ((None, 4.0), (1.0, 0.1)):
        module = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(module.weight)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        fit(module, optimizer, lambda i, update, w=module.weight: update((w.sum() - 20.0) ** 2) or {}, steps=1,
            name="x", grad_clip=clip, progress=False)
        assert float(module.weight.detach()) == pytest.approx(moved, rel=1e-5)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    module = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)

    def run(key):
        return fit(module, optimizer, lambda i, update: update(module.weight.sum() ** 2) or {}, steps=2, name="x",
                   grad_clip=None, generator=generator, checkpoint=Checkpointing(tmp_path, key, 1), progress=False)

    run({"lr": 0.1})
    with pytest.raises(ResumeMismatchError, match="lr"):
        run({"lr": 0.2})


def test_a_trainer_takes_its_config_and_keyword_overrides(soft_target):
    cfg = TwistTrainingConfig(steps=3, batch_size=4, head="linear", lr=0.5)
    trained = pilm.train_twist(soft_target, config=cfg, lr=0.01, progress=False)
    assert isinstance(trained, Trained) and len(trained.history) == 3  # steps and batch size from the config
    same = pilm.train_twist(soft_target, steps=3, batch_size=4, head="linear", lr=0.01, progress=False)
    assert [h["loss"] for h in trained.history] == [h["loss"] for h in same.history]  # lr=0.01 overrode 0.5
    assert "config" in str(pilm.train_twist.__doc__) and "config" in str(pilm.finetune.__wrapped__.__doc__)
    with pytest.raises(TypeError, match="config must be a TwistTrainingConfig"):
        pilm.train_twist(soft_target, config=FinetuneConfig(), progress=False)


def test_a_trained_result_is_not_its_model_and_says_so(soft_target):
    trained = pilm.train_twist(soft_target, steps=1, batch_size=2, progress=False)
    assert "history=1 step," in repr(trained)
    with pytest.raises(AttributeError, match=r"the trained object is its \.model"):
        pilm.smc(soft_target, 4, twist=trained, progress=False)
    assert math.isfinite(pilm.smc(soft_target, 4, twist=trained.model, progress=False).log_z)
