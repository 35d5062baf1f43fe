"""Amortised samplers on the embedded model: base prompting vs SFT, REINFORCE-KL and SubTB.

Random-number task (``pilm.tasks.random_number``: uniform over "0".."100" then EOS): each
method fine-tunes its own LoRA adapter on the shared base model (same steps, batch,
learning rate and seed), then is scored exactly by enumerating the 101 valid answers:
q(valid), KL(q(. | valid) || uniform) and KL(uniform || q). SFT trains on exact samples of
the target (uniform integers), the upper reference a supervised learner with perfect data
reaches. Writes results.jsonl, results.md, the training logs and a curve PNG into --out.
Rerun: make experiment-finetune
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pilm
from pilm.evaluation.plots import plot_training
from pilm.tasks.random_number import report, valid_sequences

METHODS = "sft,reinforce,subtb"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/finetune")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = pilm.load_model()
    target = pilm.tasks.random_number(model)
    rows = [{"task": "random-number", "method": "base (few-shot prompt)", "train_seconds": 0.0,
             **_scores(report(model, target))}]
    print(json.dumps(rows[-1]), flush=True)
    histories = {}
    g = torch.Generator().manual_seed(args.seed)
    valid = list(valid_sequences(model))
    demos = [valid[i] for i in torch.randint(len(valid), (args.steps * args.batch_size,), generator=g).tolist()]
    for method in args.methods.split(","):
        log = out / f"train_{method}.jsonl"
        log.unlink(missing_ok=True)
        t0 = time.perf_counter()
        policy = pilm.finetune(target, method, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               lora_rank=args.lora_rank, seed=args.seed, data=demos if method == "sft" else None,
                               progress=False, log_path=log)
        seconds = time.perf_counter() - t0
        histories[method] = policy.history
        rows.append({"task": "random-number", "method": method, "train_seconds": seconds,
                     **_scores(report(policy, target))})
        print(json.dumps(rows[-1]), flush=True)
    plot_training(histories, out / "training_random_number.png", title="random number",
                  metrics=("loss", "log_r", "diversity"))
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps({**r, "config": vars(args)}) + "\n" for r in rows)
    lines = [
        f"Random integer 0-100 on {model.name}, few-shot chat prompt. Each fine-tuned method: LoRA rank "
        f"{args.lora_rank}, {args.steps} steps x batch {args.batch_size}, lr {args.lr}, seed {args.seed}. "
        "Exact scores over the 101 valid answers.",
        "",
        "| method | valid (q mass) | KL(q(·\\|valid) ‖ uniform) | KL(uniform ‖ q) | training (s) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {100 * r['valid']:.1f}% | {r['kl_valid']:.3f} | {r['kl_uniform_q']:.3f} | "
              f"{r['train_seconds']:.0f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _scores(r: dict) -> dict:
    return {k: r[k] for k in ("valid", "kl_valid", "kl_uniform_q")}


if __name__ == "__main__":
    main()
