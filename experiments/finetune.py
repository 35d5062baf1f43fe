"""Amortised samplers on the embedded model: base prompting vs SFT, REINFORCE-KL and SubTB.

Random-number task (``pilm.tasks.random_number``: uniform over "0".."100" then EOS): each
method fine-tunes its own LoRA adapter on the shared base model (same steps, batch,
learning rate and seed), then is scored exactly by enumerating the 101 valid answers:
q(valid), KL(q(. | valid) || uniform) and KL(uniform || q). SFT trains on exact samples of
the target (uniform integers), the upper reference a supervised learner with perfect data
reaches.

Arithmetic with a calculator (``pilm.tasks.arithmetic``, Hu et al. 2024 §4.4): questions of
3-4 one-digit operands; ``--worked`` of them come with a worked rationale, ``--homework``
with the answer only. SFT imitates the worked rationales; REINFORCE-KL and SubTB sample
rationales (with the calculator) for every training question and are rewarded by the
posterior p0(z | x) p(answer | x, z) (SubTB also replays the worked rationales and anneals
the reward temperature 1.1 -> 0.5, as the paper). Accuracy is that of the greedy rationale's
last calculator result on held-out questions with 3-4 operands (in distribution) and 5
(out of distribution).

Tempered continuation (``pilm.tasks.continuation``, §4.1): the next sentence after each of a
few story openings, sigma ∝ p0^{1/T} (T = --continuation-temperature). SubTB fine-tunes one
policy over the openings; its N samples per opening are compared with N samples of p0, N
samples of p0 at token-level temperature T, beam search with N beams and diverse beam search
with N groups (Hamming penalty 1): best and mean log p0, distinct and mean pairwise edit
distance.

Infilling (``pilm.tasks.infilling``, the setting of experiments/bounds.py): one SubTB policy
over 60 endings sampled from the joint, told each ending by its prompt (``ending_first``),
the same budget as each twist there (60 steps x 16); ``pilm.bounds`` then scores it and the
base proposal with exact posterior samples from the joint (5 seeds, SIS and SMC).

Writes results_<task>.jsonl (every row with the run's settings), results.md (``table``: every
task run so far), the training logs and curve PNGs into --out. Rerun: make experiment-finetune
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import pilm
from pilm.commands.cli_args import Parser, configs
from pilm.config import FinetuneConfig
from pilm.learning.plots import plot_training
from pilm.tasks import arithmetic as arith
from pilm.tasks.continuation import PROMPTS
from pilm.tasks.random_number import report, valid_sequences

METHODS = "sft,reinforce,subtb"
TASKS = ("random-number", "arithmetic", "continuation", "infilling")
TRAINING = {"steps": 100, "batch_size": 8, "lr": 5e-4, "lora_rank": 64, "seed": 0}
INFILLING = {"max_new_tokens": 8, "suffix_tokens": 4, "endings": 60, "batch_size": 16, "seeds": 5}
"""The infilling setting (docs/bounds'): horizon, ending length, training endings, batch, bound seeds."""


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/finetune")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--arithmetic-steps", type=int, default=120)
    p.add_argument("--worked", type=int, default=10, help="training questions with a worked rationale")
    p.add_argument("--homework", type=int, default=40, help="training questions with the answer only")
    p.add_argument("--test", type=int, default=50, help="held-out questions per column")
    p.add_argument("--continuation-temperature", type=float, default=0.5)
    p.add_argument("--continuation-steps", type=int, default=60)
    p.add_argument("--n", type=int, default=8, help="samples or beams per opening")
    p.add_argument("--infilling-steps", type=int, default=60)
    p.add_argument("--ks", default="1,4,16,64", help="particle counts of the infilling bounds")
    p.add_configs([FinetuneConfig], TRAINING, only=TRAINING)  # pilm finetune's flags, this study's defaults
    args, _ = p.parse_configs([FinetuneConfig], TRAINING)  # checks the ranges before anything runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = pilm.load_model()
    config = {**vars(args), "model": model.name, "infilling": INFILLING}
    for task in args.tasks.split(","):
        rows, histories = {"random-number": random_number, "arithmetic": arithmetic,
                           "continuation": continuation, "infilling": infilling}[task](model, args, out)
        slug = task.replace("-", "_")
        plot_training(histories, out / f"training_{slug}.png", title=task, metrics=("loss", "log_r", "diversity"))
        with open(out / f"results_{slug}.jsonl", "w") as f:
            f.writelines(json.dumps({**r, "config": config}) + "\n" for r in rows)
    from results import write  # experiments/results.py, next to this script

    print(write(out, "finetune")["results.md"])


