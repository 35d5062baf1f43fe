"""What the vLLM backend costs (issue 30's bench legs), in one process, legs interleaved, as ratios.

Run in the engines' environment (``make test-engines`` builds it): ``.venv-vllm/bin/python
experiments/engine_bench.py --out docs/engines``. It writes ``bench.json`` (every leg of every
round, the machine) and ``bench.md`` (the table, generated from it). Legs, on arithmetic chains
of the embedded model, M prompts x N particles:

* ``pf_vllm``: the step-level particle filter (paper weights, exact step verifier) on the engine;
* ``generate_vllm``: the engine's own generation of as many tokens (M x N requests, each for
  the filter's mean chain length, no stop): what sampling alone costs there;
* ``pf_hf``: the same filter on transformers;
* ``smc_vllm`` / ``smc_hf``: bootstrap token SMC (one-token requests on the engine).

Ratios: pf_vllm / generate_vllm (the issue's target: <= 1.2, reached only if survivors hit the
prefix cache), and each engine leg's seconds per token over the HF leg's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import psutil
import torch

import pilm
from pilm.tasks import arithmetic_chain as chain


def legs(engine, hf, m: int, n: int, seed: int) -> dict:
    """One round: every leg once, in a fixed order; seconds and tokens of each."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    problems = chain.problems(m, seed=seed)
    out = {}
    for name, model in (("pf_vllm", engine), ("pf_hf", hf)):
        targets = [chain.target(model, p["question"]) for p in problems]
        started = time.perf_counter()
        res = pilm.particle_filter(targets, chain.step_verifier(), n, temperature=0.8, seed=seed)
        out[name] = {"seconds": time.perf_counter() - started, "tokens": sum(r.info["tokens"] for r in res),
                     "cached_share": (sum(r.info.get("cached_tokens", 0) for r in res)
                                      / max(1, sum(r.info.get("prompt_tokens", 0) for r in res)))}
    per_chain = max(1, round(out["pf_vllm"]["tokens"] / (m * n)))
    prompts = [TokensPrompt(prompt_token_ids=chain.target(engine, p["question"]).prompt_ids) for p in problems]
    params = [SamplingParams(temperature=0.8, top_p=1.0, top_k=0, seed=seed * 10_000 + k, max_tokens=per_chain,
                             ignore_eos=True, detokenize=False) for k in range(m * n)]
    started = time.perf_counter()
    gen = engine.llm.generate([q for q in prompts for _ in range(n)], params, use_tqdm=False)
    out["generate_vllm"] = {"seconds": time.perf_counter() - started,
                            "tokens": sum(len(o.outputs[0].token_ids) for o in gen)}
    for name, model in (("smc_vllm", engine), ("smc_hf", hf)):
        targets = [pilm.Target(model, p["question"], max_new_tokens=16) for p in problems]
        started = time.perf_counter()
        res = pilm.smc(targets, n, seed=seed, progress=False)
        out[name] = {"seconds": time.perf_counter() - started, "tokens": sum(r.info["compute"]["tokens"] for r in res)}
    return out


def rss_mib(pids) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def table(report: dict) -> str:
    r = report["ratios"]
    lines = ["| measure | median over rounds |", "|---|---|",
             f"| particle filter on vLLM / vLLM generating as many tokens | {r['pf_over_generate_vllm']:.2f} |",
             f"| particle filter: vLLM seconds per token / HF seconds per token | {r['pf_vllm_over_hf_per_token']:.2f} |",
             f"| token SMC: vLLM seconds per token / HF seconds per token | {r['smc_vllm_over_hf_per_token']:.2f} |",
             f"| share of the filter's prompt tokens served by vLLM's prefix cache | {r['cached_share']:.2f} |",
             f"| memory: vLLM engine processes (MiB) | {report['memory_mib']['vllm_engine']:.0f} |",
             f"| memory: this process with the HF model (MiB) | {report['memory_mib']['this_process']:.0f} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/engines")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = pilm.load_model(backend="vllm", max_model_len=1024)
    hf = pilm.load_model(dtype=engine.dtype_name)  # the same dtype on both
    engine_pids = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
    legs(engine, hf, 2, 2, seed=99)  # warm-up: first calls compile and allocate
    rounds = [legs(engine, hf, a.prompts, a.particles, seed=k) for k in range(a.rounds)]
    per_token = lambda r, k: r[k]["seconds"] / r[k]["tokens"]  # noqa: E731
    ratios = {
        "pf_over_generate_vllm": statistics.median(per_token(r, "pf_vllm") / per_token(r, "generate_vllm")
                                                   for r in rounds),
        "pf_vllm_over_hf_per_token": statistics.median(per_token(r, "pf_vllm") / per_token(r, "pf_hf") for r in rounds),
        "smc_vllm_over_hf_per_token": statistics.median(per_token(r, "smc_vllm") / per_token(r, "smc_hf")
                                                        for r in rounds),
        "cached_share": statistics.median(r["pf_vllm"]["cached_share"] for r in rounds),
    }
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__,
                          "dtype": engine.dtype_name, "threads": torch.get_num_threads()},
              "prompts": a.prompts, "particles": a.particles, "rounds": rounds, "ratios": ratios,
              "memory_mib": {"vllm_engine": rss_mib(engine_pids), "this_process": rss_mib([os.getpid()])}}
    engine.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
