"""``pilm`` on the command line: sample | train-twist | finetune | bounds | demo | bench.

Bad input (an unknown potential spec or model, an impossible target) gives a one-line
``pilm: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .errors import PilmError

DEMO = dict(prompt="The movie was", potential="sentiment:positive:10", n_particles=32, max_new_tokens=24)


def _sample_args(p: argparse.ArgumentParser, defaults: dict, *, particles: bool = True) -> None:
    from .inference.resampling import SCHEMES
    from .potentials import SPEC_HELP

    p.add_argument("--model", default=None, help="embedded name (default smollm2-135m), hub id or local folder")
    p.add_argument("--prompt", default=defaults.get("prompt", ""))
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--potential", action="append", default=None,
                   help=f"repeat to multiply potentials. Specs: {SPEC_HELP}")
    if particles:
        p.add_argument("--n-particles", type=int, default=defaults.get("n_particles", 32))
    p.add_argument("--max-new-tokens", type=int, default=defaults.get("max_new_tokens", 24))
    p.add_argument("--resample", choices=list(SCHEMES), default="systematic")
    p.add_argument("--ess-threshold", type=float, default=0.5, help="resample when ESS < this x N (1: always, 0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=5, help="how many distinct samples to print")
    p.add_argument("--out", default=defaults.get("out"), help="sample: append the run to this JSONL file; train-twist: the twist folder")
    p.add_argument("--plot", default=defaults.get("plot"), help="write the ESS-over-steps PNG here")
    p.add_argument("--twist", default=None, help="folder of a twist saved by train-twist (twisted SMC)")
    if "potential" in defaults:
        p.set_defaults(potential=[defaults["potential"]])


def _target(args: argparse.Namespace):
    from . import load_model
    from .potentials.spec import check_spec, parse_potential
    from .target import Target

    for spec in args.potential or []:
        check_spec(spec)  # before the model loads
    model = load_model(args.model)
    potential = None
    for p in (parse_potential(spec, model) for spec in args.potential or []):
        potential = p if potential is None else potential * p
    return Target(model, args.prompt, potential, max_new_tokens=args.max_new_tokens, chat=args.chat)


def _run_sample(args: argparse.Namespace) -> int:
    from . import smc
    from .evaluation.plots import plot_ess
    from .twists import Twist

    target = _target(args)
    model, potential = target.model, target.potential
    twist = Twist.from_pretrained(args.twist, model) if args.twist else None
    res = smc(target, args.n_particles, twist=twist, resample=args.resample, ess_threshold=args.ess_threshold,
              seed=args.seed)
    print(f"model {model.name} · prompt {args.prompt!r} · potential {potential} · N={args.n_particles} · seed {args.seed}")
    print("top samples (total normalised weight):")
    for w, text in res.top(args.top):
        print(f"  {w:6.3f}  {args.prompt + text!r}")
    print(f"log Z-hat = {res.log_z:.4f}   (Z-hat = {math.exp(res.log_z):.4g}, unbiased for Z)")
    print("ESS per step: " + " ".join(f"{e:.1f}" for e in res.ess))
    print(f"resampled at steps: {res.resampled_at or 'none'}   ({res.info['seconds']:.1f} s)")
    if args.out:
        res.to_jsonl(args.out, append=True)
        print(f"wrote {args.out}")
    if args.plot:
        plot_ess(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_train_twist(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import train_twist

    target = _target(args)
    out = Path(args.out)
    twist = train_twist(
        target, args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        head=args.head, checkpoint_dir=out, checkpoint_every=args.checkpoint_every,
        log_path=out / "train.jsonl", plot_path=out / "training.png",
    )
    twist.save_pretrained(out)
    last = twist.history[-1]
    print(f"trained a {args.head} twist with {args.objective} for {args.steps} steps: "
          f"final loss {last['loss']:.4g}, batch ESS {last['ess']:.1f}/{args.batch_size}")
    print(f"wrote {out} (twist, checkpoint, train.jsonl, training.png); use: pilm sample ... --twist {out}")
    return 0


def _run_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import finetune, load_model
    from .tasks import arithmetic, random_number

    data = tool = None
    if args.task == "random-number":
        target = random_number(load_model(args.model), max_new_tokens=None)
    elif args.task == "arithmetic":  # 10 worked questions (SFT's data, SubTB's replay) and 40 with answers only
        target, data, tool = arithmetic.training_set(load_model(args.model), seed=args.seed)
    else:
        target = _target(args)
    temps = [float(t) for t in args.reward_temperature.split(",")]
    explore = tuple(float(x) for x in args.explore.split(",")) if args.explore else None
    out = Path(args.out)
    policy = finetune(
        target, args.objective, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup=args.warmup, seed=args.seed, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, explore=explore, reward_temperature=temps[0] if len(temps) == 1 else tuple(temps),
        min_log_reward=args.min_log_reward, checkpoint_dir=out, checkpoint_every=args.checkpoint_every,
        log_path=out / "train.jsonl", plot_path=out / "training.png", data=data, tool=tool,
    )
    policy.save_pretrained(out)
    last = policy.history[-1]
    print(f"fine-tuned a rank-{args.lora_rank} LoRA policy with {args.objective} for {args.steps} steps: "
          f"final loss {last['loss']:.4g}, mean log R {last['log_r']:.3g}")
    print(f"wrote {out} (adapter, checkpoint, train.jsonl, training.png); "
          f"load with pilm.load_model(..., adapter={str(out)!r}) or: pilm bounds ... --sampler NAME=adapter:{out}")
    return 0


def _run_bounds(args: argparse.Namespace) -> int:
    from . import bounds, load_model
    from .twists import Twist

    target = _target(args)
    samplers: dict = {"base": None}
    for spec in args.sampler or []:
        name, sep, where = spec.partition("=")
        if not sep:
            raise ValueError(f"--sampler takes NAME=TWIST_DIR, NAME=model:MODEL or NAME=adapter:DIR, got {spec!r}")
        if where.startswith("model:"):
            samplers[name] = load_model(where.removeprefix("model:"))
        elif where.startswith("adapter:"):
            samplers[name] = load_model(args.model, adapter=where.removeprefix("adapter:"))
        else:
            samplers[name] = Twist.from_pretrained(where, target.model)
    report = bounds(target, samplers, [int(k) for k in args.n_particles.split(",")], exact_samples=args.exact_samples,
                    seeds=args.seeds, methods=args.methods.split(","), seed=args.seed)
    print(report.table())
    if args.out:
        report.to_jsonl(args.out)
        print(f"wrote {args.out}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark

    report = run_benchmark(n_particles=args.n_particles, new_tokens=args.new_tokens, repeats=args.repeats)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for key, value in report.items():
            print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pilm", description="Probabilistic inference in language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="SMC samples of sigma ∝ p0 · phi")
    _sample_args(sample, {})
    sample.set_defaults(run=_run_sample)
    train = sub.add_parser("train-twist", help="learn a twist head (ctl | rl | sixo | fudge | dpg)")
    _sample_args(train, {})
    train.add_argument("--objective", default="ctl", choices=["ctl", "rl", "sixo", "fudge", "dpg"])
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--head", default="mlp", choices=["mlp", "linear", "tied"])
    train.add_argument("--checkpoint-every", type=int, default=50)
    train.set_defaults(run=_run_train_twist, out="twist")
    ft = sub.add_parser("finetune", help="fine-tune a LoRA policy into a sampler of sigma (subtb | tb | reinforce | rws | sft)")
    _sample_args(ft, {}, particles=False)
    ft.add_argument("--task", choices=["random-number", "arithmetic"], default=None, help="a ready-made target instead of --prompt/--potential")
    ft.add_argument("--objective", default="subtb", choices=["subtb", "tb", "reinforce", "rws", "sft"])
    ft.add_argument("--steps", type=int, default=500)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--grad-accum", type=int, default=1)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--warmup", type=int, default=20)
    ft.add_argument("--lora-rank", type=int, default=64)
    ft.add_argument("--lora-alpha", type=int, default=16)
    ft.add_argument("--lora-dropout", type=float, default=0.1)
    ft.add_argument("--explore", default=None, help="on-policy,tempered,replay probabilities (default per objective)")
    ft.add_argument("--reward-temperature", default="1.0", help="tau, or tau_start,tau_end annealed linearly")
    ft.add_argument("--min-log-reward", type=float, default=-100.0,
                    help="log eps: phi = 0 at a trajectory's end counts as eps (R = p0 max(phi, eps))")
    ft.add_argument("--checkpoint-every", type=int, default=50)
    ft.set_defaults(run=_run_finetune, out="policy")
    bnd = sub.add_parser("bounds", help="lower/upper bounds on log Z and KL both ways, per sampler and K")
    _sample_args(bnd, {}, particles=False)
    bnd.add_argument("--sampler", action="append", help="NAME=TWIST_DIR, NAME=model:MODEL or NAME=adapter:DIR (repeatable; 'base' is always in)")
    bnd.add_argument("--n-particles", default="1,4,16,64", help="comma-separated K values")
    bnd.add_argument("--seeds", type=int, default=10)
    bnd.add_argument("--methods", default="sis,smc")
    bnd.add_argument("--exact-samples", default="auto", choices=["auto", "joint", "rejection", "enumerate"])
    bnd.set_defaults(run=_run_bounds)
    demo = sub.add_parser("demo", help="positive continuations of 'The movie was' on the embedded model")
    _sample_args(demo, {**DEMO, "out": "results.jsonl", "plot": "ess.png"})
    demo.set_defaults(run=_run_sample)
    bench = sub.add_parser("bench", help="SMC time and memory over transformers generate, in one process")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--n-particles", type=int, default=64)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=2, help="timed rounds of each leg (alternating)")
    bench.set_defaults(run=_run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PilmError, ValueError) as err:
        print(f"pilm: error: {err}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
