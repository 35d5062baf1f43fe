"""Every verb with the model on an accelerator, checked without one: inside
``pilm.testing.fake_accelerator()`` the model lives on ``fakegpu``, which computes on the CPU
but is not the CPU, and any op that mixes a device tensor with a CPU tensor, or draws on one
device with a generator on another, fails (see the module's docstring). A verb passes when it
runs, gives finite results, and (for sampling) gives exactly what the same run gives on the
CPU: the fake device computes the same ops on the same numbers, so any difference is a verb
that takes another path on an accelerator."""

import json
import math

import pytest
import torch

import pilm
from pilm.learning.objectives import FINETUNE_OBJECTIVES, OBJECTIVES
from pilm.potentials import FunctionPotential
from pilm.testing.fake_device import DeviceMixError, fake_accelerator

PROMPTS = ("The cat", "Once upon a time there")
SOFT = FunctionPotential(lambda t: -0.5 * t.count("e"), name="fewer e", prefix_fn=lambda t: -0.2 * t.count("e"))
BOUNDED = FunctionPotential(lambda t: -0.1 * t.count("e"), name="fewer e, phi <= 1")


@pytest.fixture
def device_model(tiny):
    """The session's tiny Llama (real tokenizer), made as ``fresh_tiny`` makes its CPU copy, on the fake device."""
    from transformers import LlamaForCausalLM

    from pilm.models import HFModel

    with fake_accelerator() as acc:
        torch.manual_seed(0)
        model = HFModel(LlamaForCausalLM(tiny.hf.config).float().to("fakegpu"), tiny.tokenizer, name="tiny@fakegpu")
        yield model, acc


def targets(model, potential=SOFT, horizon=5):
    return [pilm.Target(model, p, potential, max_new_tokens=horizon) for p in PROMPTS]


def test_the_fake_device_catches_a_cpu_tensor_and_a_cpu_generator():
    with fake_accelerator():
        x = torch.ones(3, device="fakegpu")
        with pytest.raises(DeviceMixError, match="CPU tensor"):
            _ = x + torch.ones(3)
        with pytest.raises(DeviceMixError, match="generator on cpu"):
            torch.multinomial(x, 1, generator=torch.Generator().manual_seed(0))
        assert torch.multinomial(x, 1, generator=torch.Generator("fakegpu").manual_seed(0)).device == x.device
        _ = x + torch.tensor(2.0)  # a 0-dim CPU scalar is fine, as on CUDA
        with pytest.raises((RuntimeError, TypeError)):
            x.numpy()


def test_smc_and_the_particle_filter_give_on_the_device_what_they_give_on_the_cpu(device_model, fresh_tiny):
    model, acc = device_model
    on_device = [r.log_z for r in pilm.smc(targets(model), 8, seed=0, progress=False)]
    on_cpu = [r.log_z for r in pilm.smc(targets(fresh_tiny), 8, seed=0, progress=False)]
    assert on_device == on_cpu
    cut = pilm.Steps(delimiter=model.encode(" e")[0], max_steps=2, max_step_tokens=3)
    chains = [pilm.Target(model, p, SOFT, max_new_tokens=6, steps=cut) for p in PROMPTS]
    res = pilm.particle_filter(chains, None, 4, weights="twisted", seed=0)
    assert all(math.isfinite(r.log_z) for r in res)


def test_masked_and_twisted_smc_on_the_device(device_model):
    model, _ = device_model
    from pilm.potentials import Regex

    masked = [pilm.Target(model, p, Regex(r"[a-z ]+"), max_new_tokens=3) for p in PROMPTS]
    assert all(math.isfinite(r.log_z) for r in pilm.smc(masked, 4, proposal="masked", seed=0, progress=False))
    twist = pilm.Twist.for_model(model, kind="mlp", layers=2)
    assert all(math.isfinite(r.log_z) for r in pilm.smc(targets(model), 4, twist=twist, seed=0, progress=False))


