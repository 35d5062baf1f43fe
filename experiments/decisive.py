"""The decisive table of docs/payoff: every sampler at K = 16 against bootstrap SMC at K = 64.

Issue 31's goal: twisted SMC at K = 16 tighter than bootstrap SMC at K = 64 on the paired log Z
gap, within 1.5x its wall-clock, on both payoff targets. Each folder of docs/payoff reran
bootstrap SMC in its own process, so every row is paired (by seed) with its own folder's
bootstrap K = 64 row, and its seconds are divided by that row's seconds (the same load). The
CTL twists of the first study (folders infilling, toxicity, toxicity_lr3e-3) kept no bounding
seconds. Written by ``make results`` into docs/payoff/decisive.md from the folders' rows.
"""

from __future__ import annotations

from pathlib import Path

from payoff import paired  # experiments/payoff.py, next to this script

from pilm.inference.result import read_jsonl

FOLDERS = {"infilling": ("infilling", "analytic_infilling", "skip_infilling"),
           "toxicity": ("toxicity", "toxicity_lr3e-3", "analytic_toxicity", "residual_toxicity",
                        "residual_toxicity_control", "residual_toxicity_smc", "residual_toxicity_hour"),
           "sentiment": ("analytic_sentiment",)}
GOAL = 1.5  # the most wall-clock, as a multiple of bootstrap K = 64's


def table(payoff: Path) -> str:
    lines = ["Every sampler at K = 16 against bootstrap SMC at K = 64 of the same folder (same exact samples and "
             "seeds): Δ = gap − bootstrap K = 64's gap, mean ± 95% Student-t half-width over the paired seeds (an "
             "interval holding 0 is not resolved); time = the sampler's bound seconds / bootstrap K = 64's, both "
             "sampling only (training, pools and fits are not in it; a resumed run's later rows ran in later "
             f"processes). The goal: Δ < 0 resolved and time ≤ {GOAL}; n/a where no bound seconds were kept. With many "
             "rows, one \"yes\" among a learner's stages is itself a selection: read it with its neighbours.", "",
             "| target | folder | sampler | steps | gap | Δ vs bootstrap K = 64 | time vs K = 64 | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for target, folders in FOLDERS.items():
        for folder in folders:
            path = payoff / folder / "results.jsonl"
            if not path.exists():
                continue
            rows = [r for r in read_jsonl(path) if r.get("kind", "bounds") == "bounds"]
            base = next((r for r in rows if r["sampler"] == "base" and r["n_particles"] == 64), None)
            if base is None:
                continue
            for r in rows:
                if r["sampler"] == "base" or r["n_particles"] != 16:
                    continue
                delta, half = paired(r["gaps"], base["gaps"])
                ratio = r["seconds"] / base["seconds"] if "seconds" in r and "seconds" in base else None
                met = "n/a" if ratio is None else "yes" if delta + half < 0 and ratio <= GOAL else "no"
                lines.append(f"| {target} | {folder} | {r['sampler']} | {'' if r.get('stage') is None else r['stage']} "
                             f"| {r['gap']:.2f} ± {r['gap_ci']:.2f} | {delta:+.2f} ± {half:.2f} | "
                             f"{'—' if ratio is None else f'{ratio:.2f}'} | {met} |")
    return "\n".join(lines) + "\n"
