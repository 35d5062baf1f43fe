"""The benchmark's legs that run apart from the main SMC-against-``generate`` comparison:
many prompts in one batch, the step-level particle filter, many particles, fine-tuning against
TRL; and the memory probe they share (``PeakRSS``)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import cast

import torch

from ..models.device import seeded_generator


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (bytes)."""

    _page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        gc.collect()
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.base


def return_freed_memory_to_os() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large buffers are mmapped, freed to the OS
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: trim the heap top eagerly
    except OSError:
        pass  # not glibc: memory numbers are then coarser


SUBJECTS = ["The movie", "My neighbour's old dog", "Yesterday the weather in the mountains", "The new phone",
            "Our small village bakery", "The lecture on quantum computing this morning", "Her first novel", "The game"]
VERBS = ["was", "seemed to everyone who saw it", "turned out", "felt", "is honestly", "became, after a while,",
         "looked", "sounded"]


def batched_prompts(model, n_prompts: int = 64, n_particles: int = 16, new_tokens: int = 32, repeats: int = 1) -> dict:
    """Time per drawn token of SMC on ``n_prompts`` targets in one batch over one target at a
    time (same seeds per target, alternating rounds, the fastest of each kept)."""
    from .. import smc
    from ..inference.batch import seeded_generators
    from ..potentials import Regex
    from ..target import Target

    prompts = [f"{s} {v}" for s in SUBJECTS for v in VERBS][:n_prompts]
    targets = [Target(model, p, Regex(r"[^0-9]*"), max_new_tokens=new_tokens) for p in prompts]
    seeds = [g.initial_seed() for g in seeded_generators(0, len(targets))]

    def batched() -> int:
        return sum(len(t) for r in smc(targets, n_particles, seed=0, progress=False, on_extinction="return")
                   for t in r.tokens)

    def one_at_a_time() -> int:
        return sum(len(t) for target, s in zip(targets, seeds, strict=True)
                   for t in smc(target, n_particles, seed=s, progress=False, on_extinction="return").tokens)

    smc(targets[:2], n_particles, seed=0, progress=False, on_extinction="return")  # warm-up
    times: dict[str, list[float]] = {"batched": [], "sequential": []}
    for _ in range(repeats):
        for name, leg in (("batched", batched), ("sequential", one_at_a_time)):
            t0 = time.perf_counter()
            tokens = leg()
            times[name].append((time.perf_counter() - t0) / tokens)
    return {
        "batched_prompts_speedup": min(times["sequential"]) / min(times["batched"]),
        "batched_prompts_ms_per_token": 1e3 * min(times["batched"]),
        "one_prompt_at_a_time_ms_per_token": 1e3 * min(times["sequential"]),
        "batched_prompts_shape": f"{n_prompts} prompts x {n_particles} particles x {new_tokens} tokens",
    }


