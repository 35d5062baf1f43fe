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
    from accelerate import Accelerator
    from pilm.potentials import FunctionPotential

    # Spies: each process's own gradients as they go into the cross-process reduction, and the
    # gradients the update clips and applies (after it).
    local, applied, pending = [], [], []
    reduce, clip = Accelerator.reduce, torch.nn.utils.clip_grad_norm_

    def spy_reduce(self, tensor, *args, **kwargs):
        pending.append(tensor.detach().clone())
        return reduce(self, tensor, *args, **kwargs)

    def spy_clip(params, *args, **kwargs):
        params = list(params)
        local.append(list(pending))
        pending.clear()
        applied.append([p.grad.detach().clone() for p in params if p.grad is not None])
        return clip(params, *args, **kwargs)

    Accelerator.reduce, torch.nn.utils.clip_grad_norm_ = spy_reduce, spy_clip
    model = pilm.models.TabularLM.random(4, seed=3, eos_id=3)
    soft = FunctionPotential(lambda t: 0.8 * t.count(0) - 0.5 * t.count(1), on="tokens", name="soft")
    policy = pilm.finetune(pilm.Target(model, "a", soft, max_new_tokens=4), "subtb", steps=5, batch_size=4, lr=0.05,
                           warmup=1, seed=0, progress=False, checkpoint_dir=sys.argv[1] + "/ckpt", checkpoint_every=5)
    torch.save({"theta": policy.model.trainable["theta"].detach(), "log_r": [h["log_r"] for h in policy.history],
                "local": local, "applied": applied}, f"{sys.argv[1]}/rank{os.environ['RANK']}.pt")
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
    assert torch.equal(a["theta"], b["theta"]) and a["theta"].abs().sum() > 0  # one shared update per step
    # Equal weights on both ranks hold for a sum as well as a mean (and AdamW barely tells them
    # apart), so the gradients themselves are checked: the ranks' own gradients differ (their
    # data differ), and the gradient every step applies is their mean on both ranks, not
    # their sum (which differs from the mean by the mean itself, far above float error).
    assert len(a["local"]) == len(a["applied"]) == 5
    for step, (ga, gb, ma, mb) in enumerate(zip(a["local"], b["local"], a["applied"], b["applied"])):
        for la, lb, applied_a, applied_b in zip(ga, gb, ma, mb, strict=True):
            assert (la - lb).abs().max() > 1e-3, step
            mean, total = (la + lb) / 2, la + lb
            assert torch.allclose(applied_a, mean, atol=1e-6) and torch.equal(applied_a, applied_b), step
            assert (applied_a - total).abs().max() > 1e-3, step
    assert (tmp_path / "ckpt").exists()  # written by the main process
