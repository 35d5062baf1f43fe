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
prefix cache), and each engine leg's seconds per token over the HF leg's. Beside them, the
filter's prompt tokens the engine prefilled per token it drew: vLLM caches a prefix by whole
blocks (32 tokens on a CPU), so each step's request recomputes the tail of its prefix that
fills no block, and on a CPU a prefilled token costs about what a drawn one does.

Then, after the engine above is shut down, ``pilm scale`` (the particle filter, N = 16, on
``--sharded-prompts`` problems) as whole commands, one run each: one process under vLLM's own
core binding, one bound to every core (pilm's default), and two processes under torchrun, each
with an engine on half the cores (``pilm.models.vllm_backend.process_share``); seconds with and without
the engines' start-up, and the peak memory of each command's processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import tempfile
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
        total = lambda key, res=res: sum(r.info.get(key, 0) for r in res)  # noqa: E731
        out[name] = {"seconds": time.perf_counter() - started, "tokens": total("tokens"),
                     "cached_share": total("cached_tokens") / max(1, total("prompt_tokens")),
                     "prefilled_per_drawn": (total("prompt_tokens") - total("cached_tokens")) / max(1, total("drawn_tokens"))}
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


SCALE = """
import sys

from pilm.commands.scaling import run_scale
from pilm.config import ScaleConfig

if __name__ == "__main__":
    cfg = ScaleConfig(backend="vllm", methods=("pf",), n=(16,), problems=int(sys.argv[2]), max_rows=int(sys.argv[3]),
                      seed=int(sys.argv[4]), engine=("max_model_len=1024",))
    run_scale(cfg, sys.argv[1], progress=False)
"""


def scale_run(folder: Path, launcher: list[str], bind: str | None, prompts: int, seed: int) -> dict:
    """``pilm scale`` (the particle filter, N = 16, on ``prompts`` problems in two blocks) as a
    command of its own: its wall-clock seconds (engine start-up included), the seconds its
    blocks report (the slowest process's sum when processes run side by side), and the peak
    resident memory of its whole process tree."""
    script = folder / "scale_run.py"
    script.write_text(SCALE)
    env = {**os.environ, **({"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {})}
    out = folder / f"run{len(list(folder.glob('run*')))}"
    started, peak = time.perf_counter(), 0.0
    log = folder / f"{out.name}.log"
    with open(log, "w") as sink:  # a file, not a pipe: nothing reads a pipe while the loop polls
        proc = subprocess.Popen([*launcher, str(script), str(out), str(prompts), str(prompts * 16 // 2), str(seed)],
                                env=env, stdout=sink, stderr=subprocess.STDOUT)
        tree = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, rss_mib([tree.pid, *(c.pid for c in tree.children(recursive=True))]))
            time.sleep(0.5)
    if proc.returncode:
        raise RuntimeError(log.read_text()[-4000:])
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    blocks: dict[int, float] = {}
    for r in rows:  # each row reports its problem's share of its block's seconds
        b = r["problem"] // (prompts // 2)
        blocks[b] = blocks.get(b, 0.0) + r["seconds"]
    parallel = len(launcher) > 1
    return {"seconds": seconds, "block_seconds": max(blocks.values()) if parallel else sum(blocks.values()),
            "rows": len(rows), "peak_mib": peak,
            "bind": bind or "half the cores each (process_share)"}


def sharded_legs(folder: Path, prompts: int, seed: int) -> dict:
    """One process under vLLM's own core binding ("auto"), one bound to every core (pilm's
    default alone), and two processes under torchrun, half the cores each
    (``process_share``), on the same problems and seeds."""
    import sys

    with socket.socket() as free:  # a port of its own for torchrun's rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return {"one_process_vllm_auto": scale_run(folder, [sys.executable], "auto", prompts, seed),
            "one_process_every_core": scale_run(folder, [sys.executable], ",".join(
                str(c) for c in sorted(os.sched_getaffinity(0))), prompts, seed),
            "two_processes": scale_run(folder, torchrun, None, prompts, seed)}


def rss_mib(pids) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def table(report: dict) -> str:
    r, sh = report["ratios"], report["sharded"]
    lines = ["| measure | median over rounds |", "|---|---|",
             f"| particle filter on vLLM / vLLM generating as many tokens | {r['pf_over_generate_vllm']:.2f} |",
             f"| the filter's prompt tokens the engine prefilled (not cached), per drawn token | "
             f"{r['prefilled_per_drawn']:.2f} |",
             f"| particle filter: vLLM seconds per token / HF seconds per token | {r['pf_vllm_over_hf_per_token']:.2f} |",
             f"| token SMC: vLLM seconds per token / HF seconds per token | {r['smc_vllm_over_hf_per_token']:.2f} |",
             f"| share of the filter's prompt tokens served by vLLM's prefix cache | {r['cached_share']:.2f} |",
             f"| memory: vLLM engine processes (MiB) | {report['memory_mib']['vllm_engine']:.0f} |",
             f"| memory: this process with the HF model (MiB) | {report['memory_mib']['this_process']:.0f} |"]
    lines += ["", f"pilm scale, particle filter N = 16 on {report['sharded_prompts']} problems (one run each):", "",
              "| run | seconds (with engine start-up) | seconds in blocks | peak memory of its processes (MiB) |",
              "|---|---|---|---|"]
    lines += [f"| {name.replace('_', ' ')} (binding {v['bind']}) | {v['seconds']:.0f} | {v['block_seconds']:.0f} | "
              f"{v['peak_mib']:.0f} |" for name, v in sh.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/engines")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sharded-prompts", type=int, default=64)
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
        "prefilled_per_drawn": statistics.median(r["pf_vllm"]["prefilled_per_drawn"] for r in rounds),
    }
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__,
                          "dtype": engine.dtype_name, "threads": torch.get_num_threads()},
              "prompts": a.prompts, "particles": a.particles, "rounds": rounds, "ratios": ratios,
              "memory_mib": {"vllm_engine": rss_mib(engine_pids), "this_process": rss_mib([os.getpid()])}}
    engine.close()
    with tempfile.TemporaryDirectory() as folder:  # after the engine above is shut down: the legs have the machine
        report.update(sharded_prompts=a.sharded_prompts, sharded=sharded_legs(Path(folder), a.sharded_prompts, seed=7))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