def random_number(model, args, out: Path) -> tuple[list[dict], dict]:
    target = pilm.tasks.random_number(model)
    rows = [{"task": "random-number", "method": "base (few-shot prompt)", "train_seconds": 0.0,
             **_scores(report(model, target))}]
    print(json.dumps(rows[-1]), flush=True)
    g = torch.Generator().manual_seed(args.seed)
    valid = list(valid_sequences(model))
    demos = [valid[i] for i in torch.randint(len(valid), (args.steps * args.batch_size,), generator=g).tolist()]
    histories = {}
    for method in args.methods.split(","):
        trained, seconds = _train(target, method, args, out / f"train_{method}.jsonl", steps=args.steps,
                                  data=demos if method == "sft" else None)
        histories[method], policy = trained.history, trained.model
        rows.append({"task": "random-number", "method": method, "train_seconds": seconds,
                     **_scores(report(policy, target))})
        print(json.dumps(rows[-1]), flush=True)
    return rows, histories


def arithmetic(model, args, out: Path) -> tuple[list[dict], dict]:
    targets, worked, tool = arith.training_set(model, worked=args.worked, homework=args.homework, seed=args.seed)
    train = arith.problems(args.worked + args.homework, (3, 4), seed=args.seed)
    held_in = arith.held_out(args.test, (3, 4), seed=args.seed + 1, exclude=train)
    held_out = arith.held_out(args.test, 5, seed=args.seed + 2)

    def scores(sampler) -> dict:
        return {"accuracy_in": arith.accuracy(sampler, held_in, model=model),
                "accuracy_out": arith.accuracy(sampler, held_out, model=model)}

    t0 = time.perf_counter()
    rows = [{"task": "arithmetic", "method": "base (few-shot prompt)", "train_seconds": 0.0, **scores(model)}]
    print(json.dumps(rows[-1]), f"eval {time.perf_counter() - t0:.0f}s", flush=True)
    histories = {}
    for method in args.methods.split(","):
        extra = {"reward_temperature": (1.1, 0.5)} if method == "subtb" else {}
        trained, seconds = _train(targets, method, args, out / f"train_arithmetic_{method}.jsonl",
                                  steps=args.arithmetic_steps, data=worked if method != "reinforce" else None,
                                  tool=tool, **extra)
        histories[method], policy = trained.history, trained.model
        rows.append({"task": "arithmetic", "method": method, "train_seconds": seconds, **scores(policy)})
        print(json.dumps(rows[-1]), flush=True)
    return rows, histories


def continuation(model, args, out: Path) -> tuple[list[dict], dict]:
    from pilm.evaluation.metrics import likelihood_and_diversity
    from pilm.inference.search import beam_search
    from pilm.learning.policy_trainer import sample_trajectories
    from pilm.learning.replay import pad
    from pilm.tasks.continuation import tempered_continuation

    temp = args.continuation_temperature
    targets = [tempered_continuation(p, model, temperature=temp) for p in PROMPTS]
    trained, seconds = _train(targets, "subtb", args, out / "train_continuation_subtb.jsonl",
                              steps=args.continuation_steps)
    policy = trained.model
    n, horizon = args.n, targets[0].max_new_tokens
    g = torch.Generator().manual_seed(args.seed)
    decoders = {
        "sampling p0": lambda t: sample_trajectories(model, t, n, g),
        f"sampling p0, token temperature {temp:g}": lambda t: sample_trajectories(model, t, n, g, temp),
        f"beam search ({n} beams)": lambda t: pad([h.tokens for h in beam_search(
            model, t.prompt_ids, beams=n, max_new_tokens=horizon, stop=t.stop_token_id)], horizon),
        f"diverse beam search ({n} groups, penalty 1)": lambda t: pad([h.tokens for h in beam_search(
            model, t.prompt_ids, beams=n, max_new_tokens=horizon, stop=t.stop_token_id, groups=n, diversity=1.0)],
            horizon),
        f"SubTB policy, sigma ∝ p0^(1/{temp:g})": lambda t: sample_trajectories(policy, t, n, g),
    }
    rows = []
    for name, decode in decoders.items():
        scores = [likelihood_and_diversity(t, decode(t)) for t in targets]
        mean = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
        rows.append({"task": "continuation", "method": name,
                     "train_seconds": seconds if name.startswith("SubTB") else 0.0, **mean})
        print(json.dumps(rows[-1]), flush=True)
    return rows, {"subtb": trained.history}


def infilling(model, args, out: Path) -> tuple[list[dict], dict]:
    from pilm.inference import ModelProposal
    from pilm.tasks import joint_samples
    from pilm.tasks.infilling import DEFAULT_PROMPT, ending_first

    s = INFILLING
    pairs = joint_samples(model, DEFAULT_PROMPT, max_new_tokens=s["max_new_tokens"], suffix_tokens=s["suffix_tokens"],
                          n=s["endings"], seed=10_000)
    targets = [pilm.tasks.infilling(model, suffix=c, max_new_tokens=s["max_new_tokens"]) for _, c in pairs]
    log = out / "train_infilling_subtb.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    trained = pilm.finetune(targets, "subtb", config=_training(args), steps=args.infilling_steps,
                            batch_size=s["batch_size"], policy_prompt=ending_first, progress=False, log_path=log)
    policy = trained.model
    seconds = time.perf_counter() - t0
    report = pilm.bounds(targets[0], {"base": None, "subtb": ModelProposal(policy, prompt=ending_first)},
                         [int(k) for k in args.ks.split(",")], exact_samples="joint", seeds=s["seeds"], seed=0)
    print(report.table(), flush=True)
    rows = [{"task": "infilling", **r, "train_seconds": seconds if r["sampler"] == "subtb" else 0.0}
            for r in report.rows]
    return rows, {"subtb": trained.history}


