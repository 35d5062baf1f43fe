"""Training checkpoints in safetensors: module weights, optimizer state, RNG state, step.

Written to a temporary folder and renamed into place, so an interrupted write never
leaves a half checkpoint; resuming from one continues bit-identically. Each checkpoint records
its run's key (``run_key``: the target, the model and dtype, every setting a step depends on),
and a run resumes only from a checkpoint of the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import ResumeMismatchError
from ..target import Target

NAME = "checkpoint"


def save_checkpoint(directory: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator | Sequence[Tensor], state: dict) -> Path:
    """Write the trainable weights, optimizer, random state and ``state`` atomically.
    ``generator``: the one generator of a run, or every process's generator state in rank
    order (a multi-process run resumes each rank's own stream)."""
    streams = [generator.get_state()] if isinstance(generator, torch.Generator) else list(generator)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=directory))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    save_file(_trainable(module), tmp / "weights.safetensors")
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({f"generator.{rank}": s.cpu() for rank, s in enumerate(streams)}, tmp / "rng.safetensors")
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
                    generator: torch.Generator, rank: int = 0) -> dict | None:
    """Restore a checkpoint in place (``generator`` gets process ``rank``'s stream) and return
    its state dict, or ``None`` if there is none."""
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
    streams = load_file(folder / "rng.safetensors")
    if f"generator.{rank}" not in streams and not (rank == 0 and "generator" in streams):  # "generator": before ranks
        raise ValueError(f"{folder} holds no random stream for process {rank}; overwrite it to start afresh")
    generator.set_state(cast(Tensor, streams.get(f"generator.{rank}", streams.get("generator"))))  # one is there
    return state


def run_key(targets: Sequence[Target], settings: dict) -> dict:
    """What a run's steps depend on, as JSON: the target (prompt, potential, horizon; or every
    target of a batch), the model and its dtype, and ``settings`` (the number of steps and the
    checkpoint interval are not in it: a rerun with more steps continues the same run). A
    potential that wraps Python functions is named by their code too (``code_digest``): two
    lambdas share a name, not a key."""
    model = targets[0].model
    where = targets[0].describe() if len(targets) == 1 else {"targets": [t.describe() for t in targets]}
    functions = [_functions(t.potential) for t in targets]
    code = {"potential_code": code_digest(*functions)} if any(functions) else {}
    # a generator's state only fits a generator of its device type: a run resumes where it ran
    placed = {} if model.device.type == "cpu" else {"device": model.device.type}
    key = {**where, **code, "model": model.name, "dtype": model.dtype_name, **placed, **settings}
    return json.loads(json.dumps(key, default=str))


RUN = "run.json"
RESUME_ELSEWHERE = "pass another --out, or delete the folder's results to start afresh"
"""The ways out for a script (the experiments) whose results folder holds other settings."""


def claim(folder: str | Path, key: dict, *, previous: dict | None = None, write: bool = True,
          remedy: str = "pass another out, or overwrite=True to start afresh") -> bool:
    """Key an output folder to one run: True when ``folder/run.json`` (or ``previous``, what an
    older folder's files record) already holds ``key`` (the run resumes), False for a fresh
    folder; another key raises `ResumeMismatchError` naming the settings that differ. ``write``
    (the main process) records the key; ``remedy`` says the ways out."""
    folder = Path(folder)
    path = folder / RUN
    saved = json.loads(path.read_text()) if path.exists() else previous
    if saved is not None and saved != key:
        raise ResumeMismatchError(folder, {k: (saved.get(k), key.get(k)) for k in sorted(set(saved) | set(key))
                                           if saved.get(k) != key.get(k)},
                                  remedy=remedy)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(key, indent=1) + "\n")
    return saved is not None


def code_digest(*objects) -> str:
    """A short digest of functions (their bytecode, constants and captured values) and data,
    the same in every process: no object addresses (``_stable``)."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(_stable(obj).encode())
    return digest.hexdigest()[:16]


def _stable(obj, depth: int = 0) -> str:
    """A text for ``obj`` with no object address: functions by their code and what they
    capture, containers by their items, plain values by repr, anything else (a model, say)
    by its type, and by its fields only where it is a callable object."""
    if depth > 8:
        return "..."
    code = getattr(obj, "__code__", None)
    if code is not None:
        cells = [cell.cell_contents for cell in obj.__closure__ or ()]
        return f"fn({_code(code)}|{_stable(cells, depth + 1)})"
    if isinstance(obj, (str, int, float, bool, type(None))):
        return repr(obj)
    if isinstance(obj, torch.Tensor):
        return _stable(obj.tolist(), depth + 1)
    if isinstance(obj, dict):
        return "{" + ",".join(sorted(f"{_stable(k, depth + 1)}:{_stable(v, depth + 1)}" for k, v in obj.items())) + "}"
    if isinstance(obj, (set, frozenset)):
        return "{" + ",".join(sorted(_stable(x, depth + 1) for x in obj)) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_stable(x, depth + 1) for x in obj) + "]"
    if callable(obj) and not isinstance(obj, type) and hasattr(obj, "__dict__"):
        return f"{type(obj).__qualname__}({_stable(vars(obj), depth + 1)})"
    return type(obj).__qualname__


def _code(code) -> str:
    consts = [_code(c) if hasattr(c, "co_code") else repr(c) for c in code.co_consts]
    return f"{code.co_code.hex()}:{consts}:{code.co_names}"


def _functions(potential) -> list:
    """The Python functions a potential's factors hold (a ``FunctionPotential``'s fn and prefix_fn)."""
    if potential is None:
        return []
    return [value for factor, _ in potential.factors() for value in vars(factor).values()
            if getattr(value, "__code__", None) is not None]


def resume(directory: str | Path | None, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, key: dict, *, overwrite: bool = False, rank: int = 0) -> dict | None:
    """The saved state of the run ``key`` in ``directory`` (restored in place), or ``None`` if
    there is none (or ``overwrite``, which deletes it). A checkpoint of another key raises
    `ResumeMismatchError` naming the settings that differ, before anything is restored."""
    if directory is None:
        return None
    folder = Path(directory) / NAME
    if overwrite:
        shutil.rmtree(folder, ignore_errors=True)
    if not (folder / "state.json").exists():
        return None
    saved_key = json.loads((folder / "state.json").read_text()).get("key")
    if saved_key is None:
        raise ResumeMismatchError(folder, {"key": ("none (a checkpoint from before runs recorded their settings)",
                                                   "this run's")})
    if saved_key != key:
        raise ResumeMismatchError(folder, {k: (saved_key.get(k), key.get(k)) for k in sorted(set(saved_key) | set(key))
                                           if saved_key.get(k) != key.get(k)})
    return load_checkpoint(directory, module, optimizer, generator, rank)


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (a LoRA body's frozen base weights are not saved)."""
    return {k: p.detach().contiguous() for k, p in module.named_parameters() if p.requires_grad}
