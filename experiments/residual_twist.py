"""A learned residual on the look-ahead twist, trained on a replay pool, against bootstrap SMC.

docs/payoff's toxicity target and exact samples (phi = P(offensive)^2 of 10 tokens after "The
quarterly report shows that", 10 seeds), with the classifier's score of the prefix, squared as
phi is, as the look-ahead L (``Toxicity(prefix=True) ** 2``). The twist is ``ResidualTwist``: log psi_t = log L_t +
head(h), a tied head on the hidden state the forward already made, starting at 0 (stage 0 is
the look-ahead alone). Its head learns by ctl with positives from a replay pool: the
resampled particles of --pool-runs SMC runs at K = --pool-k with the look-ahead (seeds apart
from the bounds'), kept in --out/pool.json; negatives are each step's draw from the twist.
``--pool-runs 0`` is the control: one-sample ctl, whose positives are each draw's own SIS-weighted
sequences, as in the first study. ``--negatives smc`` takes the negatives from a twisted SMC run's
population after each step's resampling instead (``pilm.learning.contrast``).

After each stage (--stages: cumulative steps; a checkpoint carries each stage into the next),
at K = --k with resampling at every step, ``pilm.bounds`` bounds log Z on the same seeds with
the residual, against bootstrap SMC at each K of --base-ks run in this same process (so
seconds compare at equal load). Each stage also records the calibration of the whole log psi_t
against a 32-rollout Monte Carlo estimate of log psi*_t on held-out p0 prefixes. Resumable:
rerun to continue. Writes --out/results.jsonl, gap_vs_seconds.png and results.md (``table``).
Rerun: make experiment-payoff
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
from payoff import exact_pairs, make_target  # experiments/payoff.py, next to this script
from skip_twist import Study, calibration_lines, plot, staged

import pilm
from pilm.evaluation import twist_calibration
from pilm.inference.smc import run_smc
from pilm.learning import contrast
from pilm.potentials import Toxicity
from pilm.twists import ResidualTwist, Twist


def main() -> None:
    p = Study.parser(__doc__, "0,100,300")
    p.add_argument("--pool-k", type=int, default=256, help="particles of each replay-pool SMC run")
    p.add_argument("--pool-runs", type=int, default=8, help="0: no pool, one-sample ctl (the control)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reuse", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--held-out", type=int, default=24, help="held-out p0 draws for the calibration")
    p.add_argument("--negatives", choices=["sis", "smc"], default="sis",
                   help="ctl's negatives: each draw's SIS weights, or a twisted SMC population per step")
    args = p.parse_args()
    study = Study(args)
    model, out, have = study.model, study.out, study.have
    plain, _, how = make_target("toxicity", model, 1)
    target = dataclasses.replace(plain, potential=Toxicity("toxic", prefix=True) ** 2.0)  # phi unchanged, L added
    pairs = exact_pairs(plain, how, args.seeds, Path("docs/payoff/toxicity/exact_samples.json"))[: args.seeds]
    study.bootstrap(pairs, args.base_ks)
    pool = replay_pool(target, out / "pool.json", args.pool_k, args.pool_runs) if args.pool_runs else None
    g = torch.Generator().manual_seed(99)
    held = [(target, list(s)) for s in run_smc(plain, args.held_out, g, ess_threshold=0.0, use_prefix=False).tokens]
    with_look_ahead = [(target, s) for _, s in pairs]
    for stage in (int(s) for s in args.stages.split(",")):
        if ("residual", args.k, stage) in have:
            continue
        with torch.random.fork_rng():
            torch.manual_seed(0)
            twist = ResidualTwist(Twist.for_model(model, kind="tied", init="base"), 1.0)
        history = []
        if stage:
            trained = pilm.train_twist(target, "ctl", twist=twist, positives=pool and pool["tokens"], steps=stage,
                                       batch_size=args.batch_size, reuse=args.reuse, lr=args.lr, seed=0,
                                       negatives=args.negatives,
                                       checkpoint_dir=str(out / "checkpoint"), checkpoint_every=25,
                                       log_path=str(out / "training.jsonl"), progress=False)
            history = trained.history
        if len(history) != stage:
            raise SystemExit(f"the checkpoint in {out / 'checkpoint'} is at step {len(history)}, past stage {stage}: "
                             "give stages up to it (or a new --out)")
        study.bound("residual", args.k, twist, with_look_ahead, stage=stage,
              train_seconds=sum(h["seconds"] for h in history), loss=history[-1]["loss"] if history else None,
              calibration=calibration(held, twist, target.max_new_tokens), pool_seconds=pool["seconds"] if pool else 0.0)
        if stage:
            twist.save_pretrained(out / "twist")
    from results import rows, write  # experiments/results.py, next to this script

    plot(rows(out), out / "gap_vs_seconds.png", "residual head training seconds (2-core CPU)",
         "toxicity: a residual on the look-ahead, " + ("trained on a replay pool" if pool else "one-sample ctl"))
    print(write(out, "residual")["results.md"])


def replay_pool(target: pilm.Target, path: Path, k: int, runs: int) -> dict:
    """The replay pool (``pilm.learning.contrast.replay_pool``: ``runs`` SMC runs of ``k``
    particles with the look-ahead, seed 1000), drawn once and kept in ``path``. The committed
    pool.json was drawn before that function existed, by the same runs resampled with seed 0
    each; a pool drawn afresh differs only in those resampling seeds."""
    if not path.exists():
        t0 = time.perf_counter()
        tokens = contrast.replay_pool(target, k * runs, seed=1000, k=k)
        path.write_text(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0, "k": k, "runs": runs}))
    return json.loads(path.read_text())


def calibration(held, twist: ResidualTwist, horizon: int) -> dict[str, dict[str, float]]:
    """Per position t: the correlation of the whole log psi_t (look-ahead + head) with the
    Monte Carlo log psi*_t (32 rollouts) over the held-out p0 prefixes, the least-squares slope
    of the Monte Carlo value on log psi (1 for a calibrated twist; as ``calibration_summary``,
    so the rollouts' noise does not attenuate it), and both spreads (sd)."""
    positions = sorted({1, horizon // 2, horizon - 1})
    rows = twist_calibration(held, twist, positions, rollouts=32, seed=7)["rows"]
    for r in rows:
        target, s = held[r["pair"]]
        r["log_psi"] += float(twist.look_ahead(target, [s[: r["t"]]])[0])
    out = {}
    for t in positions:
        mine, truth = [r["log_psi"] for r in rows if r["t"] == t], [r["log_mc"] for r in rows if r["t"] == t]
        flat = min(statistics.stdev(mine), statistics.stdev(truth)) == 0  # no correlation to speak of
        out[str(t)] = {"corr": math.nan if flat else statistics.correlation(mine, truth),
                       "slope": math.nan if flat else statistics.linear_regression(mine, truth)[0],
                       "sd_psi": statistics.stdev(mine), "sd_mc": statistics.stdev(truth)}
    return out


def table(rows: list[dict], pool: dict | None = None) -> str:
    """results.md: per sampler, K and stage the bounds, gap, final ESS, training and bounding
    seconds, and the paired Δ against each bootstrap K (mean ± 95% Student-t half-width over
    seeds; an interval holding 0 is not resolved); then the calibration per stage. ``pool``:
    pool.json's contents, whose draws (and how many are distinct) the header gives."""
    c = rows[0]["config"]
    learned = sorted((r for r in rows if r["sampler"] != "base"), key=lambda r: r["stage"])
    drawn = "" if pool is None else f": {len(pool['tokens'])} draws, {len({tuple(t) for t in pool['tokens']})} distinct"
    pool_text = (f"{c['pool_runs']} runs at K = {c['pool_k']}" + (f", {learned[0]['pool_seconds']:.0f} s" if learned else "")
                 + drawn)
    signal = f"ctl with replay-pool positives ({pool_text})" if c["pool_runs"] else "one-sample ctl (no pool: the control)"
    if c.get("negatives", "sis") == "smc":
        signal += " and negatives from a twisted SMC population per step"
    lines = [f"toxicity (docs/payoff's target and exact samples), {rows[0]['seeds']} seeds, SMC resampling every step; "
             f"residual: log L (the classifier's prefix score) + a tied head, {signal}, "
             f"batch {c['batch_size']}, reuse {c['reuse']}, lr {c['lr']}; stage 0 is the look-ahead alone. Gaps: means "
             "± 95% half-widths; Δ = gap − bootstrap gap at that K, paired by seed; seconds: the sampler's lower and "
             "upper bound runs over all seeds.", "", *staged(rows, learned)]
    if learned:
        lines += calibration_lines(f"Calibration on {c['held_out']} held-out p0 draws: the whole log psi_t (look-ahead + "
                                   "head) against the log of the mean phi over 32 p0 rollouts of the same prefix (corr; "
                                   "least-squares slope of the rollout value on log psi, 1 when calibrated; sd of each).",
                                   learned)
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
