"""``pilm`` on the command line: sample | train-twist | train-skip | finetune | bounds | train-prm | scale | demo | bench.

Each command has its own parser, generated from the config dataclasses it runs
(``pilm.config``; see ``pilm.commands.cli_args``), so its defaults are the library's and ``--help``
shows them. Every failure is one ``pilm: error: ...`` line on stderr with exit code 2, and
everything that can be checked before the model loads (counts, ranges, potential specs,
folders, output paths) is checked first.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .. import __version__
from ..config import (
    BoundsConfig,
    DeviceConfig,
    FinetuneConfig,
    LatentConfig,
    PRMTrainingConfig,
    ScaleConfig,
    SkipTrainingConfig,
    SMCConfig,
    TargetConfig,
    TwistTrainingConfig,
)
from ..errors import ConfigError, PilmError, ResumeMismatchError
from ..models.device import placed
from .cli_args import (
    Parser,
    check_paths,
    check_together,
    configs,
    new_folders,
    remove_if_empty,
)
from .cli_messages import RESUMABLE, flag, for_cli, note, out_of, what_was_saved
from .jobs import (
    BenchConfig,
    BoundsJob,
    FinetuneJob,
    LatentJob,
    PRMJob,
    RedTeamJob,
    SampleOutput,
    ScaleJob,
    SkipJob,
    TwistOutput,
)
from .training import (
    run_finetune,
    run_latent,
    run_red_team,
    run_train_prm,
    run_train_skip,
    run_train_twist,
    target_from_flags,
)

DEMO = {"prompt": "My favourite weather is", "potential": ("regex:[^eE]*",), "n_particles": 32, "mask": True,
        "max_new_tokens": 16, "out": "results.jsonl", "plot": "ess.png"}
EXTINCT = 1  # exit code of a run whose particles all died (--on-extinction return: 0)
PLAIN_DRAWS = 512  # the demo also counts how often plain sampling meets its constraint


def _run_sample(tc: TargetConfig, sc: SMCConfig, out: SampleOutput) -> int:
    res = _sample(target_from_flags(tc), tc, sc, out)
    return EXTINCT if math.isinf(res.log_z) and sc.on_extinction == "warn" else 0


def _sample(target, tc: TargetConfig, sc: SMCConfig, out: SampleOutput):
    from .. import smc
    from ..evaluation.plots import plot_ess
    from ..models import LanguageModel, LoRAPolicy
    from ..potentials.likelihood import suffix_of
    from ..proposals import ExactLastProposal, Proposal, make_proposal
    from ..twists import load_twist

    twist = load_twist(out.twist, target.model) if out.twist else None
    if out.skip:
        from ..learning import SkipModel

        target = SkipModel.from_pretrained(out.skip, target.model).lookahead(target)
    if sc.mask and target.potential is None:
        note("--mask without a --potential: there is no constraint to mask")
    policy = LoRAPolicy.from_pretrained(target.model, out.adapter) if out.adapter else None  # shares the weights
    proposal: str | LanguageModel | Proposal | None = "masked" if sc.mask else policy
    if sc.exact_last:  # the last token from p0 phi, whatever proposes before it
        proposal, twist = ExactLastProposal(make_proposal(twist, proposal, sc.proposal_beta), top_m=sc.exact_last), None
    res = smc(target, sc.n_particles, twist=twist, proposal=proposal,
              proposal_beta=sc.proposal_beta, resample=sc.resample, ess_threshold=sc.ess_threshold, seed=sc.seed,
              on_extinction=sc.on_extinction)
    if sc.exact_last:
        how = f"proposal {res.info['proposal']}" + (f", skip model's look-ahead ({out.skip})" if out.skip else "")
    elif policy is not None:
        how = f"proposals from the fine-tuned policy {out.adapter}, weighted to sigma"
    elif sc.mask:
        how = "masked proposal: only tokens that keep the constraint satisfiable" + (", twisted" if twist else "")
    elif twist is not None:
        how = "twisted SMC"
    elif target.potential is None:
        how = "plain sampling"
    elif out.skip:
        how = f"SMC on the skip model's look-ahead ({out.skip})"
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

    target = target_from_flags(tc)
    res = _sample(target, tc, sc, out)
    plain = importance_sample(target, PLAIN_DRAWS, seed=sc.seed, on_extinction="return", progress=True)
    met = sum(math.isfinite(w) for w in plain.log_weights)
    print(f"plain sampling met the constraint in {met} of {PLAIN_DRAWS} draws (Z-hat = {math.exp(plain.log_z):.4f}); "
          f"SMC's {sc.n_particles} particles estimated Z-hat = {math.exp(res.log_z):.4f}, and every sample above "
          "meets it")
    return 0


def _run_bounds(tc: TargetConfig, cfg: BoundsConfig, job: BoundsJob) -> int:
    from dataclasses import asdict

    from .. import bounds, load_model
    from ..twists import load_twist

    target = target_from_flags(tc)
    samplers: dict = {"base": None}
    for name, where in job.samplers():
        if where.startswith("model:"):
            samplers[name] = load_model(where.removeprefix("model:"))
        elif where.startswith("adapter:"):
            samplers[name] = load_model(tc.model, adapter=where.removeprefix("adapter:"))
        else:
            samplers[name] = load_twist(where, target.model)
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


def _run_scale(cfg: ScaleConfig, job: ScaleJob) -> int:
    from .scale_report import plot, report, summarise
    from .scaling import is_main_process, run_scale

    rows = run_scale(cfg, job.out, prm_path=job.prm_path, overwrite=job.overwrite)
    if is_main_process():
        text = report(rows)
        Path(job.out, "table.md").write_text(text)
        plot(summarise(rows), Path(job.out, "scale.png"))
        print(text)
        print(f"wrote {rows}, {Path(job.out, 'table.md')} and {Path(job.out, 'scale.png')}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[..., int], tuple[type, ...], dict]] = {  # name: (help, run, configs, defaults)
    "sample": ("SMC samples of sigma ∝ p0 · phi", _run_sample, (TargetConfig, SMCConfig, SampleOutput), {}),
    "train-twist": ("learn a twist head (ctl | rl | sixo | fudge | dpg)", run_train_twist,
                    (TargetConfig, TwistTrainingConfig, TwistOutput), {}),
    "train-skip": ("learn infilling's look-ahead twist p0(ending | prompt, prefix) by maximum likelihood on the "
                   "model's joint draws (use: pilm sample --potential suffix:TEXT --skip FOLDER)", run_train_skip,
                   (SkipTrainingConfig, SkipJob), {}),
    "finetune": ("fine-tune a LoRA policy into a sampler of sigma (subtb | tb | reinforce | rws | sft)", run_finetune,
                 (TargetConfig, FinetuneConfig, FinetuneJob), {}),
    "bounds": ("lower/upper bounds on log Z and KL both ways, per sampler and K", _run_bounds,
               (TargetConfig, BoundsConfig, BoundsJob), {}),
    "demo": ("SMC under a constraint plain sampling rarely meets, on the embedded model", _run_demo,
             (TargetConfig, SMCConfig, SampleOutput), DEMO),
    "train-prm": ("learn a process reward (a value head that is also a twist) from Math-Shepherd rollouts",
                  run_train_prm, (PRMTrainingConfig, PRMJob), {}),
    "scale": ("accuracy against inference compute: greedy, self-consistency, best-of-N, PRM beam search, DVTS, "
              "particle filters and particle Gibbs on a reasoning task", _run_scale, (ScaleConfig, ScaleJob), {}),
    "latent": ("reasoning as a latent variable: amortised posterior over rationales, EM, posterior predictive",
               run_latent, (LatentConfig, LatentJob), {}),
    "red-team": ("red-teaming: train an attacker (GFlowNet + MLE, or a baseline) against a victim and measure it",
                 run_red_team, (RedTeamJob,), {}),
    "bench": ("SMC time and memory over transformers generate, in one process", _run_bench, (BenchConfig,), {}),
}

SETTINGS = {f.name for _, _, classes, _ in COMMANDS.values() for config in (*classes, DeviceConfig) for f in fields(config)}
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
        command.add_configs((*classes, DeviceConfig), defaults)
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
            *made, where = configs(args, (*classes, DeviceConfig), defaults)
            with placed(where.device, where.dtype):  # an impossible device fails here, before any model loads
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
