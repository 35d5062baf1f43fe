"""Twists without training: the look-ahead prefix score and the exact last step against bootstrap SMC.

The targets and exact samples are docs/payoff's (``--target``: infilling, T = 8 with 4-token
endings from the joint; toxicity, phi = P(offensive)^2 of 10 tokens; sentiment, the twists
table's phi = P(positive)^10 of 8 tokens after "The movie was", whose exact samples are drawn by
rejection into --exact-samples), read from its exact_samples.json so that every seed's gap pairs
with the trained twists there. Samplers, all
with SMC resampling every step, bounded by ``pilm.bounds`` on the same seeds:

  base K        bootstrap SMC at each K of --base-ks;
  exact-last    the last token from p0 phi over the --top-m likeliest tokens (``ExactLastProposal``);
  lookahead a   infilling: the ending's likelihood right after the prefix as a prefix score,
                alpha log p(ending | x, s_1:t) (``SuffixLikelihood(lookahead=alpha)``); toxicity:
                the classifier's score of the prefix to the power alpha (``Toxicity(prefix=alpha)``);
  lookahead fitted  infilling, with --fit-draws D: a power a_t per prefix length, fitted on D p0
                draws of each seed's target (``pilm.evaluation.fit_lookahead``; the powers and the
                fit's seconds are kept in the row);
  rollouts R    with --rollouts: psi*_t = E[phi | s_1:t] estimated by R p0 rollouts of each prefix to
                the horizon (``RolloutLookahead``); the rollout tokens it drew are kept in the row;
  both          lookahead and exact-last together;

the analytic samplers at K = --k. Each row keeps its per-seed gaps and the seconds its bounds
took (lower and upper bound runs over all seeds), so the table can pair by seed (Student t) and
compare at equal K and at equal wall-clock. Resumable: a rerun skips the rows it has. Writes
--out/results.jsonl and results.md (``table``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from payoff import exact_pairs, make_target  # experiments/payoff.py, next to this script

import pilm
from pilm.commands.cli_args import Parser
from pilm.evaluation import fit_lookahead
from pilm.evaluation.metrics import t_interval
from pilm.inference.result import read_jsonl
from pilm.learning.checkpoint import RESUME_ELSEWHERE, claim
from pilm.potentials import RolloutLookahead, Sentiment, SuffixLikelihood, Toxicity
from pilm.proposals import ExactLastProposal
from pilm.twists.head import condition_ids


def with_lookahead(pairs, alpha: float | tuple[float, ...], target_name: str):
    """The seeds' (target, exact sample) pairs with the look-ahead prefix score on each target
    (phi, hence Z and the exact samples, unchanged)."""
    out = []
    for t, s in pairs:
        if target_name == "infilling":
            potential = SuffixLikelihood(t.model, condition_ids(t), lookahead=alpha)
        elif target_name == "sentiment":
            potential = Sentiment("positive", prefix=alpha) ** 10.0  # VADER's P(positive | prefix)^(10 alpha)
        else:
            if not isinstance(alpha, float):
                raise SystemExit("fitted look-ahead powers serve infilling; toxicity takes one alpha")
            potential = Toxicity("toxic", prefix=alpha) ** 2.0  # P(toxic | prefix)^(2 alpha); alpha 1: the rows here
        out.append((dataclasses.replace(t, potential=potential), s))
    return out


def with_rollouts(pairs, rollouts: int):
    """The seeds' pairs with each target's potential looked ahead through ``rollouts`` p0 rollouts."""
    return [(dataclasses.replace(t, potential=RolloutLookahead(t.potential, t.max_new_tokens, rollouts)), s)
            for t, s in pairs]


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=["infilling", "toxicity", "sentiment"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--exact-samples", default=None, help="docs/payoff's exact samples (default: docs/payoff/TARGET)")
    p.add_argument("--base-ks", default="16,64,256")
    p.add_argument("--k", type=int, default=16, help="particles of the analytic samplers")
    p.add_argument("--alphas", default="0.5,1", help="look-ahead powers")
    p.add_argument("--top-m", type=int, default=16, help="last tokens scored by the exact-last proposal")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--fit-draws", type=int, default=0, help="infilling: p0 draws per target that fit per-step "
                   "look-ahead powers (0: no fitted row)")
    p.add_argument("--rollouts", default="", help="rollouts per prefix of the rollout look-ahead rows, e.g. 4,16 "
                   "(none: no such row)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    have = {(r["sampler"], r["n_particles"]) for r in read_jsonl(results, missing_ok=True)}
    model = pilm.load_model()
    claim(out, {"target": args.target, "seeds": args.seeds, "top_m": args.top_m, "k": args.k, "alphas": args.alphas,
                "exact_samples": args.exact_samples, "model": model.name, "dtype": model.dtype_name},
          remedy=RESUME_ELSEWHERE)  # rows of other settings never mix (--fit-draws adds a row, as a setting it keeps)
    target, _, how = make_target(args.target, model, 1)
    source = Path(args.exact_samples or f"docs/payoff/{args.target}") / "exact_samples.json"
    pairs = exact_pairs(target, how, args.seeds, source)[: args.seeds]
    cells = [("base", int(k), None, pairs) for k in args.base_ks.split(",")]
    cells.append(("exact-last", args.k, ExactLastProposal(top_m=args.top_m), pairs))
    for alpha in (float(a) for a in args.alphas.split(",")):
        ahead = with_lookahead(pairs, alpha, args.target)
        cells.append((f"lookahead {alpha:g}", args.k, None, ahead))
        cells.append((f"lookahead {alpha:g} + exact-last", args.k, ExactLastProposal(top_m=args.top_m), ahead))
    fitted: dict = {}
    kept = [r for r in read_jsonl(results, missing_ok=True) if r["sampler"] == "lookahead fitted"]
    if args.fit_draws and kept and kept[0]["fit_draws"] != args.fit_draws:
        raise SystemExit(f"{results} has a fitted row of --fit-draws {kept[0]['fit_draws']}: rerun with it, or "
                         "use another --out")
    if args.fit_draws and args.target == "infilling" and ("lookahead fitted", args.k) not in have:
        t0 = time.perf_counter()
        powers = fit_lookahead([t for t, _ in pairs], args.fit_draws, seed=0)
        fitted = {"powers": list(powers), "fit_draws": args.fit_draws, "fit_seconds": time.perf_counter() - t0}
        cells.append(("lookahead fitted", args.k, None, with_lookahead(pairs, powers, args.target)))
    for r in (int(r) for r in args.rollouts.split(",") if r):
        cells.append((f"rollouts {r}", args.k, None, with_rollouts(pairs, r)))
    for name, k, proposal, seeds in cells:
        if (name, k) in have:
            continue
        t0 = time.perf_counter()
        report = pilm.bounds(seeds[0][0], {name: proposal}, [k], exact_samples=seeds, methods=("smc",), seed=0,
                             use_prefix=name.startswith(("lookahead", "rollouts")), progress=False)
        row = {**report.rows[0], "seconds": time.perf_counter() - t0, "config": {**vars(args), "model": model.name},
               **(fitted if name == "lookahead fitted" else {})}
        if name.startswith("rollouts"):
            row["rollout_tokens"] = sum(t.potential.tokens for t, _ in seeds)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} K={k}: gap {row['gap']:.2f} ± {row['gap_ci']:.2f} ({row['seconds']:.0f} s)", flush=True)
    from results import write  # experiments/results.py, next to this script

    print(write(out, "analytic")["results.md"])


def table(rows: list[dict]) -> str:
    """results.md: per sampler and K the bounds, the gap and the seconds of its bounds run, and
    the gap's paired difference to bootstrap at each K (mean ± 95% Student-t half-width over
    seeds; an interval that holds 0 is not resolved)."""
    c = rows[0]["config"]
    base = {r["n_particles"]: r for r in rows if r["sampler"] == "base"}
    lines = [f"{c['target']} (docs/payoff's target and exact samples), {rows[0]['seeds']} seeds, SMC resampling every "
             f"step, exact-last scoring the top {c['top_m']} last tokens; gaps are means ± 95% half-widths; Δ = gap − "
             "bootstrap gap at that K, paired by seed; seconds: the sampler's lower and upper bound runs over all seeds.",
             "", "| sampler | K | lower | upper | gap | final ESS | seconds |"
             + "".join(f" Δ vs base K={k} |" for k in sorted(base)),
             "|---|---|---|---|---|---|---|" + "---|" * len(base)]
    for r in sorted(rows, key=lambda r: (r["sampler"] != "base", r["sampler"], r["n_particles"])):
        deltas = "".join(" {:+.2f} ± {:.2f} |".format(*t_interval([a - b for a, b in zip(r["gaps"], base[k]["gaps"],
                                                                                          strict=True)]))
                         if r["sampler"] != "base" else " |" for k in sorted(base))
        lines.append(f"| {r['sampler']} | {r['n_particles']} | {r['lower']:.2f} ± {r['lower_ci']:.2f} | "
                     f"{r['upper']:.2f} ± {r['upper_ci']:.2f} | {r['gap']:.2f} ± {r['gap_ci']:.2f} | "
                     f"{r['ess_final']:.1f} | {r['seconds']:.0f} |{deltas}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
