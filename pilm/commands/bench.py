"""SMC against transformers ``generate`` on the same model, in one process.

Both legs draw N x T tokens by ancestral sampling from the same prompt with the same
dtype and thread setting; they alternate ``repeats`` times and the fastest round of each
is kept (the machine is shared and noisy, so only ratios are reported). The SMC leg uses
a prefix-aware potential (no digits, checked on every particle at every step) and
``ess_threshold=1.0``, so it resamples and reindexes the KV cache at every step.

The fine-tuning legs (``finetune_vs_trl``) compare one SubTB step with one TRL RLOO step.

The particle-filter leg (``particle_filter_vs_generate``) runs a step-level particle filter
with a learned PRM on 16 arithmetic chains x 16 particles against ``generate`` of the same
rows and length.

The batched-prompts leg (``batched_prompts``) runs 64 targets (64 prompts of different
lengths) x 16 particles x 32 tokens as one batch against the same 64 targets one at a time
(each with the seed it has in the batch), alternating; the many-particles leg
(``many_particles``) runs 1,024 particles x 64 tokens of one target and reports its peak
memory.

The masked leg (``masked_smc_over_generate``) runs the same SMC with the masked proposal
(``pilm.proposals.MaskedProposal``: only tokens that keep the regex satisfiable are drawn);
the time its masks take (``Potential.allowed_next``, xgrammar) is reported apart, per step
for all N rows and as a share of the leg.

A third leg runs twisted SMC with an MLP twist head (3 layers, after one CTL step, which is
timed too): the head reads the hidden state of the same forward pass, so it should add
little. Time is compared per drawn token (SMC particles that emit EOS stop early; ``generate`` is
forced to draw all T). Memory is the peak resident-set growth over the level just before
each leg, sampled every millisecond, with glibc told to return freed buffers to the OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch

from ..models.machine import cpu_key
from .bench_host import host_work


class _PeakRSS:
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


def _return_freed_memory_to_os() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large buffers are mmapped, freed to the OS
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: trim the heap top eagerly
    except OSError:
        pass  # not glibc: memory numbers are then coarser


TARGETS = {
    "smc_over_generate": 0.95,
    "twisted_smc_over_generate": 1.15,
    "masked_smc_over_generate": 1.0,
    "pf_over_generate": 1.0,
    "memory_over_generate": 1.0,
    "host_growth_1x64": 1.25,
    "host_growth_16x64": 1.25,
}
"""Each time or memory ratio to ``generate`` that the engine must stay under (lower is better)."""

RATIOS = {
    "smc_over_generate": "SMC with a prefix-scored regex, resampling every step",
    "twisted_smc_over_generate": "twisted SMC (MLP twist head on the same forward's hidden state)",
    "masked_smc_over_generate": "SMC with the masked proposal (xgrammar token masks)",
    "pf_over_generate": "step-level particle filter with a learned PRM",
    "memory_over_generate": "peak memory of SMC over generate's",
    "batched_prompts_speedup": "64 prompts as one batch over one prompt at a time (higher is better)",
    "ctl_step_over_head_update": "one CTL step (sampling included) over one head update on recorded states",
    "subtb_over_trl_rloo": "one SubTB fine-tuning step over one TRL RLOO step, per token",
    "host_ms_per_step_1x64": "the engine's host work per step, forward stubbed, 64 particles (ms)",
    "host_ms_per_step_16x64": "the same for 16 targets x 64 particles (ms)",
    "host_growth_1x64": "host work per step at 64 tokens over at 16, 64 particles (flat: 1)",
    "host_growth_16x64": "the same for 16 targets x 64 particles",
}


def table(report: dict) -> str:
    """The report as markdown: each ratio with what it compares and its target, then the setting."""
    lines = ["| ratio | compares | value | target |", "|---|---|---|---|"]
    for key, what in RATIOS.items():
        value = report.get(key)
        if value is None:  # a leg this report did not run
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        target = f"≤ {TARGETS[key]}" + (" ✓" if value <= TARGETS[key] else " ✗") if key in TARGETS else "–"
        lines.append(f"| `{key}` | {what} | {shown} | {target} |")
    setting = ", ".join(f"{k} {report[k]}" for k in ("machine", "dtype", "threads", "torch", "n_particles",
                                                     "new_tokens") if k in report)
    return (f"Measured on: {setting}; 1-minute load average {report.get('load_average_1min', float('nan')):.2f} "
            "when the main legs ended.\n\n" + "\n".join(lines) + "\n")


def run_benchmark(n_particles: int = 64, new_tokens: int = 32, repeats: int = 2, prompt: str = "The movie was") -> dict:
    from .. import load_model, smc, train_twist
    from ..potentials import Regex
    from ..proposals import MaskedProposal
    from ..target import Target

    _return_freed_memory_to_os()
    model = load_model()
    target = Target(model, prompt, Regex(r"[^0-9]*"), max_new_tokens=new_tokens)
    ids = torch.tensor([list(target.prompt_ids)] * n_particles)

    def generate():
        out = model.hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=model.eos_token_id,
        )
        return (out.shape[1] - ids.shape[1]) * n_particles

    def run_smc(seed: int, twist=None, proposal=None):
        res = smc(target, n_particles, twist=twist, proposal=proposal, ess_threshold=1.0, seed=seed, progress=False,
                  on_extinction="return")
        return sum(len(t) for t in res.tokens), len(res.resampled_at)

    mask_seconds = []
    allowed_next = target.potential.allowed_next

    def timed_allowed_next(seqs, stop=None):  # the masked leg's mask time, measured where it is spent
        t0 = time.perf_counter()
        out = allowed_next(seqs, stop)
        mask_seconds.append(time.perf_counter() - t0)
        return out

    target.potential.allowed_next = timed_allowed_next

    twist = train_twist(target, "ctl", steps=1, batch_size=32, lr=1e-3, seed=0, progress=False)
    ctl_step_seconds = twist.history[-1]["seconds"]
    head_update_seconds = _head_update_seconds(target, twist)
    torch.manual_seed(0)
    generate()  # warm-up of every leg (allocator, kernels)
    run_smc(0)
    run_smc(0, twist)
    run_smc(0, proposal=MaskedProposal())
    gen_times, smc_times, twisted_times, gen_mem, smc_mem = [], [], [], [], []
    masked = []  # (seconds per token, mask seconds per step, mask share) per round
    resamples = 0
    for r in range(repeats):
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            tokens = generate()
            gen_times.append((time.perf_counter() - t0) / tokens)
        gen_mem.append(mem.growth)
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            tokens, resamples = run_smc(r + 1)
            smc_times.append((time.perf_counter() - t0) / tokens)
        smc_mem.append(mem.growth)
        t0 = time.perf_counter()
        tokens, _ = run_smc(r + 1, twist)
        twisted_times.append((time.perf_counter() - t0) / tokens)
        mask_seconds.clear()
        t0 = time.perf_counter()
        tokens, _ = run_smc(r + 1, proposal=MaskedProposal())
        seconds = time.perf_counter() - t0
        masked.append((seconds / tokens, sum(mask_seconds) / len(mask_seconds), sum(mask_seconds) / seconds))
    per_token, mask_per_step, mask_share = min(masked)
    return {
        "smc_over_generate": min(smc_times) / min(gen_times),
        "twisted_smc_over_generate": min(twisted_times) / min(gen_times),
        "masked_smc_over_generate": per_token / min(gen_times),
        "masked_mask_ms_per_step": 1e3 * mask_per_step,
        "masked_mask_share": mask_share,
        "ctl_step_seconds": ctl_step_seconds,
        "head_update_seconds": head_update_seconds,
        "ctl_step_over_head_update": ctl_step_seconds / head_update_seconds,
        "memory_over_generate": min(smc_mem) / max(min(gen_mem), 1),
        "generate_ms_per_token": 1e3 * min(gen_times),
        "smc_ms_per_token": 1e3 * min(smc_times),
        "generate_peak_mb": min(gen_mem) / 2**20,
        "smc_peak_mb": min(smc_mem) / 2**20,
        "smc_resampling_steps": resamples,
        "n_particles": n_particles,
        "new_tokens": new_tokens,
        "dtype": str(model.dtype).removeprefix("torch."),
        "machine": cpu_key(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        **_in_a_fresh_process("batched_prompts"),
        **_in_a_fresh_process("particle_filter_vs_generate"),
        **many_particles(model),
        **finetune_vs_trl(),
        **host_work(),
    }


def _head_update_seconds(target, twist, batch_size: int = 32, repeats: int = 5) -> float:
    """One CTL update of a twist head on the hidden states of a batch already drawn (what
    ``train_twist(reuse=R)`` does R - 1 times per draw): no LM forward, psi at the drawn
    tokens only. The fastest of ``repeats``."""
    from ..learning.objectives import ctl
    from ..learning.twist_trainer import draw, twist_batch

    drawn, _ = draw(target, twist, batch_size, torch.Generator(target.model.device).manual_seed(0), keep_logprobs=False)
    optimizer = torch.optim.AdamW(twist.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = ctl(twist_batch(target, drawn, twist, all_tokens=False))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return min(times)


SUBJECTS = ["The movie", "My neighbour's old dog", "Yesterday the weather in the mountains", "The new phone",
            "Our small village bakery", "The lecture on quantum computing this morning", "Her first novel", "The game"]
VERBS = ["was", "seemed to everyone who saw it", "turned out", "felt", "is honestly", "became, after a while,",
         "looked", "sounded"]


def _in_a_fresh_process(leg: str) -> dict:
    """Run ``leg`` (a function of the model in this module) in a child process with the
    allocator's default settings: the memory legs tell glibc to return every freed buffer
    to the OS, which makes each large allocation page-fault anew and would tax the leg with
    the largest tensors (1,024 rows of 49k log-probabilities) more than its rival."""
    code = (f"import json; from pilm import load_model; from {__name__} import {leg}; "
            f"print(json.dumps({leg}(load_model())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    times = {"batched": [], "sequential": []}
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
    is the share of the filter's forward rows spent on rows waiting at a step boundary. Alternating rounds,
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
    times = {"pf": [], "generate": []}
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


def many_particles(model, n_particles: int = 1024, new_tokens: int = 64) -> dict:
    """Peak memory and time of one target's SMC with ``n_particles`` particles."""
    from .. import smc
    from ..potentials import Regex
    from ..target import Target

    _return_freed_memory_to_os()
    target = Target(model, "The movie was", Regex(r"[^0-9]*"), max_new_tokens=new_tokens)
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        res = smc(target, n_particles, seed=0, progress=False, on_extinction="return")
        seconds = time.perf_counter() - t0
    return {
        "many_particles_shape": f"{n_particles} particles x {new_tokens} tokens",
        "many_particles_peak_mb": mem.growth / 2**20,
        "many_particles_seconds": seconds,
        "many_particles_tokens": sum(len(t) for t in res.tokens),
    }


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

    _return_freed_memory_to_os()
    model = load_model()
    target = Target(model, prompt, FunctionPotential(_reward_text, name="fewer e"), max_new_tokens=new_tokens)
    with _PeakRSS() as mem:
        policy = finetune(target, "subtb", steps=steps, batch_size=batch, lr=1e-4, warmup=1, seed=0,
                          explore=(1.0, 0.0, 0.0), progress=False)
    pilm_mem = mem.growth
    pilm_per_token = min(h["seconds"] / h["tokens"] for h in policy.history[1:])
    del policy

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
            model=hf, reward_funcs=lambda completions, **kw: [_reward_text(c) for c in completions], args=config,
            train_dataset=Dataset.from_dict({"prompt": [prompt] * (batch * steps)}), processing_class=model.tokenizer,
            peft_config=LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=list(DEFAULT_TARGET_MODULES),
                                   task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        with _PeakRSS() as mem, contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs: keep --json clean
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