def test_particles_keep_a_prompt_copy_each_on_an_accelerator_unless_told_to_share(device_model, tiny):
    """kv_cache="auto" shares the prompt on the CPU and not on an accelerator (kernel launches
    bind there); "shared" shares anywhere; anything else is refused, naming the choices."""
    model, _ = device_model
    assert tiny.shares_prefixes and not model.shares_prefixes
    model.kv_cache = "shared"
    assert model.shares_prefixes
    with pytest.raises(ValueError, match="kv_cache='paged': use one of auto, shared, per-row"):
        model.kv_cache = "paged"
    with pytest.raises(ValueError, match="kv_cache='paged'"):
        pilm.load_model(kv_cache="paged")


def test_token_masks_are_unpacked_on_the_device_as_on_the_cpu(device_model, tiny):
    """The packed bitmask travels and is unpacked by shifts on the device: the same (N, V)
    mask as numpy's unpacking on the CPU, with the EOS and stop columns and repeated prefixes."""
    from pilm.potentials import Regex
    from pilm.potentials.base import Sequences

    model, _ = device_model
    words = [model.encode(w) for w in ("the", " cat", "The", "9")]
    prefixes = [(), tuple(words[0]), tuple(words[0] + words[1]), (), tuple(words[2]), tuple(words[3])]
    for stop in (model.eos_token_id, model.encode(".")[0]):
        on_device = Regex(r"[a-z ]+\.?").allowed_next(Sequences(model, (), prefixes), stop)
        on_cpu = Regex(r"[a-z ]+\.?").allowed_next(Sequences(tiny, (), prefixes), stop)
        assert on_device.device == model.device and on_cpu.device.type == "cpu"
        assert torch.equal(on_device.cpu(), on_cpu) and on_cpu.any(1)[:4].all() and not on_cpu[4:].any()


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_a_twist_training_step_and_twisted_smc_with_it(device_model, objective):
    model, _ = device_model
    trained = pilm.train_twist(targets(model), objective, steps=1, batch_size=4, seed=0, progress=False)
    assert math.isfinite(trained.history[-1]["loss"])
    assert all(math.isfinite(r.log_z) for r in pilm.smc(targets(model), 4, twist=trained.model, seed=0, progress=False))


def test_a_lora_twist_step_and_a_tied_head(device_model):
    """The H200 run of scripts/gpu_smoke.py found the LoRA body's teacher-forced forward
    building its ids on the CPU; this check now fails on that code."""
    model, _ = device_model
    trained = pilm.train_twist(targets(model), "ctl", body="lora", steps=1, batch_size=2, seed=0, progress=False)
    assert math.isfinite(trained.history[-1]["loss"])
    tied = pilm.Twist.for_model(model, kind="tied", layers=2)
    assert all(math.isfinite(r.log_z) for r in pilm.smc(targets(model), 4, twist=tied, seed=0, progress=False))


@pytest.mark.parametrize("objective", list(FINETUNE_OBJECTIVES))
def test_a_fine_tuning_step(device_model, objective):
    model, _ = device_model
    demos = {"data": [model.encode(" a cat")]} if objective == "sft" else {}
    trained = pilm.finetune(targets(model)[0], objective, steps=1, batch_size=2, lora_rank=2, seed=0, progress=False,
                            **demos)
    policy = trained.model
    assert math.isfinite(trained.history[-1]["loss"])
    assert all(math.isfinite(r.log_z) for r in pilm.smc(targets(model), 4, proposal=policy, seed=0, progress=False))


def test_a_prm_training_step_and_the_particle_filter_with_it(device_model):
    model, _ = device_model
    cut = pilm.Steps(delimiter=model.encode(" e")[0], max_steps=2, max_step_tokens=3)
    chains = [pilm.Target(model, p, SOFT, max_new_tokens=6, steps=cut) for p in PROMPTS]
    prm = pilm.train_prm(chains, rollouts=1, chains=2, steps=1, batch_size=2, seed=0, progress=False).model
    for weights in ("paper", "twisted"):
        assert all(math.isfinite(r.log_z) for r in pilm.particle_filter(chains, prm, 4, weights=weights, seed=0))


