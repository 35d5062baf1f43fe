"""``pilm`` on the command line: sample | train-twist | finetune | bounds | train-prm | scale | demo | bench.

Each command has its own parser, generated from the config dataclasses it runs
(``pilm.config``; see ``pilm.commands.cli_args``), so its defaults are the library's and ``--help``
shows them. Every failure is one ``pilm: error: ...`` line on stderr with exit code 2, and
everything that can be checked before the model loads (counts, ranges, potential specs,
folders, output paths) is checked first.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from .. import __version__
from ..config import (
    BoundsConfig,
    FinetuneConfig,
    LatentConfig,
    PRMTrainingConfig,
    ScaleConfig,
    SMCConfig,
    TargetConfig,
    TwistTrainingConfig,
)
from ..errors import ConfigError, PilmError, ResumeMismatchError
from .cli_args import (
    BenchConfig,
    BoundsJob,
    FinetuneJob,
    LatentJob,
    Parser,
    PRMJob,
    RedTeamJob,
    SampleOutput,
    ScaleJob,
    TwistOutput,
    check_paths,
    check_together,
    configs,
    new_folders,
    remove_if_empty,
)
from .cli_messages import RESUMABLE, flag, for_cli, note, out_of, what_was_saved

DEMO = {"prompt": "My favourite weather is", "potential": ("regex:[^eE]*",), "n_particles": 32, "mask": True,
        "max_new_tokens": 16, "out": "results.jsonl", "plot": "ess.png"}
EXTINCT = 1  # exit code of a run whose particles all died (--on-extinction return: 0)
PLAIN_DRAWS = 512  # the demo also counts how often plain sampling meets its constraint


def _target(tc: TargetConfig):
    from .. import load_model
    from ..potentials.spec import parse_potential
    from ..target import Target

    model = load_model(tc.model)
    if not tc.prompt:
        note("no --prompt: completions start from the model's BOS token alone")
    if not tc.potential:
        note("no --potential: phi = 1, so this is plain sampling from the model (Z = 1)")
    potential = None
    for p in (parse_potential(spec, model) for spec in tc.potential):
        potential = p if potential is None else potential * p
    return Target(model, tc.prompt, potential, max_new_tokens=tc.max_new_tokens, chat=tc.chat)


def _run_sample(tc: TargetConfig, sc: SMCConfig, out: SampleOutput) -> int:
    res = _sample(_target(tc), tc, sc, out)
    return EXTINCT if math.isinf(res.log_z) and sc.on_extinction == "warn" else 0


def _sample(target, tc: TargetConfig, sc: SMCConfig, out: SampleOutput):
    from .. import smc
    from ..evaluation.plots import plot_ess
    from ..models import LoRAPolicy
    from ..potentials.likelihood import suffix_of
    from ..twists import Twist

    twist = Twist.from_pretrained(out.twist, target.model) if out.twist else None
    if sc.mask and target.potential is None:
        note("--mask without a --potential: there is no constraint to mask")
    policy = LoRAPolicy.from_pretrained(target.model, out.adapter) if out.adapter else None  # shares the weights
    res = smc(target, sc.n_particles, twist=twist, proposal="masked" if sc.mask else policy,
              proposal_beta=sc.proposal_beta, resample=sc.resample, ess_threshold=sc.ess_threshold, seed=sc.seed,
              on_extinction=sc.on_extinction)
    if policy is not None:
        how = f"proposals from the fine-tuned policy {out.adapter}, weighted to sigma"
    elif sc.mask:
        how = "masked proposal: only tokens that keep the constraint satisfiable" + (", twisted" if twist else "")
    elif twist is not None:
        how = "twisted SMC"
    elif target.potential is None:
        how = "plain sampling"
    elif target.has_prefix_potential:
        how = "SMC on the potential's prefix score"
    else:
        how = "no prefix score: importance weights until the last token"
    print(f"model {target.model.name} ({target.model.dtype_name}) · prompt {tc.prompt!r} · potential {target.potential}"
          f" · N={sc.n_particles} · seed {sc.seed} · {how}")
    suffix = suffix_of(target.potential)
    print("top samples (total normalised weight)" + (", [the infilled middle]:" if suffix else ":"))
    for w, text in (item for item in res.top(out.top) if item[0] > 0):
        shown = f"{tc.prompt}[{text}]{suffix.suffix}" if suffix else tc.prompt + text
        print(f"  {w:6.3f}  {shown!r}")
    if math.isinf(res.log_z):
        print("  none: every particle died, so Z-hat = 0")
    print(f"log Z-hat = {res.log_z:.4f}   (Z-hat = {math.exp(res.log_z):.4g}, unbiased for Z)")
    print("ESS per step: " + " ".join(f"{e:.1f}" for e in res.ess))
    print(f"resampled at steps: {res.resampled_at or 'none'}   ({res.info['seconds']:.1f} s)")
    if out.out:
        Path(out.out).parent.mkdir(parents=True, exist_ok=True)
        res.to_jsonl(out.out)
        print(f"wrote {out.out}")
    if out.plot:
        plot_ess(res, out.plot)
        print(f"wrote {out.plot}")
    return res


def _run_demo(tc: TargetConfig, sc: SMCConfig, out: SampleOutput) -> int:
    """The demo: a constraint plain sampling rarely meets, and what SMC returns under it."""
    from .. import importance_sample

    target = _target(tc)
    res = _sample(target, tc, sc, out)
    plain = importance_sample(target, PLAIN_DRAWS, seed=sc.seed, on_extinction="return", progress=True)
    met = sum(math.isfinite(w) for w in plain.log_weights)
    print(f"plain sampling met the constraint in {met} of {PLAIN_DRAWS} draws (Z-hat = {math.exp(plain.log_z):.4f}); "
          f"SMC's {sc.n_particles} particles estimated Z-hat = {math.exp(res.log_z):.4f}, and every sample above "
          "meets it")
    return 0


def _run_train_twist(tc: TargetConfig, cfg: TwistTrainingConfig, out: TwistOutput) -> int:
    from dataclasses import asdict

    from .. import train_twist

    target = _target(tc)
    folder = Path(out.out)
    twist = train_twist(target, **asdict(cfg), checkpoint_dir=folder / "checkpoint", overwrite=out.overwrite,
                        log_path=folder / "train.jsonl", plot_path=folder / "training.png")
    twist.save_pretrained(folder)
    if not out.keep_checkpoint:
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    last = twist.history[-1]
    print(f"trained a {cfg.head} twist with {cfg.objective} for {cfg.steps} steps: "
          f"final loss {last['loss']:.4g}, batch ESS {last['ess']:.1f}/{cfg.batch_size}")
    print(f"wrote {folder} ({_size(folder)}: twist, train.jsonl, training.png"
          f"{', checkpoint' if out.keep_checkpoint else ''}); use: pilm sample ... --twist {folder}")
    return 0


def _run_finetune(tc: TargetConfig, cfg: FinetuneConfig, job: FinetuneJob) -> int:
    from dataclasses import asdict

    from .. import finetune, load_model
    from ..tasks import arithmetic, random_number

    data = tool = None
    if job.task == "random-number":
        target = random_number(load_model(tc.model), max_new_tokens=None)
    elif job.task == "arithmetic":  # 10 worked questions (SFT's data, SubTB's replay) and 40 with answers only
        target, data, tool = arithmetic.training_set(load_model(tc.model), seed=cfg.seed)
    else:
        target = _target(tc)
    folder = Path(job.out)
    policy = finetune(target, **asdict(cfg), checkpoint_dir=folder / "checkpoint", overwrite=job.overwrite,
                      log_path=folder / "train.jsonl", plot_path=folder / "training.png", data=data, tool=tool)
    policy.save_pretrained(folder)
    if not job.keep_checkpoint:
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    last = policy.history[-1]
    print(f"fine-tuned a rank-{cfg.lora_rank} LoRA policy with {cfg.objective} for {cfg.steps} steps: "
          f"final loss {last['loss']:.4g}, mean log R {last['log_r']:.3g}")
    print(f"wrote {folder} ({_size(folder)}); load with pilm.load_model(..., adapter={str(folder)!r}) "
          f"or: pilm bounds ... --sampler NAME=adapter:{folder}")
    return 0


def _run_bounds(tc: TargetConfig, cfg: BoundsConfig, job: BoundsJob) -> int:
    from dataclasses import asdict

    from .. import bounds, load_model
    from ..twists import Twist

    target = _target(tc)
    samplers: dict = {"base": None}
    for name, where in job.samplers():
        if where.startswith("model:"):
            samplers[name] = load_model(where.removeprefix("model:"))
        elif where.startswith("adapter:"):
            samplers[name] = load_model(tc.model, adapter=where.removeprefix("adapter:"))
        else:
            samplers[name] = Twist.from_pretrained(where, target.model)
    report = bounds(target, samplers, **asdict(cfg))
    print(report.table())
    if job.out:
        report.to_jsonl(job.out)
        print(f"wrote {job.out}")
    if job.plot:
        report.plot(job.plot)
        print(f"wrote {job.plot}")
    return 0


def _run_bench(cfg: BenchConfig) -> int:
    from .bench import run_benchmark

    report = run_benchmark(n_particles=cfg.n_particles, new_tokens=cfg.new_tokens, repeats=cfg.repeats)
    if cfg.json:
        print(json.dumps(report, indent=1))
    else:
        for key, value in report.items():
            print(f"{key:34s} {value:.3f}" if isinstance(value, float) else f"{key:34s} {value}")
    return 0


def _run_train_prm(cfg: PRMTrainingConfig, job: PRMJob) -> int:
    import json
    from dataclasses import asdict

    from .. import load_model, train_prm
    from ..tasks import arithmetic_chain as task

    model = load_model(job.model)
    _claim(job, model, asdict(cfg))
    test = {p["question"] for p in task.problems(ScaleConfig.problems, ScaleConfig.operands, seed=ScaleConfig.seed)}
    train = [p for p in task.problems(job.problems + len(test), ScaleConfig.operands, seed=job.problem_seed)
             if p["question"] not in test][: job.problems]
    targets = [task.target(model, p["question"]) for p in train]
    prm = train_prm(targets, verifier=task.answer_checker(), **asdict(cfg))
    folder = prm.save_pretrained(job.out)
    report = {**prm.prm_data, "problems": len(train), "steps": cfg.steps, "final_loss": prm.history[-1]["loss"]}
    (folder / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"learned a {cfg.head} value head from {report['step_ends']} step ends (mean label "
          f"{report['mean_label']:.3f}; rollouts {report['data_seconds']:.0f} s, fit {report['fit_seconds']:.0f} s)")
    print(f"wrote {folder} ({_size(folder)}); use: pilm scale --prm learned --prm-path {folder}")
    return 0


def _run_scale(cfg: ScaleConfig, job: ScaleJob) -> int:
    from .scaling import is_main_process, plot, run_scale, summarise, table

    rows = run_scale(cfg, job.out, prm_path=job.prm_path, overwrite=job.overwrite)
    if is_main_process():
        summary = summarise(rows)
        text = table(summary)
        Path(job.out, "table.md").write_text(text + "\n")
        plot(summary, Path(job.out, "scale.png"))
        print(text)
        print(f"wrote {rows}, {Path(job.out, 'table.md')} and {Path(job.out, 'scale.png')}")
    return 0


def _run_latent(cfg: LatentConfig, job: LatentJob) -> int:
    from dataclasses import asdict

    from .. import load_model
    from ..latent import LatentReasoner
    from ..latent.plots import plot_em
    from ..tasks import subjectivity

    out = Path(job.out)
    if job.run is not None:  # evaluate a saved run
        if not Path(job.run, "latent.json").exists():
            raise ValueError(f"--run: {job.run} holds no saved latent run (latent.json is missing); "
                             f"make one with: pilm latent --out {job.run}")
        labels = json.loads(Path(job.run, "latent.json").read_text())["labels"]
        test = subjectivity.load_test(job.test or job.data, labels)
        reasoner, q, lik = LatentReasoner.load(load_model(job.model), job.run)
        history, pred = [], None
    else:
        data = subjectivity.load(job.data, job.labels, test=job.test)
        test = data.test
        model = load_model(job.model)
        _claim(job, model, {**asdict(cfg), **{k: getattr(job, k) for k in LatentJob.TRAINING}})
        reasoner = subjectivity.reasoner(model)
        result = reasoner.em(data.train, **asdict(cfg), test=test[:job.test_limit] if job.test_limit else test,
                             e_kwargs={"batch_size": job.e_batch_size, "lr": job.e_lr, "reward_temperature": (1.2, 1.0)},
                             m_kwargs={"lr": job.m_lr})
        q, lik, history, pred = result.posterior, result.likelihood, result.history, result.prediction
        reasoner.save(out, q, lik)
        with open(out / "history.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        plot_em(history, out / "em.png")
    test = test[:job.test_limit] if job.test_limit else test
    # the last EM step already predicted the test items with this q and likelihood: re-vote, not re-sample
    pred = pred.revote(job.vote) if pred is not None else reasoner.predict(test, q, lik, samples=cfg.samples,
                                                                            vote=job.vote, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for ex, label, probs, z in zip(test, pred.labels, pred.probs, pred.rationales, strict=True):
            f.write(json.dumps({"text": ex.x, "label_text": ex.y, "predicted": label, "probs": probs,
                                "rationale": z}) + "\n")
    for h in history:
        print(f"round {h['round']} {h['step']}-step: ELBO {h['elbo']:.3f}, IWAE {h['iwae']:.3f}, test accuracy "
              f"{100 * h['accuracy_hard']:.1f}% (hard) / {100 * h['accuracy_soft']:.1f}% (soft), "
              f"{h['train_seconds']:.0f} s")
    lo, hi = pred.ci
    print(f"test accuracy ({job.vote} vote, {cfg.samples} rationales) on {len(test)} items: "
          f"{100 * pred.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
    print(f"wrote {out} (predictions.jsonl{'' if job.run else ', history.jsonl, em.png, posterior/, likelihood/'}); "
          f"evaluate on other sentences: pilm latent --run {job.run or out} --test FILE.jsonl --out DIR")
    return 0


def _run_red_team(job: RedTeamJob) -> int:
    from dataclasses import asdict

    from .. import load_model
    from ..tasks.redteam import red_teaming, train_attacker

    attacker = load_model(job.attacker)
    rt = red_teaming(attacker, load_model(job.victim), classifier=job.classifier, victim_samples=job.victim_samples,
                     beta=job.beta, gamma=job.gamma, seed=job.seed)
    out = Path(job.out)
    if job.overwrite:
        shutil.rmtree(out / "stage1", ignore_errors=True)
    _claim(job, attacker, {k: getattr(job, k) for k in RedTeamJob.STAGE1} | {"victim_model": rt.victim.name})
    policy = train_attacker(rt, job.method, steps=job.steps, batch_size=job.batch_size, lr=job.lr, seed=job.seed,
                            mle_steps=job.mle_steps, mle_n=job.mle_n, threshold=job.threshold,
                            stage1_dir=out / "stage1" if job.method == "gfn+mle" else None)
    if policy is not None:
        policy.save_pretrained(out)
    report = rt.evaluate(policy, job.n, seed=job.seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": job.method, "rate": report.rate, "diversity": report.diversity, "distinct": report.distinct,
               "n": len(report.attacks), "settings": asdict(job)}
    (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    tox = report.toxicity[rt.victim.name]
    with open(out / "attacks.jsonl", "w") as f:
        f.writelines(json.dumps({"attack": x, "toxicity": c, "log_p_ref": lp}) + "\n"
                     for x, c, lp in zip(report.attacks, tox, report.log_p_ref, strict=True))
    print(f"{job.method}: toxicity rate {100 * report.rate[rt.victim.name]:.1f}% against {rt.victim.name}, "
          f"diversity (mean MiniLM cosine) {report.diversity:.3f}, {report.distinct} distinct of {len(report.attacks)}")
    print(f"wrote {out} (report.json, attacks.jsonl{', adapter' if policy is not None else ''})")
    return 0


def _claim(job, model, settings: dict) -> None:
    """Key ``job.out`` to these settings and the model (``pilm.learning.checkpoint.claim``):
    another run's folder is refused unless ``--overwrite``."""
    from ..learning.checkpoint import RUN, claim

    if job.overwrite:
        Path(job.out, RUN).unlink(missing_ok=True)
    claim(job.out, json.loads(json.dumps({**settings, "model": model.name, "dtype": model.dtype_name})))


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{total / 2**20:.1f} MB"


