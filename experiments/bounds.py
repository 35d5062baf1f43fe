"""Bounds on log Z for infilling on the embedded model: base proposal vs learned twists, SIS vs SMC.

Trains one conditional twist per objective (ctl, rl, sixo, fudge, dpg) over infilling
targets whose suffixes are sampled from the joint p0(s, c | x) (amortised over endings),
then runs ``pilm.bounds`` with exact posterior samples from the joint: for each seed a fresh
(middle, suffix) pair, lower bounds from SIS/SMC with K particles and upper bounds from the
same sampler conditioned on the exact middle (IWAE-UB / CSMC-UB). Writes results.jsonl (every
row with the run's settings), results.md (``table``) and bounds.png into --out, and the
twists into --out/twists (reused by a rerun with --reuse-twists). Rerun: make experiment-bounds
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import pilm
from pilm.commands.cli_args import Parser
from pilm.config import TwistTrainingConfig
from pilm.learning.plots import plot_training
from pilm.tasks import joint_samples
from pilm.tasks.infilling import DEFAULT_PROMPT, infilling

TRAINING = {"steps": 60, "batch_size": 16, "lr": 1e-3, "head": "mlp"}
OBJECTIVES = "ctl,rl,sixo,fudge,dpg"


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/bounds")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--suffix-tokens", type=int, default=4)
    p.add_argument("--ks", default="1,4,16,64,256")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--objectives", default=OBJECTIVES)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--reuse-twists", action="store_true", help="load twists saved by an earlier run")
    p.add_configs([TwistTrainingConfig], TRAINING, only=TRAINING)  # pilm train-twist's flags, this study's defaults
    args, (training,) = p.parse_configs([TwistTrainingConfig], TRAINING)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = pilm.load_model()
    horizon, m = args.max_new_tokens, args.suffix_tokens

    # Training conditions: suffixes from the joint, seeded apart from the evaluation pairs.
    pairs = joint_samples(model, DEFAULT_PROMPT, max_new_tokens=horizon, suffix_tokens=m, n=args.steps, seed=10_000)
    train_targets = [infilling(model, suffix=c, max_new_tokens=horizon) for _, c in pairs]
    samplers: dict = {"base": None}
    histories, seconds = {}, {}
    for objective in args.objectives.split(","):
        folder = out / "twists" / objective
        if args.reuse_twists and folder.exists():
            samplers[objective] = pilm.Twist.from_pretrained(folder, model)
            continue
        t0 = time.perf_counter()
        twist = pilm.train_twist(train_targets, objective, config=training, progress=False)
        seconds[objective] = time.perf_counter() - t0
        print(json.dumps({"objective": objective, "train_seconds": seconds[objective]}), flush=True)
        twist.model.save_pretrained(folder)
        samplers[objective], histories[objective] = twist.model, twist.history
    if histories:
        plot_training(histories, out / "training.png", title="conditional twists, infilling")

    ks = [int(k) for k in args.ks.split(",")]
    report = pilm.bounds(train_targets[0], samplers, ks, exact_samples="joint", seeds=args.seeds, seed=0)
    for r in report.rows:
        r["train_seconds"] = seconds.get(r["sampler"])
        r["config"] = {**vars(args), "model": model.name}
    report.to_jsonl(out / "results.jsonl", append=False)
    plot(report, out, f"infilling, T={horizon}, suffix {m} tokens, {args.seeds} seeds")
    from results import write  # experiments/results.py, next to this script

    write(out, "bounds")
    print(report.table())


def plot(report: pilm.BoundsReport, out: Path, title: str) -> None:
    """bounds.png (every sampler) and bounds_zoom.png (without samplers whose upper bound
    is far above the others', e.g. FUDGE's, so the rest can be told apart)."""
    report.plot(out / "bounds.png", title=title)
    far = {r["sampler"] for r in report.rows if r["upper"] > 0}
    zoom = pilm.BoundsReport([r for r in report.rows if r["sampler"] not in far], report.log_z_exact, report.info)
    zoom.plot(out / "bounds_zoom.png", title=f"{title}{' (without ' + ', '.join(sorted(far)) + ')' if far else ''}")


def table(rows: list[dict]) -> str:
    """results.md: the run's settings (the rows' config and seeds), the gap summary, then every row
    (bounds: means over seeds ± 95% Student-t half-widths)."""
    c, seeds = rows[0]["config"], rows[0]["seeds"]
    caption = (f"Infilling on {c['model']}: T = {c['max_new_tokens']} new tokens, suffix of {c['suffix_tokens']} "
               f"tokens sampled from the joint per seed; {seeds} seeds; twists: conditional {c['head']} heads, "
               f"{c['steps']} steps x batch {c['batch_size']}, lr {c['lr']}. Bounds are means over seeds ± 95% "
               "half-widths; gap = upper - lower.")
    return "\n".join([caption, "", *gap_summary(rows)]) + "\n\nAll rows:\n\n" + markdown(rows) + "\n"


def gap_summary(rows: list[dict]) -> list[str]:
    """A markdown table: per sampler, the gap upper - lower at each K (SIS / SMC) and the KL estimates."""
    ks = sorted({r["n_particles"] for r in rows})
    cell = {(r["sampler"], r["method"], r["n_particles"]): r for r in rows}
    head = " | ".join(f"gap K={k} SIS / SMC" for k in ks)
    lines = [f"| sampler | {head} | KL(q‖σ) | KL(σ‖q) |", "|---|" + "---|" * (len(ks) + 2)]
    for name in dict.fromkeys(r["sampler"] for r in rows):
        gaps = " | ".join(f"{cell[name, 'sis', k]['gap']:.2f} / {cell[name, 'smc', k]['gap']:.2f}" for k in ks)
        any_row = cell[name, "sis", ks[0]]
        lines.append(f"| {name} | {gaps} | {any_row['kl_q_sigma']:.2f} | {any_row['kl_sigma_q']:.2f} |")
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["| sampler | method | K | lower | upper | gap | final ESS | distinct ancestors | KL(q‖σ) | KL(σ‖q) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['sampler']} | {r['method'].upper()} | {r['n_particles']} | {r['lower']:.2f} ± {r['lower_ci']:.2f} | "
        f"{r['upper']:.2f} ± {r['upper_ci']:.2f} | {r['gap']:.2f} | {r['ess_final']:.1f} | "
        f"{r['distinct_ancestors']:.1f} | {r['kl_q_sigma']:.2f} | {r['kl_sigma_q']:.2f} |"
        for r in report_order(rows)
    ]
    return "\n".join(lines)


def report_order(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["method"], [x["sampler"] for x in rows].index(r["sampler"]), r["n_particles"]))


if __name__ == "__main__":
    main()