def test_rejection_and_bounds(device_model):
    model, _ = device_model
    target = targets(model, BOUNDED, horizon=3)[0]
    assert len(pilm.rejection_sample(target, 2, seed=0).samples) == 2
    report = pilm.bounds(target, n_particles=[2], seeds=2, exact_samples="rejection", progress=False)
    assert all(math.isfinite(r["lower"]) and math.isfinite(r["upper"]) for r in report.rows)


def test_a_latent_e_and_m_step(device_model):
    model, _ = device_model
    from pilm.latent import Example, LatentReasoner

    reasoner = LatentReasoner(model, template="{x} because{z}. So:{y}", labels=[" yes", " no"], rationale_tokens=(1, 2))
    train = [Example("It rains", " yes"), Example("It is dry", " no")]
    q = reasoner.e_step(train, steps=1, batch_size=2, lora_rank=2, progress=False).model
    lik = reasoner.m_step(train, q, steps=1, samples=1, batch_size=2, lora_rank=2, progress=False).model
    assert reasoner.predict(["It snows"], q, likelihood=lik, samples=2)


def test_a_red_teaming_step(device_model, tiny):
    model, _ = device_model
    from pilm.tasks.attack_reward import Victim
    from pilm.tasks.redteam import red_teaming

    victim = Victim(model, max_tokens=3)
    rt = red_teaming(model, victim, classifier=lambda x, y: torch.full((len(y),), 0.9, dtype=torch.float64),
                     victim_samples=1, max_tokens=3, min_tokens=1)
    trained = pilm.finetune(rt.target, "tb", steps=1, batch_size=2, lora_rank=2, progress=False)
    assert math.isfinite(trained.history[-1]["loss"])


def test_load_model_and_the_cli_put_the_model_on_the_device(tiny, tmp_path, capsys):
    from pilm.commands.cli import main

    tiny.hf.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    with fake_accelerator():
        model = pilm.load_model(str(tmp_path / "m"), device="fakegpu", dtype="float32")
        assert model.device.type == "fakegpu" and all(p.device == model.device for p in model.hf.parameters())
        code = main(["sample", "--model", str(tmp_path / "m"), "--device", "fakegpu", "--dtype", "float32",
                     "--prompt", "The cat", "--max-new-tokens", "3", "--n-particles", "2", "--out",
                     str(tmp_path / "s.jsonl")])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "s.jsonl").read_text())
    assert len(record["samples"]) == 2 and record["info"]["device"] == "fakegpu:0", record["info"]


def test_a_generator_or_twist_on_another_device_is_refused_naming_both(device_model):
    from pilm.errors import DeviceError
    from pilm.inference.smc import run_smc
    from pilm.twists import Twist, TwistConfig

    model, _ = device_model
    target = targets(model)[0]
    with pytest.raises(DeviceError, match="generator is on cpu but the model is on fakegpu:0"):
        run_smc(target, 2, torch.Generator().manual_seed(0))
    hidden = model.start(model.encode("a"), 1).hidden.shape[-1]
    loose = Twist(TwistConfig(hidden_size=hidden, vocab_size=model.vocab_size))  # made on the CPU, never attached
    with pytest.raises(DeviceError, match="twist is on cpu but the model is on fakegpu:0"):
        pilm.smc(target, 2, twist=loose, progress=False)


