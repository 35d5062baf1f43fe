"""Learning a process reward as a value function, which is a twist (``pilm.train_prm``).

For phi = 1[correct], the value of a partial chain under the policy p_M is
V(x_{<=t}) = E_{p_M}[phi | x_{<=t}] = P(correct | prefix): the optimal twist psi*_t of the
target p_M phi (Zhao et al. 2024). Math-Shepherd's labels (Wang et al. 2024) estimate it by
Monte Carlo: from each step end of a sampled chain, k rollouts of the policy, and the label
y = the fraction that reach a right answer (E[y] = V exactly). A head psi(s_{<t}, v) in
(0, 1) on the policy's hidden state is fitted to y at the step ends by binary cross-entropy,
-y log psi - (1 - y) log(1 - psi), whose minimiser is E[y | prefix] = V. The data (hidden
states, last tokens, labels) are collected once and every update reuses them, so ``steps``
updates cost no LM forward. The collection, the costly part, can be saved after every batch
(``checkpoint``) and resumed. The result is a ``Twist``: ``pilm.particle_filter`` reads it as a
PRM (``pilm.prm.TwistPRM``) and ``pilm.smc`` uses it as a twist.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import PRMTrainingConfig, takes_config
from ..errors import ResumeMismatchError
from ..inference.voting import sample_chains
from ..models.device import seeded_generator
from ..prm import ProcessReward, StepBatch
from ..steps import Steps
from ..target import Target
from ..twists.base import TwistFunction
from ..twists.head import Twist
from .checkpoint import code_digest
from .fit import Trained, fit

Verifier = Callable[[str, "str | None"], bool]


@dataclass
class ValueData:
    """Step ends of sampled chains: ``hidden`` (rows, H) from which each step's last token was
    drawn, that token ``last``, the completion so far ``tokens``, its target ``target`` index and
    the Monte Carlo ``label`` (fraction of rollouts from there that were right); ``seconds``
    the collection took (over every call that resumed it)."""

    hidden: Tensor
    last: Tensor
    tokens: list[tuple[int, ...]]
    target: list[int]
    label: Tensor
    seconds: float = 0.0


class _Recorder(ProcessReward):
    """Scores 1 and keeps every step end it is shown (with the policy's hidden state)."""

    reads_hidden = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Tensor, Tensor, list[tuple[int, ...]], list[tuple[int, ...]], list[int]]] = []

    def score(self, batch: StepBatch) -> Tensor:
        assert batch.hidden is not None and batch.last is not None  # reads_hidden: the engine gives both
        self.seen.append((batch.hidden.clone(), batch.last.clone(), list(batch.prompts), list(batch.tokens),
                          [len(s) for s in batch.steps]))
        return torch.ones(len(batch), dtype=torch.float64)


@dataclass
class _Collection:
    """What ``collect_values`` has gathered so far: the step ends of the first ``chains_done``
    targets, then the labels of the first ``rollouts_done`` step ends that need rollouts, and
    the ``seconds`` spent, over every call that added to it. Saved as one safetensors file
    (the ragged token lists flattened, with their lengths), written aside and renamed into place."""

    hidden: list[Tensor] = field(default_factory=list)
    last: list[Tensor] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    done_steps: list[int] = field(default_factory=list)
    chains_done: int = 0
    labels: Tensor | None = None
    rollouts_done: int = 0
    seconds: float = 0.0

    def save(self, path: Path, key: str) -> None:
        long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        tensors = {"hidden": torch.cat(self.hidden), "last": torch.cat(self.last), "owner": long(self.owner),
                   "tokens": long([v for t in self.tokens for v in t]), "lengths": long([len(t) for t in self.tokens]),
                   "done_steps": long(self.done_steps)}
        if self.labels is not None:
            tensors["labels"] = self.labels
        meta = {"key": key, "chains_done": str(self.chains_done), "rollouts_done": str(self.rollouts_done),
                "seconds": repr(self.seconds)}
        tmp = path.with_name(f".{path.name}.part")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, key: str, overwrite: bool = False) -> _Collection:
        """The collection saved at ``path`` (a fresh one if there is none); one gathered for
        other targets or settings (``key``), or unreadable, is refused, or with ``overwrite``
        replaced by a fresh one."""
        if not path.exists():
            return cls()
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            saved = meta.get("key")
        except SafetensorError as err:
            if overwrite:
                return cls()
            raise ValueError(f"{path} cannot be read as a train-prm collection ({err}): delete it") from None
        if saved != key:
            if overwrite:
                return cls()
            raise ResumeMismatchError(path, {"key": (saved, key)}, remedy="delete it, or pass another checkpoint")
        tokens = tensors["tokens"].split(tensors["lengths"].tolist())
        return cls([tensors["hidden"]], [tensors["last"]], [tuple(t.tolist()) for t in tokens],
                   tensors["owner"].tolist(), tensors["done_steps"].tolist(), int(meta["chains_done"]),
                   tensors.get("labels"), int(meta["rollouts_done"]), float(meta["seconds"]))


