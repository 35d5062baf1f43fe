"""One training loop for every learner in pilm (``fit``), and what a trainer returns (``Trained``).

A learner hands ``fit`` its step: a function of the step index that draws its data, computes
its losses and calls ``update`` (once, or several times: a twist reuses one draw R times; a
policy back-propagates several micro-batches, then updates once). The loop owns the rest:

- the update: gradients averaged across processes under ``accelerate launch``, their norm
  clipped to ``grad_clip`` (``None``: not clipped), one optimizer step;
- a linear learning-rate warm-up over the first ``warmup`` steps, lr_i = lr · min(1, (i+1)/warmup);
- one record a step (the step's own fields, plus ``step`` and ``seconds``), written as a
  JSONL line to ``log_path`` and shown on a progress bar;
- a resumable checkpoint (``Checkpointing``: trainable weights, optimizer, every process's
  random stream, the history and the learner's extra state), written every ``every`` steps
  and at the end, and resumed from, so that a resumed run continues bit-identically;
- a plot of the history's curves at the end (``plot_path``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import resume, save_checkpoint

Update = Callable[..., None]  # update(loss=None): back-propagate loss (if given), then one optimizer step
Step = Callable[[int, Update], dict]  # the fields of step i's record


@dataclass(repr=False)
class Trained:
    """What a trainer returns: the trained ``model`` (a twist, a policy, a PRM), its
    ``history`` (one record a step) and its ``extras`` (e.g. a learned log Z, the data a PRM
    was fitted on)."""

    model: Any
    history: list[dict]
    extras: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        steps = f"{len(self.history)} step" + ("" if len(self.history) == 1 else "s")
        return f"Trained(model={type(self.model).__name__}, history={steps}, extras={sorted(self.extras)})"

    def __getattr__(self, name: str):
        raise AttributeError(f"a Trained result has no {name!r}: the trained object is its .model "
                             f"(its fields: model, history, extras)")


@dataclass
class Checkpointing:
    """Where a run checkpoints (``directory``; ``None``: nowhere), every how many steps, the
    run's ``key`` (``checkpoint.run_key``: a checkpoint of another key is refused), and
    ``overwrite`` (delete an existing checkpoint and start afresh). ``save`` returns the
    learner's extra state (called on every process: it may gather across them) and ``load``
    restores it from a checkpoint's state."""

    directory: str | Path | None
    key: dict
    every: int
    overwrite: bool = False
    save: Callable[[], dict] = dict
    load: Callable[[dict], None] = lambda state: None


def fit(module: nn.Module, optimizer: torch.optim.Optimizer, step: Step, *, steps: int, name: str,
        grad_clip: float | None, generator: torch.Generator | None = None, warmup: int = 0,
        checkpoint: Checkpointing | None = None, log_path: str | Path | None = None, log_tag: dict | None = None,
        plot_path: str | Path | None = None, title: str = "", metrics: Iterable[str] = ("loss",),
        accelerator=None, progress: bool = True, show: Iterable[str] = ("loss",)) -> list[dict]:
    """Run ``step`` for steps ``start..steps-1`` (``start``: the resumed checkpoint's step, else 0)
    and return the run's history (module docstring). ``module`` holds the trainable weights a
    checkpoint saves; ``generator`` is the run's random stream (saved per process);
    ``accelerator`` (an ``accelerate.Accelerator``) makes it a multi-process run: gradients are
    averaged, and only the main process logs, plots and writes checkpoints. ``log_tag`` fields
    (e.g. the objective) lead every JSONL line."""
    main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    params = [p for g in optimizer.param_groups for p in g["params"]]
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    history: list[dict] = []
    start = 0
    if checkpoint is not None:
        # every checkpointing trainer passes its generator (a run without one saved no stream to restore)
        saved = resume(checkpoint.directory, module, optimizer, cast(torch.Generator, generator), checkpoint.key,
                       overwrite=checkpoint.overwrite, rank=rank)
        if saved is not None:
            start, history = saved["step"], saved["history"]
            checkpoint.load(saved)
    log = _Log(log_path if main else None, log_tag or {}, history)
    if main and plot_path is not None:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)

    def update(loss: Tensor | None = None) -> None:
        if loss is not None:
            loss.backward()
        if accelerator is not None and accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, "mean")
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad()

    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=not (progress and main))
    for i in bar:
        t0 = time.perf_counter()
        if warmup > 0:
            for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = lr * min(1.0, (i + 1) / warmup)
        optimizer.zero_grad()
        record = {"step": i + 1, **step(i, update)}
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        bar.set_postfix({k: f"{record[k]:.3g}" for k in show if k in record})
        log.write(record)
        if checkpoint is not None and checkpoint.directory is not None and (
                (i + 1) % checkpoint.every == 0 or i + 1 == steps):
            _save(checkpoint, module, optimizer, generator, accelerator, main, i + 1, history)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    if main and plot_path is not None:
        from .plots import plot_training

        plot_training(history, plot_path, title=title, metrics=tuple(metrics))
    return history


def _save(checkpoint: Checkpointing, module, optimizer, generator, accelerator, main: bool, step: int,
          history: list[dict]) -> None:
    """Every process's random stream and extra state, gathered, written by the main process."""
    streams = [generator.get_state()] if generator is not None else []
    extra = checkpoint.save()
    if accelerator is not None:
        from accelerate.utils import gather_object

        streams = gather_object(streams)
    if main:
        assert checkpoint.directory is not None  # fit saves only where there is one
        save_checkpoint(checkpoint.directory, module, optimizer, streams,
                        {"step": step, "history": history, "key": checkpoint.key, **extra})


class _Log:
    """The JSONL log: it holds exactly the steps the run has (none, or the resumed ones), then
    one line a step."""

    def __init__(self, path: str | Path | None, tag: dict, history: list[dict]):
        self.path, self.tag = path, tag
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("".join(self._line(r) for r in history))

    def _line(self, record: dict) -> str:
        return json.dumps({**self.tag, **record}) + "\n"

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(self._line(record))
