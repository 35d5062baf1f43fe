"""Why the trained subjectivity classifiers sit at chance (issue 15): signal or calibration?

For zero-shot and the saved SFT adapter at 10 labels (docs/latent/runs/labels10/sft), on the same
test items as experiments/latent.py: the AUC of p(subjective | X) (the chance that a subjective
sentence scores above an objective one: threshold-free), and the accuracy when the threshold is
the median score instead of 1/2 (a calibration that uses the test set's balance, so a diagnostic,
not a method). Writes --out (JSON). Rerun: python experiments/latent_calibration.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pilm.models.adapter import LoRAPolicy
from pilm.models.registry import load_model
from pilm.tasks import subjectivity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="SUBJ folder (default: the data shipped with pilm)")
    p.add_argument("--runs", default="docs/latent/runs")
    p.add_argument("--test-limit", type=int, default=300)
    p.add_argument("--out", default="docs/latent/calibration.json")
    args = p.parse_args()
    model = load_model()
    data = subjectivity.load(args.data, labels=10, test_limit=args.test_limit)
    reasoner = subjectivity.reasoner(model)
    gold = torch.tensor([reasoner.latent.index(e.y) for e in data.test])
    scores = {"zero-shot": torch.tensor(reasoner.direct(data.test).probs)[:, 1]}
    for run in sorted(Path(args.runs).glob("labels*/sft")):
        sft = LoRAPolicy.from_pretrained(model, run, adapter_name=f"sft_{run.parent.name}")
        scores[f"sft ({run.parent.name})"] = torch.tensor(reasoner.direct(data.test, sft).probs)[:, 1]
    out = {name: {"auc": auc(s, gold), "accuracy_at_half": float(((s > 0.5).long() == gold).double().mean()),
                  "accuracy_at_median": float(((s > s.median()).long() == gold).double().mean())}
           for name, s in scores.items()}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


def auc(score: torch.Tensor, gold: torch.Tensor) -> float:
    """P(a subjective item scores above an objective one), ties counting one half."""
    s1, s0 = score[gold == 1], score[gold == 0]
    return float((s1[:, None] > s0[None, :]).double().mean() + 0.5 * (s1[:, None] == s0[None, :]).double().mean())


if __name__ == "__main__":
    main()