def discard_collection(checkpoint: str | Path) -> None:
    """Remove a saved collection and any copy of it left half written."""
    path = Path(checkpoint)
    for done in (path, path.with_name(f".{path.name}.part")):
        done.unlink(missing_ok=True)


def collection_key(targets: Sequence[Target], verifier: Verifier | None, **settings) -> str:
    """What a saved collection must match to be resumed: the model and its dtype, each target
    (prompt, potential, token budget, steps), the verifier's code and the settings."""
    model = targets[0].model
    return code_digest(model.name, getattr(model, "dtype_name", ""), verifier, sorted(settings.items()),
                       [(t.prompt_ids, t.potential, t.max_new_tokens, repr(t.steps)) for t in targets])


def collect_values(targets: Sequence[Target], *, verifier: Verifier | None = None, chains: int = 1, rollouts: int = 8,
                   temperature: float = 1.0, seed: int = 0, max_rows: int = 512, progress: bool = True,
                   checkpoint: str | Path | None = None, overwrite: bool = False) -> ValueData:
    """Sample ``chains`` chains per target; label each step end by ``rollouts`` rollouts
    (module docstring). A chain that is finished at a step end is labelled by itself. A chain
    is right when ``verifier(question, answer)`` holds, or, without a verifier, it counts
    phi = exp(log phi) of the target's potential (a label in [0, 1]). With ``checkpoint`` (a
    file) the collection is saved after every batch of chains and of rollouts, and a call
    with the same file, model, targets, verifier and settings resumes after the last batch
    saved: each batch is seeded by its position, so the result is the one an uninterrupted
    call returns. A file of anything else is refused (``ResumeMismatchError``), or with
    ``overwrite`` replaced."""
    targets = list(targets)
    started = time.perf_counter()
    path = Path(checkpoint) if checkpoint is not None else None
    key = collection_key(targets, verifier, chains=chains, rollouts=rollouts, temperature=temperature, seed=seed,
                         max_rows=max_rows)
    got = _Collection.load(path, key, overwrite) if path is not None else _Collection()
    spent = got.seconds

    def save() -> None:
        if path is not None:
            got.seconds = spent + time.perf_counter() - started
            got.save(path, key)

    index = {t.prompt_ids: i for i, t in enumerate(targets)}
    per = max(1, max_rows // chains)
    for lo in tqdm(range(got.chains_done, len(targets), per), desc="train-prm chains", disable=not progress,
                   leave=False):
        recorder = _Recorder()
        sample_chains(targets[lo: lo + per], chains, recorder, temperature=temperature, seed=seed + lo,
                      method="prm data")
        for h, v, prompts, toks, counts in recorder.seen:
            got.hidden.append(h)
            got.last.append(v)
            got.tokens += toks
            got.owner += [index[p] for p in prompts]
            got.done_steps += counts
        got.chains_done = min(lo + per, len(targets))
        save()
    _label(got, targets, verifier, rollouts=rollouts, temperature=temperature, seed=seed, max_rows=max_rows,
           progress=progress, save=save)
    return ValueData(torch.cat(got.hidden), torch.cat(got.last), got.tokens, got.owner, cast(Tensor, got.labels),
                     spent + time.perf_counter() - started)


def _label(got: _Collection, targets, verifier, *, rollouts, temperature, seed, max_rows, progress, save) -> None:
    """Fill ``got.labels``: a finished chain by itself, the others by rollouts, in batches
    after the first ``got.rollouts_done``, calling ``save`` after each."""
    out = torch.zeros(len(got.tokens), dtype=torch.float64) if got.labels is None else got.labels
    todo = []
    for k, (toks, g, taken) in enumerate(zip(got.tokens, got.owner, got.done_steps, strict=True)):
        target = targets[g]
        text = target.sequences([toks]).texts[0]
        finished = target.is_complete(toks) or target.steps.finishes(taken, text)
        if finished:
            out[k] = _right(target, toks, verifier)
        else:
            rest = replace(target.steps, max_steps=target.steps.max_steps - taken)
            todo.append((k, Target(target.model, target.prompt_ids + tuple(toks), target.potential,
                                   max_new_tokens=target.max_new_tokens - len(toks), steps=rest,
                                   question=target.question), g))
    got.labels = out
    per = max(1, max_rows // rollouts)
    for lo in tqdm(range(got.rollouts_done, len(todo), per), desc="train-prm rollouts", disable=not progress,
                   leave=False):
        chunk = todo[lo: lo + per]
        results = sample_chains([t for _, t, _ in chunk], rollouts, None, temperature=temperature, seed=seed + 7919 + lo,
                                method="prm rollouts")
        for (k, _, g), res in zip(chunk, results, strict=True):
            full = [got.tokens[k] + tuple(r) for r in res.tokens]
            out[k] = sum(_right(targets[g], f, verifier) for f in full) / rollouts
        got.rollouts_done = min(lo + per, len(todo))
        save()


def _right(target: Target, toks, verifier: Verifier | None) -> float:
    if verifier is None:
        return float(target.log_potential([list(toks)]).exp()[0])
    text = target.sequences([list(toks)]).texts[0]
    return float(bool(verifier(cast(str, target.question), cast(Steps, target.steps).answer(text))))  # set by now


def fit_value(twist: TwistFunction, data: ValueData, *, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
              seed: int = 0, progress: bool = True) -> list[dict]:
    """``steps`` AdamW updates of ``twist`` (psi in (0, 1)) by binary cross-entropy against the
    labels at the recorded step ends (module docstring). Returns one record per update."""
    module = cast(nn.Module, twist)  # a trainable twist is a torch module
    params = [p for p in module.parameters() if p.requires_grad]
    device = params[0].device
    generator = seeded_generator(seed, "cpu")  # picks rows of the host-side data
    prefixes = [t[:-1] for t in data.tokens] if twist.needs_prefixes else None

    def step(_: int, update) -> dict:
        idx = torch.randint(len(data.label), (min(batch_size, len(data.label)),), generator=generator)
        hidden = data.hidden[idx].to(device)  # the recorded states stay on the host; a batch goes over
        log_psi = twist.log_psi_at([prefixes[j] for j in idx.tolist()] if prefixes else None, hidden,
                                   data.last[idx].to(device)).clamp(max=-1e-7)  # a head reads the one token only
        y = data.label[idx].to(device).float()
        loss = -(y * log_psi + (1 - y) * torch.log(-torch.expm1(log_psi))).mean()
        update(loss)
        return {"loss": loss.item()}

    return fit(module, torch.optim.AdamW(params, lr=lr), step, steps=steps, name="train-prm", grad_clip=None,
               progress=progress)


C = PRMTrainingConfig  # every default below is PRMTrainingConfig's


@takes_config(PRMTrainingConfig)
def train_prm(
    targets: Sequence[Target],
    *,
    verifier: Verifier | None = None,
    rollouts: int = C.rollouts,
    chains: int = C.chains,
    steps: int = C.steps,
    batch_size: int = C.batch_size,
    lr: float = C.lr,
    temperature: float = C.temperature,
    head: str = C.head,
    layers: int = C.layers,
    twist: TwistFunction | None = None,
    seed: int = C.seed,
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Trained:
    """A learned PRM for the policy at ``temperature`` on ``targets`` (module docstring):
    ``chains`` chains per target, ``rollouts`` Math-Shepherd rollouts per step end, then
    ``steps`` updates of a fresh head (``head`` tied | mlp | linear, psi in (0, 1)) or of
    ``twist``. ``verifier(question, answer) -> bool`` says whether a final answer is right
    (e.g. ``pilm.tasks.arithmetic_chain.answer_checker()``); without one, a chain counts
    phi of its target's potential. ``checkpoint``: a file that keeps the collection as it
    grows, so an interrupted call resumes it (``collect_values``; ``overwrite`` replaces one of
    other targets or settings). Returns a ``Trained``: the twist as ``.model``, the updates as
    ``.history``, and the collection (step ends, mean label, seconds) as ``.extras``.

    ``config=`` a ``PRMTrainingConfig`` gives every setting at once; an argument also given overrides it.
    """
    targets = list(targets)
    if not targets or any(t.steps is None for t in targets):
        raise ValueError("train_prm needs targets with steps (pilm.steps.Steps), e.g. from a reasoning task")
    for name, value in (("rollouts", rollouts), ("chains", chains), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    data = collect_values(targets, verifier=verifier, chains=chains, rollouts=rollouts, temperature=temperature,
                          seed=seed, progress=progress, checkpoint=checkpoint, overwrite=overwrite)
    if twist is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            twist = Twist.for_model(targets[0].model, kind=head, layers=layers, output="log_sigmoid")
    history = fit_value(twist, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    return Trained(twist, history, {"step_ends": len(data.label), "mean_label": float(data.label.mean()),
                                    "data_seconds": data.seconds, "fit_seconds": sum(h["seconds"] for h in history),
                                    "rollouts": rollouts, "chains": chains, "temperature": temperature})
