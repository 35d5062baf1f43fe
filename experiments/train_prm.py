"""Train the learned PRM of the scaling experiment: a tied value head on SmolLM2-135M, fitted to
Math-Shepherd labels (rollouts from each step end of one chain per training problem, at the
policy temperature of ``pilm scale``), on problems drawn with another seed than the test set.

    python experiments/train_prm.py --out docs/scale/learned_prm --problems 60 --rollouts 8 --steps 300
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pilm
from pilm.config import ScaleConfig
from pilm.tasks import arithmetic_chain as task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/scale/learned_prm")
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1, help="problem seed (the test set of pilm scale uses 0)")
    args = parser.parse_args()
    if (Path(args.out) / "twist_config.json").exists():
        print(f"{args.out} already holds a trained PRM; remove it to train again")
        return
    model = pilm.load_model()
    test = {p["question"] for p in task.problems(ScaleConfig.problems, ScaleConfig.operands, seed=ScaleConfig.seed)}
    train = [p for p in task.problems(args.problems + len(test), ScaleConfig.operands, seed=args.seed)
             if p["question"] not in test][: args.problems]
    targets = [task.target(model, p["question"]) for p in train]
    prm = pilm.train_prm(targets, verifier=task.answer_checker(), rollouts=args.rollouts, chains=args.chains,
                         steps=args.steps, temperature=ScaleConfig.temperature)
    folder = prm.save_pretrained(args.out)
    report = {**prm.prm_data, "problems": len(train), "steps": args.steps, "final_loss": prm.history[-1]["loss"]}
    Path(folder, "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
