"""Twist learning on the embedded model: no twist vs CTL, RL, SIXO, FUDGE, DPG.

For the infilling and sentiment tasks, trains one twist head (--head: MLP by default) per
objective (same steps, batch, learning rate and seed), then runs twisted SMC with N particles
over 10 seeds and reports the mean ESS over steps, the final ESS, mean and variance of log
Z-hat, and the training time. Writes results.jsonl (every row with the run's settings),
results.md (``table``), the training logs and one training-curve PNG per task into --out.
Rerun: make experiment-twists (MLP heads, docs/twists) or make experiment-twists-tied
(tied heads on sentiment, docs/twists_tied)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pilm
from pilm.commands.cli_args import Parser
from pilm.config import TwistTrainingConfig
from pilm.learning.plots import plot_training

TRAINING = {"steps": 80, "batch_size": 16, "lr": 1e-3, "head": "mlp"}
OBJECTIVES = ["ctl", "rl", "sixo", "fudge", "dpg"]


def evaluate(target, twist, n_particles: int, seeds: int) -> dict:
    runs = [pilm.smc(target, n_particles, twist=twist, seed=s, progress=False, on_extinction="return")
            for s in range(seeds)]
    log_z = [r.log_z for r in runs]
    return {
        "ess_mean": statistics.mean(statistics.mean(r.ess) for r in runs),
        "ess_final": statistics.mean(r.ess[-1] for r in runs),
        "log_z_mean": statistics.mean(log_z),
        "log_z_var": statistics.variance(log_z),
    }


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/twists")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--n-particles", type=int, default=16)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--tasks", default="infilling,sentiment")
    p.add_configs([TwistTrainingConfig], TRAINING, only=TRAINING)  # pilm train-twist's flags, this study's defaults
    args, (training,) = p.parse_configs([TwistTrainingConfig], TRAINING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = pilm.load_model()
    tasks = {
        "infilling": lambda: pilm.tasks.infilling(model, max_new_tokens=args.max_new_tokens),
        "sentiment": lambda: pilm.tasks.sentiment(model, "positive", beta=10.0, max_new_tokens=args.max_new_tokens),
    }
    rows = []
    for task in args.tasks.split(","):
        target = tasks[task]()
        histories = {}
        row = {"task": task, "method": "none", "train_seconds": 0.0, **evaluate(target, None, args.n_particles, args.seeds)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for objective in OBJECTIVES:
            t0 = time.perf_counter()
            trained = pilm.train_twist(target, objective, config=training, progress=False,
                                       log_path=out / f"train_{task}_{objective}.jsonl")
            seconds = time.perf_counter() - t0
            twist, histories[objective] = trained.model, trained.history
            row = {"task": task, "method": objective, "train_seconds": seconds,
                   **evaluate(target, twist, args.n_particles, args.seeds)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        plot_training(histories, out / f"training_{task}.png", title=task)
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps({**r, "config": {**vars(args), "model": model.name}}) + "\n" for r in rows)
    from results import write  # experiments/results.py, next to this script

    print(write(out, "twists")["results.md"])


HEADS = {"mlp": "MLP", "linear": "linear", "tied": "tied"}
"""Twist heads as the caption names them."""


def table(rows: list[dict]) -> str:
    """results.md: the run's settings (from the rows' config), then per task and twist the mean
    ESS over steps, the final ESS, mean and variance of log Z-hat over seeds, training seconds."""
    c = rows[0]["config"]
    lines = [
        f"N = {c['n_particles']} particles, {c['seeds']} seeds, T = {c['max_new_tokens']} tokens; each twist: "
        f"{HEADS[c['head']]} head, {c['steps']} steps x batch {c['batch_size']}, lr {c['lr']}.",
        "",
        "| task | twist | mean ESS | final ESS | mean log Ẑ | var log Ẑ | training (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['task']} | {r['method']} | {r['ess_mean']:.1f} | {r['ess_final']:.1f} | {r['log_z_mean']:.2f} | "
        f"{r['log_z_var']:.3f} | {r['train_seconds']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