# -- choosing the device and dtype, and refusing what the machine cannot run ----------------
def fake_cuda(monkeypatch, count=2, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0) if bf16 else (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")


def test_auto_is_this_process_gpu_and_its_best_dtype(monkeypatch):
    from pilm.models.device import resolve_device, resolve_dtype

    monkeypatch.delenv("PILM_DEVICE", raising=False)
    monkeypatch.delenv("PILM_DTYPE", raising=False)
    fake_cuda(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of an accelerate launch
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    fake_cuda(monkeypatch, bf16=False)
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.float16
    with pytest.raises(pilm.errors.DeviceError, match="cannot run bfloat16; use float16 or float32"):
        resolve_dtype("bfloat16", torch.device("cuda", 0))
    with pytest.raises(pilm.errors.DeviceError, match="has 2 CUDA device"):
        resolve_device("cuda:5")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # a bare "cuda" is this process's too
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(pilm.errors.DeviceError, match="LOCAL_RANK=2 but this machine has 2"):
        resolve_device("auto")


def test_a_device_the_machine_lacks_is_one_cli_line_before_any_model_loads(monkeypatch, capsys):
    from pilm.commands.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pilm.models.registry, "_load_folder", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["sample", "--device", "cuda", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device" in err, err
    assert main(["sample", "--device", "tpu9", "--prompt", "Hi"]) == 2
    assert "unknown device 'tpu9'" in capsys.readouterr().err


def test_a_decoding_step_moves_little_between_host_and_device(device_model):
    """Per token of single-target SMC: to the host, the drawn tokens with their log-probs (one
    transfer; the resampling draws with a host twin of the target's generator); to the device,
    the row map when it changes (the next forward is fed the draws still on the device). Before,
    4.75 transfers to the host and 4.95 to the device per token (drawn tokens went to the host
    and back, log q and log p0 came over apart, the row map was sent twice and the model checked
    it for identity on the host), then 2 to the host (the resampling's uniform came from the
    device), then 2 to the device (the fed tokens went back)."""
    model, acc = device_model
    horizon = 12
    acc.where.clear()
    acc.to_host = acc.to_device = 0
    pilm.smc(targets(model, horizon=horizon)[0], 8, seed=0, progress=False, ess_threshold=1.0)
    assert acc.to_host <= horizon + 2 and acc.to_device <= horizon + 2, acc.where.most_common()


def test_the_cli_default_leaves_the_environment_choice_alone(monkeypatch, tmp_path):
    """--dtype auto (the default) must not override PILM_DTYPE, and a fresh process where
    PILM_DTYPE is "auto" must still find the CPU's dtype (it read "auto" as a torch dtype)."""
    import os
    import subprocess
    import sys

    from pilm.models.device import placed

    monkeypatch.setenv("PILM_DTYPE", "float32")
    monkeypatch.delenv("PILM_DEVICE", raising=False)
    with placed("auto", "auto"):
        assert os.environ["PILM_DTYPE"] == "float32"
    with placed("cpu", "bfloat16"):
        assert os.environ["PILM_DTYPE"] == "bfloat16" and os.environ["PILM_DEVICE"] == "cpu"
    assert os.environ["PILM_DTYPE"] == "float32" and "PILM_DEVICE" not in os.environ
    code = "from pilm.models.machine import default_dtype; print(default_dtype())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PILM_DTYPE": "auto", "PILM_CACHE": str(tmp_path)})
    assert run.returncode == 0 and run.stdout.strip() in ("torch.float32", "torch.bfloat16"), run.stderr


def test_beam_search_safety_tuning_and_pgas_that_resamples(device_model):
    """Three paths a review of the first version found mixing devices: token-level beam search,
    the red-team victim's safety tuning, and particle Gibbs with ancestor sampling on a sweep
    that resamples (its stitched chains' log-probabilities met the host weights)."""
    model, _ = device_model
    from pilm.inference.search import beam_search
    from pilm.tasks.attack_reward import Victim
    from pilm.tasks.redteam import red_teaming

    assert len(beam_search(model, model.encode_prompt("The cat"), beams=2, max_new_tokens=3)) == 2
    rt = red_teaming(model, Victim(model, max_tokens=2), classifier=lambda x, y: torch.full((len(y),), 0.9,
                     dtype=torch.float64), victim_samples=1, max_tokens=2, min_tokens=1)
    tuned = rt.safety_tune(model, ["hello", "there"], steps=1, batch_size=2)
    assert tuned.model.device == model.device
    cut = pilm.Steps(delimiter=model.encode(" e")[0], max_steps=2, max_step_tokens=2)
    chain = pilm.Target(model, PROMPTS[0], SOFT, max_new_tokens=4, steps=cut)
    res = pilm.particle_gibbs(chain, pilm.Twist.for_model(model, output="log_sigmoid"), 4, iterations=2,
                              ancestor_sampling=True, weights="twisted", ess_threshold=1.0, seed=0)
    assert len(res.samples) == 4
