"""The dtype is decided once per CPU and recorded; the probe leaves the global RNG alone."""

import json
import os
import subprocess
import sys

import torch

import pilm
from pilm.models import machine

PROBE = "from pilm.models.machine import default_dtype, cpu_key; print(default_dtype(), '|', cpu_key())"


def test_two_fresh_processes_agree_and_the_decision_is_stored_per_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PILM_DTYPE"}
    runs = [subprocess.run([sys.executable, "-c", PROBE], env={**env, "PILM_CACHE": str(tmp_path)},
                           capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)]
    assert runs[0] == runs[1]
    dtype, key = (s.strip() for s in runs[0].split("|"))
    stored = json.loads((tmp_path / "dtype.json").read_text())
    assert f"torch.{stored[key]}" == dtype
    # a stored decision is what later processes use, whatever timing would say now
    (tmp_path / "dtype.json").write_text(json.dumps({key: "float32" if stored[key] == "bfloat16" else "bfloat16"}))
    again = subprocess.run([sys.executable, "-c", PROBE], env={**env, "PILM_CACHE": str(tmp_path)},
                           capture_output=True, text=True, check=True).stdout
    assert again.split("|")[0].strip() != dtype


def test_pilm_dtype_overrides(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, "PILM_CACHE": str(tmp_path),
                         "PILM_DTYPE": "float32"}, capture_output=True, text=True, check=True).stdout
    assert out.startswith("torch.float32") and not (tmp_path / "dtype.json").exists()


def test_the_probe_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    machine._bf16_faster_on_cpu()
    assert torch.equal(torch.rand(3), expected)


def test_results_record_the_dtype_the_model_ran_in(tiny, tmp_path):
    tiny.hf.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    model = pilm.load_model(str(tmp_path / "m"))
    assert model.hf.dtype == pilm.models.default_dtype()
    res = pilm.smc(pilm.Target(model, "Hi", max_new_tokens=2), 2, progress=False)
    assert res.info["dtype"] == str(model.hf.dtype).removeprefix("torch.")
    assert pilm.SMCResult(**json.loads(json.dumps(res.to_dict()))).info["dtype"] == res.info["dtype"]
