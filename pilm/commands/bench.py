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
memory; the long-prompt leg (``long_prompt``) decodes 64 particles x 64 tokens after a
512-token prompt and reports the KV cache it holds over one prompt copy plus the particles'
own tokens (8 when every particle holds its own copy of the prompt), and its time over the time
with a copy of the prompt per row.

The masked leg (``masked_smc_over_generate``) runs the same SMC with the masked proposal
(``pilm.proposals.MaskedProposal``: only tokens that keep the regex satisfiable are drawn);
the time its masks take (``Potential.allowed_next``, xgrammar) is reported apart, per step
for all N rows and as a share of the leg.

A third leg runs twisted SMC with an MLP twist head (3 layers, after one CTL step, which is
timed too): the head reads the hidden state of the same forward pass, and its V-wide output
layer, run in the model's dtype when sampling, costs about what the model's own does. Time
is compared per drawn token (SMC particles that emit EOS stop early; ``generate`` is forced
to draw all T). Memory is the peak resident-set growth over the level just before
each leg, sampled every millisecond, with glibc told to return freed buffers to the OS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import cast

import torch

from ..models.device import seeded_generator
from ..models.machine import cpu_key
from .bench_host import host_work
from .bench_legs import (
    PeakRSS,
    finetune_vs_trl,
    long_prompt,
    many_particles,
    return_freed_memory_to_os,
)

TARGETS = {
    "smc_over_generate": 0.9,
    "twisted_smc_over_generate": 1.05,
    "masked_smc_over_generate": 1.0,
    "pf_over_generate": 1.0,
    "memory_over_generate": 1.0,
    "many_particles_peak_mb": 2500,
    "host_ms_per_step_1x64": 2.0,
    "host_ms_per_step_16x64": 20.0,
    "host_growth_1x64": 1.25,
    "host_growth_16x64": 1.25,
    "long_prompt_cache_over_shared": 1.2,
    "judge_cache_over_none": 1.0,
}
"""Each ratio, time or memory that the engine must stay under (lower is better)."""

RATIOS = {
    "smc_over_generate": "SMC with a prefix-scored regex, resampling every step",
    "twisted_smc_over_generate": "twisted SMC (MLP twist head on the same forward's hidden state)",
    "masked_smc_over_generate": "SMC with the masked proposal (xgrammar token masks)",
    "pf_over_generate": "step-level particle filter with a learned PRM",
    "memory_over_generate": "peak memory of SMC over generate's",
    "many_particles_peak_mb": "peak memory growth of SMC with 1,024 particles x 64 tokens (MB)",
    "batched_prompts_speedup": "64 prompts as one batch over one prompt at a time (higher is better)",
    "ctl_step_over_head_update": "one CTL step (sampling included) over one head update on recorded states",
    "subtb_over_trl_rloo": "one SubTB fine-tuning step over one TRL RLOO step, per token",
    "host_ms_per_step_1x64": "the engine's host work per step, forward stubbed, 64 particles (ms)",
    "host_ms_per_step_16x64": "the same for 16 targets x 64 particles (ms)",
    "host_growth_1x64": "host work per step at 64 tokens over at 16, 64 particles (flat: 1)",
    "host_growth_16x64": "the same for 16 targets x 64 particles",
    "long_prompt_cache_over_shared": "KV cache of 64 particles x 64 tokens on a 512-token prompt over one prompt copy "
                                     "plus the particles' own tokens",
    "long_prompt_time_over_per_row": "that decode's time (the model's kv_cache choice) over a copy of the prompt per row",
    "judge_cache_over_none": "particle filter with the policy as its own judge: time with the judge's prompt cache "
                             "over without",
    "judge_positions_cache_over_none": "the judge's positions run, with the prompt cache over without",
}


def table(report: dict) -> str:
    """The report as markdown: each ratio with what it compares and its target, then the setting."""
    lines = ["| ratio | compares | value | target |", "|---|---|---|---|"]
    for key, what in RATIOS.items():
        value = report.get(key)
        if value is None:  # a leg this report did not run
            continue
        shown = f"{value:.3f}" if value < 100 else f"{value:.0f}"  # MB as whole numbers
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

    return_freed_memory_to_os()
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

    mask_seconds = _timed_masks(cast(Regex, target.potential))
    trained = train_twist(target, "ctl", steps=1, batch_size=32, lr=1e-3, seed=0, progress=False)
    twist, ctl_step_seconds = trained.model, trained.history[-1]["seconds"]
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
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            tokens = generate()
            gen_times.append((time.perf_counter() - t0) / tokens)
        gen_mem.append(mem.growth)
        with PeakRSS() as mem:
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
        **_machine(model),
        **_in_a_fresh_process("batched_prompts"),
        **_in_a_fresh_process("particle_filter_vs_generate"),
        **_in_a_fresh_process("judge_prompt_cache"),
        **many_particles(model),
        **long_prompt(model),
        **finetune_vs_trl(),
        **host_work(),
    }


def _timed_masks(potential) -> list[float]:
    """The masked leg's mask time, measured where it is spent: this one potential's
    ``allowed_next`` is wrapped, and the list it returns fills with each call's seconds."""
    seconds: list[float] = []
    allowed_next = potential.allowed_next

    def timed(seqs, stop=None):
        t0 = time.perf_counter()
        out = allowed_next(seqs, stop)
        seconds.append(time.perf_counter() - t0)
        return out

    potential.allowed_next = timed  # timed on this one instance
    return seconds


def _machine(model) -> dict:
    """What the ratios were measured on: the dtype, the CPU, torch, threads and the load."""
    return {"dtype": str(model.dtype).removeprefix("torch."), "machine": cpu_key(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}


def _head_update_seconds(target, twist, batch_size: int = 32, repeats: int = 5) -> float:
    """One CTL update of a twist head on the hidden states of a batch already drawn (what
    ``train_twist(reuse=R)`` does R - 1 times per draw): no LM forward, psi at the drawn
    tokens only. The fastest of ``repeats``."""
    from ..learning.objectives import ctl
    from ..learning.twist_trainer import draw, twist_batch

    drawn, _ = draw(target, twist, batch_size, seeded_generator(0, target.model.device), keep_logprobs=False)
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


def _in_a_fresh_process(leg: str) -> dict:
    """Run ``leg`` (a function of the model in ``bench_legs``) in a child process with the
    allocator's default settings: the memory legs tell glibc to return every freed buffer
    to the OS, which makes each large allocation page-fault anew and would tax the leg with
    the largest tensors (1,024 rows of 49k log-probabilities) more than its rival."""
    code = (f"import json; from pilm import load_model; from {__package__}.bench_legs import {leg}; "
            f"print(json.dumps({leg}(load_model())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
