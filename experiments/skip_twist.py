"""A twist learned by maximum likelihood on the joint (the skip model) against bootstrap SMC, on infilling.

docs/payoff's infilling target and exact samples (T = 8 after its prompt, 4-token endings from
the joint, 10 seeds). ``pilm.train_skip_model`` fits q(e | x, s_1:t, f^{8-t}), a LoRA adapter on
the embedded model, to psi*_t = p0(e | x, s_1:t) on fresh joint draws, in stages (--stages:
cumulative steps; a checkpoint carries each stage into the next). After each stage, at K = --k
with resampling at every step, ``pilm.bounds`` bounds log Z on the same seeds with

  skip               the skip model's prefix score (``SkipLookahead``);
  skip + exact-last  and the last token from p0 phi over the --top-m likeliest (``ExactLastProposal``);

against bootstrap SMC at each K of --base-ks run in this same process (so seconds compare at
equal load). Each stage also records the calibration of log psi_t against a Monte Carlo estimate
of log psi*_t (``RolloutLookahead`` with 32 rollouts; the same values for every stage) on held-out
joint draws at t = 1, 4, 7 (those still running after t tokens). Resumable: rerun to continue. Writes --out/results.jsonl,
gap_vs_seconds.png and results.md (``table``). Rerun: make experiment-payoff
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from payoff import exact_pairs, make_target, paired  # experiments/payoff.py, next to this script

import pilm
from pilm.commands.cli_args import Parser
from pilm.evaluation import exact_sigma_samples
from pilm.inference.result import read_jsonl
from pilm.learning.checkpoint import RESUME_ELSEWHERE, claim
from pilm.potentials import RolloutLookahead
from pilm.proposals import ExactLastProposal
from pilm.tasks.infilling import DEFAULT_PROMPT

POSITIONS = (1, 4, 7)


def main() -> None:
    p = Study.parser(__doc__, "0,50,150,400")
    p.add_argument("--batch-size", type=int, default=16, help="joint draws per training step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-m", type=int, default=16)
    p.add_argument("--held-out", type=int, default=24, help="held-out joint draws for the calibration")
    args = p.parse_args()
    study = Study(args)
    model, out, have = study.model, study.out, study.have
    target, _, how = make_target("infilling", model, 1)
    pairs = exact_pairs(target, how, args.seeds, Path("docs/payoff/infilling/exact_samples.json"))[: args.seeds]
    study.bootstrap(pairs, args.base_ks)
    held = exact_sigma_samples(target, args.held_out, "joint", seed=99)
    mc = monte_carlo(held)
    for stage in (int(s) for s in args.stages.split(",")):
        todo = [(n, prop) for n, prop in (("skip", None), ("skip + exact-last", ExactLastProposal(top_m=args.top_m)))
                if (n, args.k, stage) not in have]
        if not todo:
            continue
        trained = pilm.train_skip_model(model, DEFAULT_PROMPT, max_new_tokens=target.max_new_tokens, suffix_tokens=4,
                                        steps=stage, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                                        checkpoint_dir=str(out / "checkpoint"), checkpoint_every=25,
                                        log_path=str(out / "training.jsonl"), progress=False)
        skip, history = trained.model, trained.history
        if len(history) != stage:
            raise SystemExit(f"the checkpoint in {out / 'checkpoint'} is at step {len(history)}, past stage {stage}: "
                             "give stages up to it (or a new --out)")
        seeds = [(skip.lookahead(t), s) for t, s in pairs]
        extra = {"stage": stage, "train_seconds": sum(h["seconds"] for h in history),
                 "loss": history[-1]["loss"] if history else None,
                 "calibration": calibration(held, mc, skip)}
        for name, proposal in todo:
            study.bound(name, args.k, proposal, seeds, use_prefix=True, **extra)
    from results import rows, write  # experiments/results.py, next to this script

    plot(rows(out), out / "gap_vs_seconds.png")
    print(write(out, "skip")["results.md"])


class Study:
    """A study in stages (this one, residual_twist's): its --out folder keyed to its settings
    (all but --out, --stages and --base-ks, so a rerun with more stages resumes), the rows it
    has, and ``bound``, which appends a row of ``pilm.bounds`` with the seconds it took."""

    @staticmethod
    def parser(doc: str, stages: str) -> Parser:
        """The flags every staged study has: --out, --stages (default ``stages``), --k, --base-ks, --seeds."""
        p = Parser(description=doc.splitlines()[0])
        p.add_argument("--out", required=True)
        p.add_argument("--stages", default=stages, help="cumulative training steps at which to bound")
        p.add_argument("--k", type=int, default=16, help="particles of the learned sampler")
        p.add_argument("--base-ks", default="16,64,256", help="particles of the bootstrap rows")
        p.add_argument("--seeds", type=int, default=10)
        return p

    def __init__(self, args):
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.have = {(r["sampler"], r["n_particles"], r.get("stage")) for r in read_jsonl(self.results, missing_ok=True)}
        self.model = pilm.load_model()
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "stages", "base_ks")}
        claim(self.out, {**settings, "model": self.model.name, "dtype": self.model.dtype_name}, remedy=RESUME_ELSEWHERE)
        self.config = {**vars(args), "model": self.model.name}

    def bound(self, name: str, k: int, sampler, seeds, *, use_prefix: bool = False, **extra) -> None:
        t0 = time.perf_counter()
        report = pilm.bounds(seeds[0][0], {name: sampler}, [k], exact_samples=seeds, methods=("smc",), seed=0,
                             use_prefix=use_prefix, progress=False)
        row = {**report.rows[0], "seconds": time.perf_counter() - t0, **extra}
        with open(self.results, "a") as f:
            f.write(json.dumps({**row, "config": self.config}) + "\n")
        print(f"{name} K={k} stage {extra.get('stage')}: gap {row['gap']:.2f} ± {row['gap_ci']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)

    def bootstrap(self, pairs, ks: str) -> None:
        """Bootstrap SMC at each K of ``ks`` ("16,64,256") that has no row yet, in this process."""
        for k in (int(k) for k in ks.split(",")):
            if ("base", k, None) not in self.have:
                self.bound("base", k, None, pairs)


def plot(rows: list[dict], path: Path, xlabel: str = "skip model training seconds (2-core CPU)",
         title: str = "infilling: a twist learned by maximum likelihood on the joint") -> None:
    """The learned samplers' gap (± 95% half-width) against training seconds; each bootstrap K's gap as a level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, name in enumerate(sorted({r["sampler"] for r in rows} - {"base"})):
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["stage"])
        ax.errorbar([r["train_seconds"] for r in mine], [r["gap"] for r in mine], yerr=[r["gap_ci"] for r in mine],
                    marker="o", capsize=3, color=f"C{i}", label=f"{name}, K = {mine[0]['n_particles']}")
    for j, r in enumerate(sorted((r for r in rows if r["sampler"] == "base"), key=lambda r: r["n_particles"])):
        ax.axhline(r["gap"], ls="--", lw=1, color=f"C{3 + j}", label=f"bootstrap SMC, K = {r['n_particles']}")
    ax.set(xlabel=xlabel, ylabel="gap = upper - lower bound on log Z", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def monte_carlo(held) -> dict[int, list[float]]:
    """log of the mean phi over 32 p0 rollouts of each held-out prefix of length t (psi*_t's
    Monte Carlo estimate), per position t, over the draws still running after t tokens."""
    out = {}
    for t in POSITIONS:
        values = []
        for target, s in running(held, t):
            ahead = RolloutLookahead(target.potential, target.max_new_tokens, 32, seed=t)
            values.append(float(ahead.log_prefix(target.sequences([s[:t]]))[0]))
        out[t] = values
    return out


def running(held, t: int) -> list:
    """The held-out draws whose prefix of t tokens is not yet complete (no EOS in it)."""
    return [(target, s) for target, s in held if len(s) > t]


def calibration(held, mc: dict[int, list[float]], skip) -> dict[str, dict[str, float]]:
    """Per position t: the correlation of the skip model's log psi_t with the Monte Carlo log
    psi*_t over the held-out prefixes, the least-squares slope, and both spreads (sd)."""
    out = {}
    for t, truth in mc.items():
        mine = [float(skip.lookahead(target).potential.log_prefix(target.sequences([s[:t]]))[0])
                for target, s in running(held, t)]
        out[str(t)] = {"corr": statistics.correlation(mine, truth), "slope": statistics.linear_regression(truth, mine)[0],
                       "sd_psi": statistics.stdev(mine), "sd_mc": statistics.stdev(truth)}
    return out


def table(rows: list[dict]) -> str:
    """results.md: per sampler, K and stage the bounds, gap, final ESS, training and bounding
    seconds, and the paired Δ against each bootstrap K (mean ± 95% Student-t half-width over
    seeds; an interval holding 0 is not resolved); then the calibration per stage."""
    c = rows[0]["config"]
    learned = sorted((r for r in rows if r["sampler"] != "base"), key=lambda r: (r["sampler"], r["stage"]))
    lines = [f"infilling (docs/payoff's target and exact samples), {rows[0]['seeds']} seeds, SMC resampling every step; "
             f"skip model: LoRA rank {c['rank']}, lr {c['lr']}, {c['batch_size']} joint draws a step; exact-last scores "
             f"the top {c['top_m']} last tokens. Gaps: means ± 95% half-widths; Δ = gap − bootstrap gap at that K, paired "
             "by seed; seconds: the sampler's lower and upper bound runs over all seeds.", "", *staged(rows, learned)]
    stages = sorted({r["stage"]: r for r in learned}.items())
    if stages:
        lines += calibration_lines(f"Calibration on {c['held_out']} held-out joint draws: log psi_t of the skip model "
                                   "against the log of the mean phi over 32 p0 rollouts of the same prefix (corr, "
                                   "least-squares slope, sd of each).", [r for _, r in stages])
    return "\n".join(lines) + "\n"


def staged(rows: list[dict], learned: list[dict]) -> list[str]:
    """The bounds table of a study in stages: the bootstrap rows by K, then ``learned`` (with
    their stage and training seconds), each with its paired Δ against every bootstrap K."""
    base = {r["n_particles"]: r for r in rows if r["sampler"] == "base"}
    lines = ["| sampler | K | steps | train s | lower | upper | gap | final ESS | seconds |"
             + "".join(f" Δ vs base K={k} |" for k in sorted(base)),
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(base)]
    for r in [*(base[k] for k in sorted(base)), *learned]:
        deltas = "".join(" {:+.2f} ± {:.2f} |".format(*paired(r["gaps"], base[k]["gaps"])) if r["sampler"] != "base"
                         else " |" for k in sorted(base))
        steps = "" if r.get("stage") is None else r["stage"]
        train = "" if r.get("stage") is None else f"{r['train_seconds']:.0f}"
        lines.append(f"| {r['sampler']} | {r['n_particles']} | {steps} | {train} | {r['lower']:.2f} ± {r['lower_ci']:.2f} "
                     f"| {r['upper']:.2f} ± {r['upper_ci']:.2f} | {r['gap']:.2f} ± {r['gap_ci']:.2f} | "
                     f"{r['ess_final']:.1f} | {r['seconds']:.0f} |{deltas}")
    return lines


def calibration_lines(caption: str, rows: list[dict]) -> list[str]:
    """The calibration table of each row's ``calibration`` (per position t), under ``caption``."""
    lines = ["", caption, "", "| steps | t | corr | slope | sd log psi | sd log MC |", "|---|---|---|---|---|---|"]
    for r in rows:
        for t, s in r["calibration"].items():
            lines.append(f"| {r['stage']} | {t} | {s['corr']:.2f} | {s['slope']:.2f} | {s['sd_psi']:.2f} | "
                         f"{s['sd_mc']:.2f} |")
    return lines

if __name__ == "__main__":
    main()
