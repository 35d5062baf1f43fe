"""Do learned twists pay off? The bidirectional gap on log Z against training time (issue 14).

Two targets (``--target``):
  infilling  the docs/bounds setting: T = 8 new tokens, 4-token endings sampled from the joint,
             one conditional twist trained over endings, exact posterior samples from the joint;
  toxicity   a rare event: phi = P(offensive)^2 (alt-profanity-check) of a 10-token continuation
             of "The quarterly report shows that" (log Z ≈ -5.5 by 2,048 base samples), exact
             samples by rejection.

One twist is trained in stages (``--stages``: cumulative optimiser steps; a checkpoint carries
each stage into the next). After each stage, ``pilm.bounds`` runs the twist at K = --twist-k on
the same seeds (the same targets and exact samples) as the base proposal at --base-ks, so the
per-seed gaps pair. Then diagnostics for the final twist: final ESS and ESS per step, and the
calibration of log psi_t against Monte Carlo estimates of log E[phi | s_1:t] on held-out
prefixes. Everything lands in --out/results.jsonl, every row with the run's settings (a rerun
skips rows already there, so the run is resumable), gap_vs_seconds.png and results.md
(``table``). Rerun: make experiment-payoff
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

import pilm
from pilm.commands.cli_args import Parser
from pilm.config import TwistTrainingConfig
from pilm.evaluation import calibration_summary, exact_sigma_samples, twist_calibration
from pilm.evaluation.metrics import t_interval
from pilm.inference.result import read_jsonl
from pilm.inference.smc import run_smc
from pilm.learning.checkpoint import RESUME_ELSEWHERE, claim
from pilm.tasks import joint_samples
from pilm.tasks.classifiers import sentiment, toxicity
from pilm.tasks.infilling import DEFAULT_PROMPT, infilling
from pilm.twists.head import condition_ids

TOXIC_PROMPT = "The quarterly report shows that"
TRAINING = {"objective": "ctl", "head": "tied", "init": "base", "batch_size": 32, "reuse": 4, "lr": 3e-4}


def make_target(name: str, model, steps: int) -> tuple[pilm.Target, list[pilm.Target], str]:
    """The evaluation target, the training targets (one per step) and how exact samples come."""
    if name == "infilling":
        pairs = joint_samples(model, DEFAULT_PROMPT, max_new_tokens=8, suffix_tokens=4, n=steps, seed=10_000)
        train = [infilling(model, suffix=c, max_new_tokens=8) for _, c in pairs]
        return train[0], train, "joint"
    if name == "sentiment":  # the twists table's target (docs/twists): phi = P(positive)^10 of 8 tokens
        target = sentiment(model, "positive", beta=10.0, max_new_tokens=8)
        return target, [target], "rejection"
    target = toxicity(model, "toxic", beta=2.0, prompt=TOXIC_PROMPT, max_new_tokens=10)
    return target, [target], "rejection"


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=["infilling", "toxicity"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="0,25,50,100,200", help="cumulative optimiser steps at which to bound")
    p.add_argument("--twist-k", type=int, default=16)
    p.add_argument("--base-ks", default="16,64,256")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--calibration-prefixes", type=int, default=24)
    p.add_configs([TwistTrainingConfig], TRAINING, only=TRAINING)  # pilm train-twist's flags, this study's defaults
    args, (training,) = p.parse_configs([TwistTrainingConfig], TRAINING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    have = {(r["kind"], r.get("sampler"), r.get("stage"), r.get("n_particles"))
            for r in read_jsonl(results, missing_ok=True)}
    model = pilm.load_model()
    claim(out, {**{k: v for k, v in vars(args).items() if k not in ("out", "stages", "base_ks")}, "model": model.name,
                 "dtype": model.dtype_name}, remedy=RESUME_ELSEWHERE)  # rows of other settings never mix
    config = {**vars(args), "model": model.name}

    def write(row: dict) -> None:
        with open(results, "a") as f:
            f.write(json.dumps({**row, "config": config}) + "\n")

    stages = [int(s) for s in args.stages.split(",")]
    target, train, exact_samples = make_target(args.target, model, max(stages))
    pairs = exact_pairs(target, exact_samples, args.seeds, out / "exact_samples.json")
    bound_kw = dict(exact_samples=pairs, methods=("smc",), seed=0, progress=False)
    missing = [int(k) for k in args.base_ks.split(",") if ("bounds", "base", None, int(k)) not in have]
    if missing:
        report = pilm.bounds(target, {"base": None}, missing, **bound_kw)
        for row in report.rows:
            write({"kind": "bounds", "sampler": "base", "stage": None, "train_seconds": 0.0, **row})
        print(report.table(), flush=True)

    if ("diagnostics", None, None, None) in have and all(("bounds", "twist", s, args.twist_k) in have for s in stages):
        write_report(out, args)  # nothing left to run: no need for the twist
        return
    twist = None
    for stage in stages:  # the last stage, already trained, resumes from its checkpoint at no cost
        bounded = ("bounds", "twist", stage, args.twist_k) in have
        if bounded and stage != stages[-1]:
            continue
        if stage == 0:
            twist = pilm.Twist.for_model(model, kind=args.head, init=args.init, conditional=args.target == "infilling")
            history = []
        else:
            trained = pilm.train_twist(train, config=training, steps=stage, checkpoint_dir=out / "checkpoint",
                                       checkpoint_every=25, progress=False)
            twist, history = trained.model, trained.history
        if len(history) != stage:
            raise SystemExit(f"the checkpoint in {out / 'checkpoint'} is at step {len(history)}, past stage {stage}: "
                             "give stages up to it (or a new --out)")
        if bounded:
            continue
        report = pilm.bounds(target, {"twist": twist}, [args.twist_k], **bound_kw)
        write({"kind": "bounds", "sampler": "twist", "stage": stage,
               "train_seconds": sum(h["seconds"] for h in history),
               "updates": history[-1]["updates"] if history else 0,
               "lm_tokens": history[-1]["lm_tokens"] if history else 0, **report.rows[0]})
        print(f"stage {stage}:", report.table(), flush=True)
    twist.save_pretrained(out / "twist")

    if ("diagnostics", None, None, None) not in have:
        write({"kind": "diagnostics", **diagnostics(target, twist, pairs, exact_samples, args)})
    write_report(out, args)


def exact_pairs(target: pilm.Target, how: str, seeds: int, path: Path) -> list[tuple[pilm.Target, list[int]]]:
    """One (target, exact sample) pair per seed, drawn once and kept in ``path`` (rejection at
    log Z ≈ -5.5 takes minutes), shared by every bounds call so their per-seed gaps pair."""
    if not path.exists():
        pairs = exact_sigma_samples(target, seeds, how, seed=0, max_draws=200_000)
        path.write_text(json.dumps([{"suffix": condition_ids(t), "sample": list(s)} for t, s in pairs]))
    saved = json.loads(path.read_text())
    return [(target if p["suffix"] is None else infilling(target.model, suffix=p["suffix"],
                                                          max_new_tokens=target.max_new_tokens),
             p["sample"]) for p in saved]


def diagnostics(target: pilm.Target, twist, pairs, exact_samples: str, args) -> dict:
    """ESS per step (K = twist_k, resampling every step) for base and twist over the seeds'
    targets, and the twist's calibration on held-out prefixes."""
    ess = {}
    for name, sampler in (("base", None), ("twist", twist)):
        g = torch.Generator().manual_seed(1)
        runs = [run_smc(t, args.twist_k, g, twist=sampler, ess_threshold=1.0, use_prefix=False,
                        on_extinction="return") for t, _ in pairs]
        steps = max(len(r.ess) for r in runs)
        ess[name] = [statistics.fmean(r.ess[i] for r in runs if i < len(r.ess)) for i in range(steps)]
    # Held-out prefixes: new exact samples for infilling (their own endings), base samples for toxicity.
    if exact_samples == "joint":
        held = exact_sigma_samples(target, args.calibration_prefixes, "joint", seed=99)
    else:
        g = torch.Generator().manual_seed(99)
        held = [(target, list(s)) for s in run_smc(target, args.calibration_prefixes, g, ess_threshold=0.0,
                                                   use_prefix=False).tokens]
    positions = sorted({1, target.max_new_tokens // 2, target.max_new_tokens - 1})
    cal = twist_calibration(held, twist, positions, rollouts=32, seed=7)
    return {"ess_per_step": ess, "calibration": cal["summary"], "calibration_rows": cal["rows"]}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of the per-seed differences a - b and its 95% Student-t half-width."""
    return t_interval([x - y for x, y in zip(a, b)])


def write_report(out: Path, args) -> None:
    """gap_vs_seconds.png and results.md (``table``), from the rows saved in ``out``."""
    from results import rows, write  # experiments/results.py, next to this script

    plot(rows(out), out, args)
    print(write(out, "payoff")["results.md"])


def split(rows: list[dict]) -> tuple[dict[int, dict], list[dict]]:
    """The bounds rows: the base proposal's by K, and the twist's in stage order."""
    base = {r["n_particles"]: r for r in rows if r["kind"] == "bounds" and r["sampler"] == "base"}
    twist = sorted((r for r in rows if r["kind"] == "bounds" and r["sampler"] == "twist"), key=lambda r: r["stage"])
    return base, twist


def plot(rows: list[dict], out: Path, args) -> None:
    """gap_vs_seconds.png: the twisted gap (± its 95% half-width) against training seconds, and
    each bootstrap K's gap as a level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, twist = split(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    secs = [r["train_seconds"] for r in twist]
    ax.errorbar(secs, [r["gap"] for r in twist], yerr=[r["gap_ci"] for r in twist], marker="o", capsize=3,
                label=f"twisted SMC, K = {args.twist_k}")
    for k, r in sorted(base.items()):
        ax.axhline(r["gap"], ls="--", lw=1, color=f"C{1 + sorted(base).index(k)}", label=f"bootstrap SMC, K = {k}")
    ax.set(xlabel="twist training seconds (2-core CPU)", ylabel="gap = upper - lower bound on log Z",
           title=f"{args.target}: {args.objective}, {args.head} head, reuse {args.reuse}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_seconds.png", dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """results.md: the run's settings (the rows' config), per sampler, K and stage the bounds and
    gap (means ± 95% Student-t half-widths over seeds) and the paired Δ against each bootstrap K,
    then the final twist's ESS per step and calibration."""
    c = rows[0]["config"]
    base, twist = split(rows)
    lines = [f"{c['target']}: {c['objective']}, {c['head']} head (init {c['init']}), batch {c['batch_size']}, "
             f"reuse {c['reuse']}, lr {c['lr']}; SMC resampling every step; {rows[0]['seeds']} seeds; gaps are means "
             "± 95% half-widths over seeds; Δ = twisted gap − bootstrap gap, paired by seed.", "",
             "| sampler | K | stage (steps) | updates | LM tokens | train s | lower | upper | gap | final ESS |"
             + "".join(f" Δ vs base K={k} |" for k in sorted(base)),
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(base)]
    for r in [*base.values(), *twist]:
        deltas = "".join(" {:+.2f} ± {:.2f} |".format(*paired(r["gaps"], b["gaps"])) if r in twist else " |"
                         for b in (base[k] for k in sorted(base)))
        stage = "" if r.get("stage") is None else r["stage"]
        lines.append(f"| {r['sampler']} | {r['n_particles']} | {stage} | {r.get('updates', '')} | "
                     f"{r.get('lm_tokens', '')} | {r['train_seconds']:.0f} | {r['lower']:.2f} ± {r['lower_ci']:.2f} | "
                     f"{r['upper']:.2f} ± {r['upper_ci']:.2f} | {r['gap']:.2f} ± {r['gap_ci']:.2f} | "
                     f"{r['ess_final']:.1f} |{deltas}")
    diag = next((r for r in rows if r["kind"] == "diagnostics"), None)
    if diag:
        lines += ["", "ESS per step (K = {}, mean over seeds):".format(c["twist_k"]), ""]
        for name, values in diag["ess_per_step"].items():
            lines.append(f"- {name}: " + ", ".join(f"{v:.1f}" for v in values))
        lines += ["", "Calibration on held-out prefixes (log psi_t against log of the mean phi over 32 rollouts; "
                  "increments: between consecutive positions of one sequence):", "",
                  "| t | prefixes | corr | slope | sd log MC | sd log psi |", "|---|---|---|---|---|---|"]
        for t, s in calibration_summary(diag["calibration_rows"]).items():
            lines.append(f"| {t} | {s['n']} | {s['corr']:.2f} | {s['slope']:.2f} | {s['sd_log_mc']:.2f} | "
                         f"{s['sd_log_psi']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
