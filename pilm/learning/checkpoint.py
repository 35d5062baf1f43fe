"""Training checkpoints in safetensors: module weights, optimizer state, RNG state, step.

Written to a temporary folder and renamed into place, so an interrupted write never
leaves a half checkpoint; resuming from one continues bit-identically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NAME = "checkpoint"


def save_checkpoint(directory: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=directory))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    save_file(_trainable(module), tmp / "weights.safetensors")
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"]}))
    final = directory / NAME
    if final.exists():
        old = directory / f".{NAME}-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def load_checkpoint(directory: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict | None:
    """Restore a checkpoint in place and return its state dict, or ``None`` if there is none."""
    folder = Path(directory) / NAME
    if not (folder / "state.json").exists():
        return None
    state = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "weights.safetensors")
    if set(weights) != set(_trainable(module)):
        raise ValueError(f"{folder} was written for another twist (its parameters differ)")
    module.load_state_dict(weights, strict=False)
    flat = load_file(folder / "optimizer.safetensors")
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    generator.set_state(load_file(folder / "rng.safetensors")["generator"])
    return state


def resume(directory: str | Path | None, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, objective: str) -> dict | None:
    """The saved state of a run of ``objective`` in ``directory`` (restored in place), or
    ``None`` if there is none; a checkpoint of another objective is refused."""
    if directory is None:
        return None
    saved = load_checkpoint(directory, module, optimizer, generator)
    if saved is not None and saved["objective"] != objective:
        raise ValueError(f"{directory} holds a {saved['objective']!r} run, not {objective!r}")
    return saved


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (a LoRA body's frozen base weights are not saved)."""
    return {k: p.detach().contiguous() for k, p in module.named_parameters() if p.requires_grad}