COMMANDS = {  # name: (help, run, configs, defaults)
    "sample": ("SMC samples of sigma ∝ p0 · phi", _run_sample, (TargetConfig, SMCConfig, SampleOutput), {}),
    "train-twist": ("learn a twist head (ctl | rl | sixo | fudge | dpg)", _run_train_twist,
                    (TargetConfig, TwistTrainingConfig, TwistOutput), {}),
    "finetune": ("fine-tune a LoRA policy into a sampler of sigma (subtb | tb | reinforce | rws | sft)", _run_finetune,
                 (TargetConfig, FinetuneConfig, FinetuneJob), {}),
    "bounds": ("lower/upper bounds on log Z and KL both ways, per sampler and K", _run_bounds,
               (TargetConfig, BoundsConfig, BoundsJob), {}),
    "demo": ("SMC under a constraint plain sampling rarely meets, on the embedded model", _run_demo,
             (TargetConfig, SMCConfig, SampleOutput), DEMO),
    "train-prm": ("learn a process reward (a value head that is also a twist) from Math-Shepherd rollouts",
                  _run_train_prm, (PRMTrainingConfig, PRMJob), {}),
    "scale": ("accuracy against inference compute: greedy, self-consistency, best-of-N, PRM beam search, DVTS, "
              "particle filters and particle Gibbs on a reasoning task", _run_scale, (ScaleConfig, ScaleJob), {}),
    "latent": ("reasoning as a latent variable: amortised posterior over rationales, EM, posterior predictive",
               _run_latent, (LatentConfig, LatentJob), {}),
    "red-team": ("red-teaming: train an attacker (GFlowNet + MLE, or a baseline) against a victim and measure it",
                 _run_red_team, (RedTeamJob,), {}),
    "bench": ("SMC time and memory over transformers generate, in one process", _run_bench, (BenchConfig,), {}),
}

