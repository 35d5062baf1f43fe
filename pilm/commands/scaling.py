"""``pilm scale``: accuracy against inference compute for reasoning methods on one engine.

For each budget N (chains per problem) and method, every problem is solved once and one
JSONL row is written per (method, PRM, N, problem): the predicted and gold answers, whether
it is right, whether any of the run's final chains states the gold answer (``any_correct``: for
self-consistency's N independent chains, pass@N), and the compute spent (policy tokens, tokens a judge ran, PRM calls, forwards,
seconds). Rows already in the file are skipped, so a run resumes where it stopped. The
problems run in blocks of ``max_rows // N`` (one batch each; a block with any row missing runs
whole, writing only what is missing), block b with the seed derived from (``seed``, b): under
``accelerate launch`` each process takes every k-th block and writes its own part file, which
the main process merges into ``rows.jsonl``, so for the same ``max_rows`` a sharded run draws
what one process would (each block is the same batch under the same seed). On the vLLM backend
each process starts its own engine on its own devices (``pilm.models.vllm_backend.process_share``).
``pilm.commands.scale_report`` turns the rows into the accuracy table and figure.

Methods and their answer selection (``StepResult.answer``): greedy (one greedy chain);
sc (self-consistency: N chains, majority vote); bon / wbon (best-of-N: N chains scored
after every step; the argmax chain / the answer of largest total score) -- sc, bon and wbon
select from one shared run of N independent chains (the process reward does not change
which chains are drawn), whose seconds all three rows report; beam / dvts (PRM
beam search and DVTS with width min(M, N); argmax); beam-all (beam search without the
recipe's duplicate filter, ``filter_duplicates=False``: an ablation, not in the default
grid); pf (particle filter, the paper's weights; argmax, as the authors' code); pf-twisted (twisted weights; the weighted vote, a
self-normalised estimate of sigma's answer); pg (particle Gibbs with the paper's weights,
``iterations`` sweeps of N / iterations particles, so N chains in all; argmax).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TypedDict, cast

import torch
from accelerate import PartialState

from .. import inference
from ..config import ScaleConfig
from ..inference.result import StepResult
from ..learning.checkpoint import claim
from ..models import load_model
from ..models.device import derived_seed
from ..tasks import arithmetic_chain, gsm8k
from .scale_report import METHODS, read_rows

SELECT = dict(zip(METHODS, ("vote", "vote", "argmax", "weighted_vote", "argmax", "argmax", "argmax", "argmax",
                            "weighted_vote", "argmax"), strict=True))
TASKS = {"arithmetic-chain": arithmetic_chain, "gsm8k": gsm8k}
USES_PRM = {"bon", "wbon", "beam", "beam-all", "dvts", "pf", "pf-twisted", "pg"}


class _Common(TypedDict):  # what every method is given
    temperature: float
    seed: int


class _Scored(_Common):  # and what a method that scores steps is given
    aggregation: str


def runner(method: str, prm, cfg: ScaleConfig) -> Callable[[list, int], list[StepResult]]:
    """The call that runs ``method`` with budget N on a list of targets."""
    common: _Common = {"temperature": cfg.temperature, "seed": cfg.seed}
    scored: _Scored = {**common, "aggregation": cfg.aggregation}
    return cast("Callable[[list, int], list[StepResult]]", {  # a list of targets: a list of results
        "greedy": lambda ts, n: inference.greedy(ts),
        "sc": lambda ts, n: inference.self_consistency(ts, n, **common),
        "bon": lambda ts, n: inference.best_of_n(ts, prm, n, **scored),
        "wbon": lambda ts, n: inference.best_of_n(ts, prm, n, **scored),
        "beam": lambda ts, n: inference.prm_beam_search(ts, prm, n, width=min(cfg.width, n), **scored),
        "beam-all": lambda ts, n: inference.prm_beam_search(ts, prm, n, width=min(cfg.width, n), filter_duplicates=False,
                                                            **scored),
        "dvts": lambda ts, n: inference.dvts(ts, prm, n, width=min(cfg.width, n), **scored),
        "pf": lambda ts, n: inference.particle_filter(ts, prm, n, weights="paper", tau=cfg.tau, on_extinction="return",
                                                      **scored),
        "pf-twisted": lambda ts, n: inference.particle_filter(ts, prm, n, weights="twisted", on_extinction="return",
                                                              **scored),
        "pg": lambda ts, n: inference.particle_gibbs(ts, prm, max(1, n // cfg.iterations), iterations=cfg.iterations,
                                                     tau=cfg.tau, **scored),
    }[method])


SHARED = ("sc", "bon", "wbon")  # independent chains: one run serves all three selections


def _groups(methods) -> list[tuple[str, ...]]:
    """The methods, with those that select from the same independent chains run once together."""
    shared = tuple(m for m in SHARED if m in methods)
    out, seen = [], False
    for m in methods:
        if m in SHARED:
            if not seen:
                out.append(shared)
                seen = True
        else:
            out.append((m,))
    return out


def make_prm(cfg: ScaleConfig, model, prm_path: str | None):
    from ..prm import LMJudge, TwistPRM
    from ..twists import Twist

    if cfg.prm == "verifier":
        return arithmetic_chain.step_verifier()
    if cfg.prm == "judge":
        return LMJudge(model, chat=cfg.chat)
    path = cast(str, prm_path)  # run_scale refuses prm='learned' without a path
    if not model.generates_steps:
        return Twist.from_pretrained(path, model)  # it reads the hidden state the policy's forward made
    reader = load_model(model.name, dtype=model.dtype_name, device=model.device)  # the engine returns none
    return TwistPRM(Twist.from_pretrained(path, reader), reader=reader)


def run_scale(cfg: ScaleConfig, out: str | Path, *, prm_path: str | None = None, model=None,
              progress: bool = True, overwrite: bool = False) -> Path:
    """Run the grid of ``cfg`` and write ``out/rows.jsonl``; returns its path.

    A folder is resumed, and may grow by other methods, budgets N, process rewards and more
    problems, only under the same settings otherwise (``run_key``, kept in ``out/run.json``):
    another temperature, task or model raises `ResumeMismatchError` (``overwrite=True``
    deletes the folder's rows and starts afresh)."""
    if cfg.prm == "learned" and prm_path is None:  # said before the model loads
        raise ValueError("prm='learned' needs prm_path=FOLDER, a process reward saved by pilm.train_prm "
                         "(on the command line: pilm train-prm --out FOLDER)")
    if cfg.prm == "verifier" and cfg.task != "arithmetic-chain":
        raise ValueError(f"{cfg.task} has no exact step verifier: use prm='judge' or prm='learned'")
    task = TASKS[cfg.task]
    problems = task.problems(cfg.problems, tuple(cfg.operands), seed=cfg.seed)
    if cfg.prm == "learned" and USES_PRM & set(cfg.methods):
        check_learned_prm(cast(str, prm_path), cfg, problems)
    state = PartialState(cpu=not torch.cuda.is_available())
    if cfg.backend != "hf" and state.num_processes > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        raise ValueError(f"{state.num_processes} processes, each starting an engine, but no LOCAL_WORLD_SIZE says how "
                         "many share this machine's devices: launch with accelerate launch or torchrun")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows_path = folder / "rows.jsonl"
    if overwrite and state.is_main_process:
        for old in (rows_path, folder / "run.json", *folder.glob("rows.part*.jsonl")):
            old.unlink(missing_ok=True)
    state.wait_for_everyone()
    model = model or load_model(cfg.model, backend=cfg.backend, **cfg.engine_args)  # one engine per process
    key = run_key(cfg, model)
    first = next(iter(read_rows(rows_path)), {}) if rows_path.exists() else None  # a folder from before run.json
    previous = None if first is None else {**key, **{k: first[k] for k in ("task", "temperature", "seed", "model",
                                                                          "dtype") if k in first}}
    for turn in (True, False):  # the main process writes run.json before the others read it
        if state.is_main_process == turn:
            claim(folder, key, previous=previous, write=turn)
        state.wait_for_everyone()
    part = folder / f"rows.part{state.process_index}.jsonl" if state.num_processes > 1 else rows_path
    done = {_key(r) for p in (rows_path, part) if p.exists() for r in read_rows(p)}
    prm = make_prm(cfg, model, prm_path) if USES_PRM & set(cfg.methods) else None
    for n in cfg.n:
        per = max(1, cfg.max_rows // n)
        blocks = [list(range(lo, min(lo + per, len(problems)))) for lo in range(0, len(problems), per)]
        groups = [g for g in _groups(cfg.methods) if g != ("greedy",) or n == cfg.n[0]]
        # Every method on a block before the next block: a run stopped anywhere leaves the methods
        # on the same problems, which is what the paired tests compare.
        for b in range(state.process_index, len(blocks), state.num_processes):
            for group in groups:
                names = {m: cfg.prm if m in USES_PRM else "none" for m in group}
                paths = {m: prm_path if names[m] == "learned" else None for m in group}
                if all((m, names[m], paths[m], n, i) in done for i in blocks[b] for m in group):
                    continue
                scored = group[0] in SHARED and group != ("sc",)  # bon or wbon among them: the chains are scored
                chunk = [(i, problems[i]) for i in blocks[b]]  # the whole block: the same batch as ever
                run = runner("bon" if scored else group[0], prm, replace(cfg, seed=derived_seed(cfg.seed, b)))
                started = time.perf_counter()
                cell = f"scale: {'/'.join(group)} N={n} prm={cfg.prm}: problems {chunk[0][0]}..{chunk[-1][0]}"
                if progress:  # said before the cell runs (a cell can take minutes), and its time after
                    print(f"{cell} ...", end="", flush=True)
                targets = [task.target(model, p["question"], chat=cfg.chat) for _, p in chunk]
                results = run(targets, n)
                if progress:
                    print(f" {time.perf_counter() - started:.0f} s", flush=True)
                with open(part, "a") as f:
                    for (i, p), res in zip(chunk, results, strict=True):
                        for m in group:
                            if (m, names[m], paths[m], n, i) not in done:
                                row = _row(cfg, m, names[m], n, i, p, res)
                                f.write(json.dumps({**row, "prm_path": paths[m]}) + "\n")
    state.wait_for_everyone()
    if state.is_main_process and part != rows_path:
        have = {_key(r) for r in read_rows(rows_path)} if rows_path.exists() else set()
        with open(rows_path, "a") as f:
            for k in range(state.num_processes):
                other = folder / f"rows.part{k}.jsonl"
                for r in read_rows(other) if other.exists() else []:
                    if _key(r) not in have:
                        have.add(_key(r))
                        f.write(json.dumps(r) + "\n")
                other.unlink(missing_ok=True)
    state.wait_for_everyone()
    return rows_path


def check_learned_prm(path: str, cfg: ScaleConfig, problems: list[dict]) -> None:
    """Refuse a learned PRM that reads other prompts than ``cfg``'s (trained with or without the
    chat template, the other way) or was trained on any of ``problems``, as its
    ``training.json`` (written by pilm train-prm) records; a folder without one is taken as is.
    Folders from before train-prm had ``chat`` were trained on plain prompts."""
    record = Path(path, "training.json")
    if not record.exists():
        return
    trained = json.loads(record.read_text())
    chat = trained.get("chat", False)
    if chat != cfg.chat:
        raise ValueError(f"the learned PRM in {path} was trained on prompts {'with' if chat else 'without'} the chat "
                         f"template and reads the hidden states of such prompts: run scale with chat={chat} "
                         f"({'--chat' if chat else '--no-chat'}), or train one with pilm train-prm "
                         f"{'--chat' if cfg.chat else '--no-chat'}")
    seen = set(trained.get("questions", ())) & {p["question"] for p in problems}
    if seen:
        raise ValueError(f"the learned PRM in {path} was trained on {len(seen)} of the {len(problems)} evaluation "
                         f"problems (e.g. {min(seen)!r}): evaluate on others (another seed), or train it on "
                         "others (pilm train-prm --problem-seed)")


GROWS = ("methods", "n", "prm", "max_rows")
"""Settings a scale folder may differ in between runs: each row records its own (the PRM's
folder too). The problem count is not among them: gsm8k's sample of problems changes with it."""


PLACEMENT = frozenset({"tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
                       "kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "swap_space",
                       "distributed_executor_backend", "max_model_len"})
"""Engine arguments that say where and in what batches the engine runs, not what it draws: a
folder may be resumed under others."""


def run_key(cfg: ScaleConfig, model) -> dict:
    """What every row of a scale folder shares: the settings outside ``GROWS``, the engine
    arguments outside ``PLACEMENT``, the model and its dtype."""
    key = {k: v for k, v in asdict(cfg).items() if k not in GROWS and k != "engine"}
    drawing = {k: v for k, v in cfg.engine_args.items() if k not in PLACEMENT}
    if drawing:  # engine arguments that may change what is drawn (quantization, the cache's dtype, ...)
        key["engine"] = dict(sorted(drawing.items()))
    for k, before in (("backend", "hf"), ("chat", False)):  # as in folders from before there was another
        if key[k] == before:
            del key[k]
    key.update(model=model.name, dtype=model.dtype_name)
    return json.loads(json.dumps(key))


def is_main_process() -> bool:
    """Whether this is the main process of an ``accelerate launch`` (or the only process)."""
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def _row(cfg: ScaleConfig, method: str, prm_name: str, n: int, i: int, problem: dict, res: StepResult) -> dict:
    select = SELECT[method]
    predicted = res.answer(select, seed=cfg.seed)
    info = res.info
    tokens = info["tokens"]
    if method == "sc":  # no process reward was needed
        prm_tokens = 0.0
    else:
        prm_tokens = info.get("prm_lm_tokens", 0.0)
    return {
        "task": cfg.task, "method": method, "prm": prm_name, "n": n, "problem": i, "question": problem["question"],
        "answer": problem["answer"], "predicted": predicted, "correct": predicted == problem["answer"],
        "any_correct": problem["answer"] in res.answers, "select": select, "tokens": tokens, "prm_tokens": prm_tokens,
        "prm_calls": info.get("prm_calls", 0.0), "forwards": info.get("forwards", 0.0), "seconds": info.get("seconds", 0.0),
        "log_z": None if math.isnan(res.log_z) or math.isinf(res.log_z) else res.log_z,
        "temperature": cfg.temperature, "seed": cfg.seed, "model": info.get("model"), "dtype": info.get("dtype"),
        "backend": cfg.backend,
    }


def _key(row: dict) -> tuple:
    return row["method"], row["prm"], row.get("prm_path"), row["n"], row["problem"]