def _train(target, method, args, log: Path, *, steps: int, **kw):
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    trained = pilm.finetune(target, method, config=_training(args), steps=steps, progress=False, log_path=log, **kw)
    return trained, time.perf_counter() - t0


def _training(args) -> FinetuneConfig:
    """The fine-tuning settings the flags give (``TRAINING``'s defaults, pilm's for the rest)."""
    return configs(args, [FinetuneConfig], TRAINING)[0]


def table(rows: list[dict]) -> str:
    """results.md: one section per task with rows (those of every results_<task>.jsonl), in TASKS
    order, each captioned with the settings in its rows' config."""
    sections = []
    for task, section in SECTIONS.items():
        mine = [r for r in rows if r["task"] == task]
        if mine:
            caption, lines = section(mine, mine[0]["config"])
            sections.append("\n".join([caption, "", *lines]))
    return "\n\n".join(sections) + "\n"


def _random_number_table(rows: list[dict], c: dict) -> tuple[str, list[str]]:
    return (f"Random integer 0-100 on {c['model']}, few-shot chat prompt. Each fine-tuned method: LoRA rank "
            f"{c['lora_rank']}, {c['steps']} steps x batch {c['batch_size']}, lr {c['lr']}, seed {c['seed']}. "
            "Exact scores over the 101 valid answers.",
            _lines(["method", "valid (q mass)", "KL(q(·\\|valid) ‖ uniform)", "KL(uniform ‖ q)", "training (s)"],
            [f"| {r['method']} | {100 * r['valid']:.1f}% | {r['kl_valid']:.3f} | {r['kl_uniform_q']:.3f} | "
             f"{r['train_seconds']:.0f} |" for r in rows]))


def _arithmetic_table(rows: list[dict], c: dict) -> tuple[str, list[str]]:
    return (f"Arithmetic with a calculator on {c['model']}, 3-shot prompt. Training: {c['worked']} questions with "
            f"worked rationales (SFT's data) and {c['homework']} with answers only; LoRA rank {c['lora_rank']}, "
            f"{c['arithmetic_steps']} steps x batch {c['batch_size']}, lr {c['lr']}, seed {c['seed']}. Accuracy of "
            f"the greedy rationale on {c['test']} held-out questions per column.",
            _lines(["method", "accuracy, 3-4 operands (in distribution)", "accuracy, 5 operands (OOD)", "training (s)"],
            [f"| {r['method']} | {100 * r['accuracy_in']:.0f}% | {100 * r['accuracy_out']:.0f}% | "
             f"{r['train_seconds']:.0f} |" for r in rows]))


def _continuation_table(rows: list[dict], c: dict) -> tuple[str, list[str]]:
    return (f"Next sentence after {len(PROMPTS)} openings on {c['model']}, {c['n']} completions per opening "
            f"(stop at '.', at most 20 tokens), averaged over openings. SubTB: one LoRA policy for all openings, "
            f"{c['continuation_steps']} steps x batch {c['batch_size']}, lr {c['lr']}, seed {c['seed']}.",
            _lines(["decoder", "best log p0", "mean log p0", "distinct", "pairwise edit distance", "ends at '.'"],
            [f"| {r['method']} | {r['max_log_p']:.1f} | {r['mean_log_p']:.1f} | {100 * r['distinct']:.0f}% | "
             f"{r['pairwise_edit']:.2f} | {100 * r['finished']:.0f}% |" for r in rows]))


def _infilling_table(rows: list[dict], c: dict) -> tuple[str, list[str]]:
    from bounds import gap_summary  # experiments/bounds.py, next to this script

    s = c["infilling"]
    trained = next(r["train_seconds"] for r in rows if r["sampler"] == "subtb")
    return (f"Infilling on {c['model']} (the setting of docs/bounds: {s['max_new_tokens']} new tokens, a "
            f"{s['suffix_tokens']}-token ending sampled from the joint per seed, {rows[0]['seeds']} seeds). SubTB: one "
            f"policy for {s['endings']} endings, told the ending by its prompt, {c['infilling_steps']} steps x batch "
            f"{s['batch_size']}, lr {c['lr']} ({trained:.0f} s). Gap = upper - lower bound on log Z.",
            gap_summary(rows))


def _lines(head: list[str], body: list[str]) -> list[str]:
    """A markdown table's lines: the header, its rule, then the body rows."""
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|", *body]


SECTIONS = {"random-number": _random_number_table, "arithmetic": _arithmetic_table,
            "continuation": _continuation_table, "infilling": _infilling_table}


def _scores(r: dict) -> dict:
    return {k: r[k] for k in ("valid", "kl_valid", "kl_uniform_q")}


if __name__ == "__main__":
    main()
