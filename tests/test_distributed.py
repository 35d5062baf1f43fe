"""pilm.finetune under two processes (torch.distributed.run, gloo on CPU, what ``accelerate
launch`` sets up): each samples its own micro-batches, gradients are averaged, so the
processes end with the same weights after seeing different data."""

import os
import socket
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent("""
    import os, sys, torch, pilm
    from pilm.potentials import FunctionPotential
    model = pilm.models.TabularLM.random(4, seed=3, eos_id=3)
    soft = FunctionPotential(lambda t: 0.8 * t.count(0) - 0.5 * t.count(1), on="tokens", name="soft")
    policy = pilm.finetune(pilm.Target(model, "a", soft, max_new_tokens=4), "subtb", steps=5, batch_size=4, lr=0.05,
                           warmup=1, seed=0, progress=False, checkpoint_dir=sys.argv[1] + "/ckpt", checkpoint_every=5)
    torch.save({"theta": policy.trainable["theta"].detach(), "log_r": [h["log_r"] for h in policy.history]},
               f"{sys.argv[1]}/rank{os.environ['RANK']}.pt")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_gradients_and_stay_identical(tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "run.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a["log_r"] != b["log_r"]  # each process drew its own trajectories (seed + process index)
    assert torch.equal(a["theta"], b["theta"]) and a["theta"].abs().sum() > 0  # one averaged update per step
    assert (tmp_path / "ckpt").exists()  # written by the main process