SETTINGS = {f.name for _, _, classes, _ in COMMANDS.values() for config in classes for f in fields(config)}
"""Every setting of every command: the names a library message's ``name=value`` may use."""


def build_parser() -> Parser:
    parser = Parser(prog="pilm", description="Probabilistic inference in language models. "
                    "Each command's --help lists its flags with their defaults.")
    parser.add_argument("--version", action="version", version=f"pilm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}
    from ..potentials.spec import SPEC_HELP

    for name, (help_, _, classes, defaults) in COMMANDS.items():
        epilog = f"Potential specs: {SPEC_HELP}." if TargetConfig in classes else None
        command = sub.add_parser(name, help=help_, description=help_, prog=f"pilm {name}", epilog=epilog)
        command.add_configs(classes, defaults)
        parser.commands[name] = command
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm import tqdm

    tqdm.write(f"pilm: warning: {for_cli(str(message), SETTINGS)}", file=sys.stderr)  # below any progress bar


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's own parser, which knows its flags
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help (0), or a parse error already printed as one line (2)
        return int(done.code or 0)
    _, run, classes, defaults = COMMANDS[args.command]
    made, created, code = [], [], 2
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            made = configs(args, classes, defaults)
            created = new_folders(made)
            check_paths(made)
            check_together(made)
            code = run(*made)
        except KeyboardInterrupt:
            print(f"pilm: interrupted; {what_was_saved(args.command, made, argv)}", file=sys.stderr)
            code = 130
        except ConfigError as err:
            print(f"pilm: error: --{err.field.replace('_', '-')} {err.reason}", file=sys.stderr)
        except ResumeMismatchError as err:
            said = "; ".join(f"{flag(k)} {saved!r} there, {now!r} now" for k, (saved, now) in err.differences.items())
            same = "rerun with the same flags" + (" to resume it" if args.command in RESUMABLE else "")
            print(f"pilm: error: --out {out_of(made)} holds a run of other settings ({said}); {same}, or use --out "
                  "elsewhere or --overwrite", file=sys.stderr)
        except (PilmError, ValueError, OSError) as err:
            print(f"pilm: error: {for_cli(str(err), SETTINGS)}".splitlines()[0], file=sys.stderr)
        finally:  # whatever ended the run, a folder it made and left empty goes with it
            remove_if_empty(created)
    return code


if __name__ == "__main__":
    sys.exit(main())