def particle_filter_vs_generate(model, n_problems: int = 16, n_particles: int = 16, repeats: int = 2) -> dict:
    """A step-level particle filter ("paper" weights, resampling at every step boundary) with a
    learned PRM (a tied value head read off the policy's hidden states; its weights do not
    change the cost, so it is not trained here) on ``n_problems`` arithmetic chains x
    ``n_particles``, against ``generate`` sampling the same rows (the same prompts, each
    ``n_particles`` times) for as many tokens as the filter's longest chain, every row forced
    to that length. ``pf_over_generate`` compares time per drawn token (as the SMC legs do);
    ``pf_wall_over_generate`` the wall time of the two legs (generate draws every row to the
    longest chain's length, the filter stops each chain at its answer); ``pf_held_row_share``
    is the share of the rows handed to the model's steps that wait at a step boundary (the
    shared-prompt cache leaves them out of the forward). Alternating rounds,
    the fastest of each kept."""
    from .. import particle_filter
    from ..tasks import arithmetic_chain
    from ..twists import Twist

    problems = arithmetic_chain.problems(n_problems, seed=0)
    targets = [arithmetic_chain.target(model, p["question"]) for p in problems]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prm = Twist.for_model(model, kind="tied", layers=2, output="log_sigmoid")
    prompts = [list(t.prompt_ids) for t in targets for _ in range(n_particles)]
    width = max(map(len, prompts))
    pad = model.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def pf() -> tuple[int, int, float]:
        res = particle_filter(targets, prm, n_particles, temperature=0.8, seed=0)
        held = sum(r.info["held_rows"] for r in res) / sum(r.info["forward_rows"] for r in res)
        return max(len(t) for r in res for t in r.tokens), sum(len(t) for r in res for t in r.tokens), held

    def generate(length: int) -> None:
        model.hf.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=length, min_new_tokens=length,
                          top_k=0, top_p=1.0, temperature=0.8, pad_token_id=pad)

    longest, drawn, held = pf()  # warm-up, and the length generate must match
    generate(longest)
    times: dict[str, list[float]] = {"pf": [], "generate": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        pf()
        times["pf"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate(longest)
        times["generate"].append(time.perf_counter() - t0)
    pf_ms, gen_ms = 1e3 * min(times["pf"]) / drawn, 1e3 * min(times["generate"]) / (len(prompts) * longest)
    return {
        "pf_over_generate": pf_ms / gen_ms,
        "pf_wall_over_generate": min(times["pf"]) / min(times["generate"]),
        "pf_ms_per_token": pf_ms,
        "pf_generate_ms_per_token": gen_ms,
        "pf_held_row_share": held,
        "pf_shape": f"{n_problems} problems x {n_particles} particles, longest chain {longest} tokens, "
                    f"{drawn} tokens drawn (generate: {len(prompts) * longest})",
    }


def judge_prompt_cache(model, n_problems: int = 8, n_particles: int = 8, repeats: int = 2) -> dict:
    """A step-level particle filter on ``n_problems`` arithmetic chains x ``n_particles`` whose
    PRM is the policy as its own judge (``LMJudge``), with the judge's prompt cache and with a
    cache of 0 bytes (each call then shares only its own prompts' prefix, as before the cache):
    ``judge_cache_over_none`` is the filter's time with the cache over without,
    ``judge_positions_cache_over_none`` the judge positions run. The same seed in both;
    alternating rounds, the fastest of each kept."""
    from .. import particle_filter
    from ..prm import LMJudge
    from ..tasks import arithmetic_chain

    targets = [arithmetic_chain.target(model, p["question"]) for p in arithmetic_chain.problems(n_problems, seed=0)]

    def pf(cache_bytes: int | None) -> int:
        judge = LMJudge(model, cache_bytes=cache_bytes)
        particle_filter(targets, judge, n_particles, temperature=0.8, seed=0)
        return judge.lm_tokens

    positions = {"cache": pf(None), "none": pf(0)}  # warm-up
    times: dict[str, list[float]] = {"cache": [], "none": []}
    for _ in range(repeats):
        for leg, cache_bytes in (("cache", None), ("none", 0)):
            t0 = time.perf_counter()
            pf(cache_bytes)
            times[leg].append(time.perf_counter() - t0)
    return {
        "judge_cache_over_none": min(times["cache"]) / min(times["none"]),
        "judge_positions_cache_over_none": positions["cache"] / positions["none"],
        "judge_shape": f"{n_problems} problems x {n_particles} particles, judge positions {positions['cache']} "
                       f"(without the cache {positions['none']})",
    }


def many_particles(model, n_particles: int = 1024, new_tokens: int = 64) -> dict:
    """Peak memory and time of one target's SMC with ``n_particles`` particles."""
    from .. import smc
    from ..potentials import Regex
    from ..target import Target

    return_freed_memory_to_os()
    target = Target(model, "The movie was", Regex(r"[^0-9]*"), max_new_tokens=new_tokens)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        res = smc(target, n_particles, seed=0, progress=False, on_extinction="return")
        seconds = time.perf_counter() - t0
    return {
        "many_particles_shape": f"{n_particles} particles x {new_tokens} tokens",
        "many_particles_peak_mb": mem.growth / 2**20,
        "many_particles_seconds": seconds,
        "many_particles_tokens": sum(len(t) for t in res.tokens),
    }


def long_prompt(model, prompt_tokens: int = 512, n_particles: int = 64, new_tokens: int = 64, repeats: int = 2) -> dict:
    """The KV cache one target holds after ``new_tokens`` steps of ``n_particles`` particles on a
    ``prompt_tokens``-token prompt, over what sharing the prompt would hold: one prompt copy plus
    each particle's own tokens (1 is that; n_particles x (prompt + new) / (prompt + n x new) is a
    copy of the prompt per particle); and the decode's time with the model's own ``kv_cache``
    choice over the time with a copy per row (``HFModel.kv_cache``), alternating ``repeats``
    times, the fastest of each kept. Each decode resamples every fourth step."""
    from ..models import decode_step

    g = seeded_generator(0, model.device)
    prompt = torch.randint(10, model.vocab_size, (prompt_tokens,), generator=g, device=model.device).tolist()
    tokens = torch.randint(10, model.vocab_size, (new_tokens, n_particles), generator=g, device=model.device)
    parents = torch.randint(0, n_particles, (new_tokens, n_particles), generator=g, device=model.device)
    rows = torch.arange(n_particles, device=model.device)

    def decode():
        state = model.start(prompt, n_particles)
        for t in range(new_tokens):
            state = decode_step(model, state, parents[t] if t % 4 == 3 else rows, tokens[t])
        return state

    held = decode().cache.nbytes()
    per_token = model.start(prompt, 1).cache.nbytes() / prompt_tokens  # what one row holds per position
    own: list[float] = []
    per_row: list[float] = []
    chosen = model.kv_cache
    for _ in range(repeats):
        for how, times in ((chosen, own), ("per-row", per_row)):
            model.kv_cache = how
            t0 = time.perf_counter()
            decode()
            times.append(time.perf_counter() - t0)
    model.kv_cache = chosen
    return {"long_prompt_shape": f"{prompt_tokens}-token prompt, {n_particles} particles x {new_tokens} tokens",
            "long_prompt_cache_mb": held / 2**20,
            "long_prompt_cache_over_shared": held / (per_token * (prompt_tokens + n_particles * new_tokens)),
            "long_prompt_kv_cache": "shared" if model.shares_prefixes else "per-row",
            "long_prompt_time_over_per_row": min(own) / min(per_row)}


def _reward_text(text: str) -> float:
    """The shared cheap reward of the fine-tuning legs: fewer letters 'e' is better."""
    return -0.1 * text.count("e")


def finetune_vs_trl(batch: int = 8, new_tokens: int = 64, steps: int = 3, prompt: str = "The movie was") -> dict:
    """One SubTB step of ``pilm.finetune`` against one RLOO step of TRL, same model, LoRA
    (rank 64, alpha 16, dropout 0.1 on q/k/v/o), batch, prompt, completion length cap and
    reward (``_reward_text``; TRL with a KL coefficient, so it runs the reference forward
    that SubTB's p0 reward also needs). Each leg runs ``steps`` steps; the fastest step
    after the first is kept, per completion token (lengths vary with EOS). Needs ``trl``
    (``pip install -e '.[bench]'``)."""
    try:
        import trl
    except ImportError:
        return {"subtb_over_trl_rloo": "skipped: pip install -e '.[bench]' for trl"}
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from .. import finetune, load_model
    from ..models.adapter import DEFAULT_TARGET_MODULES
    from ..models.registry import embedded_path
    from ..potentials import FunctionPotential
    from ..target import Target

    return_freed_memory_to_os()
    model = load_model()
    target = Target(model, prompt, FunctionPotential(_reward_text, name="fewer e"), max_new_tokens=new_tokens)
    with PeakRSS() as mem:
        trained = finetune(target, "subtb", steps=steps, batch_size=batch, lr=1e-4, warmup=1, seed=0,
                           explore=(1.0, 0.0, 0.0), progress=False)
    pilm_mem = mem.growth
    pilm_per_token = min(h["seconds"] / h["tokens"] for h in trained.history[1:])
    del trained

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.lengths, self._t = [], [], 0.0

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    hf = AutoModelForCausalLM.from_pretrained(embedded_path(), dtype=model.dtype)
    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        config = RLOOConfig(output_dir=out, per_device_train_batch_size=batch, num_generations=batch,
                            max_completion_length=new_tokens, max_steps=steps, learning_rate=1e-4, beta=0.04,
                            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                            temperature=1.0, top_p=1.0, top_k=0, disable_tqdm=True,
                            gradient_checkpointing=False)  # pilm does not recompute activations either
        trainer = RLOOTrainer(
            model=hf,  # TRL types a reward's scores list[float | None], an invariant list
            reward_funcs=cast("Callable[..., list[float | None]]",
                              lambda completions, **kw: [_reward_text(c) for c in completions]),
            args=config,
            train_dataset=Dataset.from_dict({"prompt": [prompt] * (batch * steps)}), processing_class=model.tokenizer,
            peft_config=LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=list(DEFAULT_TARGET_MODULES),
                                   task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        with PeakRSS() as mem, contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs: keep --json clean
            trainer.train()
    # TRL logs the mean completion length per step; EOS included like pilm's count.
    trl_per_token = min(t / (batch * float(n)) for t, n in zip(timer.times[1:], timer.lengths[1:], strict=False))
    return {
        "subtb_over_trl_rloo": pilm_per_token / trl_per_token,
        "subtb_ms_per_token": 1e3 * pilm_per_token,
        "trl_rloo_ms_per_token": 1e3 * trl_per_token,
        "subtb_peak_mb": pilm_mem / 2**20,
        "trl_rloo_peak_mb": mem.growth / 2**20,
        "trl_version": trl.__version__,
    }
