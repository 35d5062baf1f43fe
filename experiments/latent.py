"""Subjectivity with a latent rationale (issue 15): the table of test accuracy at 10 / 20 / 50
labels for zero-shot, few-shot, supervised LoRA, chain-of-thought vote, the amortised
posterior (E-step only) and + EM (one E-step then one M-step, as Hu et al. ran it).

Every method runs on the same model, template and test items (the first --test-limit of
test.jsonl). Zero-shot and the CoT vote use no labels and run once. Each row lands in
--out/results.jsonl as it finishes, with the run's settings (a rerun skips the rows already
there; trained adapters are saved under --out/runs/labels<n>/ and reloaded), then
--out/results.md (``table``) is written. The diagnostic row measures, on the CoT rationales
of the test items, how often a rationale drawn from sigma(Z | X, gold) ∝ p(Z | X) p(gold | X, Z)
makes the base model pick the gold label. Rerun: make experiment-latent
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pilm.commands.cli_args import Parser
from pilm.commands.jobs import LatentJob
from pilm.config import LatentConfig
from pilm.inference.result import read_jsonl
from pilm.latent import LatentReasoner, Prediction
from pilm.learning.checkpoint import RESUME_ELSEWHERE, claim
from pilm.models.registry import load_model
from pilm.tasks import subjectivity

FLAGS = {"samples": 10, "e_steps": 50, "m_steps": 30, "seed": 0, "e_lr": 5e-4}


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="SUBJ folder (default: the data shipped with pilm)")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", default="10,20,50")
    p.add_argument("--test-limit", type=int, default=300)
    p.add_argument("--e-batch", type=int, default=8)
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_configs([LatentConfig, LatentJob], FLAGS, only=FLAGS)  # pilm latent's flags, this study's defaults
    args, _ = p.parse_configs([LatentConfig, LatentJob], FLAGS)  # checks the ranges before anything runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["labels"], r["method"]) for r in read_jsonl(results, missing_ok=True)}
    model = load_model()
    claim(out, {**{k: v for k, v in vars(args).items() if k not in ("out", "labels")}, "model": model.name,
                 "dtype": model.dtype_name}, remedy=RESUME_ELSEWHERE)  # rows of other settings never mix
    reasoner = subjectivity.reasoner(model)
    config = {**vars(args), "model": model.name}

    def record(labels, method, pred: Prediction | None, train_seconds: float, **extra) -> None:
        row = {"labels": labels, "method": method, "train_seconds": round(train_seconds, 1), **extra, "config": config}
        if pred is not None:
            share = {y: sum(p == y for p in pred.labels) / len(pred.labels) for y in reasoner.latent.labels}
            row.update(accuracy=pred.accuracy, ci=pred.ci, n_test=len(pred.labels), eval_seconds=round(pred.seconds, 1),
                       predicted_share=share, predicted="".join(str(reasoner.latent.labels.index(p)) for p in pred.labels))
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    data = subjectivity.load(args.data, labels=10, test_limit=args.test_limit)
    if (0, "zero-shot") not in done:
        record(0, "zero-shot", reasoner.direct(data.test), 0.0)
    if (0, "cot-vote") not in done:
        pred = reasoner.predict(data.test, None, samples=args.samples, vote="hard", seed=args.seed)
        record(0, "cot-vote", pred, 0.0)
        record(0, "cot-vote-soft", pred.revote("soft"), 0.0)
        record(0, "diagnostic", None, 0.0, **_diagnostic(reasoner, data.test, pred))
    for n in map(int, args.labels.split(",")):
        data = subjectivity.load(args.data, labels=n, test_limit=args.test_limit)
        run = out / "runs" / f"labels{n}"
        if (n, "few-shot") not in done:
            record(n, "few-shot", reasoner.direct(data.test, shots=data.train), 0.0)
        if (n, "sft") not in done:
            t0 = time.perf_counter()
            sft = reasoner.fit_direct(data.train, steps=args.sft_steps, seed=args.seed).model
            seconds = time.perf_counter() - t0
            record(n, "sft", reasoner.direct(data.test, sft), seconds)
            sft.save_pretrained(run / "sft")
        if (n, "e-step") in done and (n, "em") in done:
            continue  # nothing left to train or measure at this label count
        q, lik = _saved(reasoner, run)
        if q is None:
            t0 = time.perf_counter()
            q = reasoner.e_step(data.train, steps=args.e_steps, batch_size=args.e_batch, lr=args.e_lr,
                                reward_temperature=(1.2, 1.0), seed=args.seed).model
            reasoner.save(run, q)
            (run / "e_seconds.json").write_text(json.dumps(time.perf_counter() - t0))
        e_seconds = json.loads((run / "e_seconds.json").read_text())
        if (n, "e-step") not in done:
            pred = reasoner.predict(data.test, q, samples=args.samples, vote="hard", seed=args.seed)
            record(n, "e-step", pred, e_seconds)
            record(n, "e-step-soft", pred.revote("soft"), e_seconds)
        if lik is None and (n, "em") not in done:
            t0 = time.perf_counter()
            lik = reasoner.m_step(data.train, q, steps=args.m_steps, seed=args.seed).model
            reasoner.save(run, q, lik)
            (run / "m_seconds.json").write_text(json.dumps(time.perf_counter() - t0))
        if (n, "em") not in done:
            m_seconds = json.loads((run / "m_seconds.json").read_text())
            pred = reasoner.predict(data.test, q, lik, samples=args.samples, vote="hard", seed=args.seed)
            record(n, "em", pred, e_seconds + m_seconds)
            record(n, "em-soft", pred.revote("soft"), e_seconds + m_seconds)
    from results import write  # experiments/results.py, next to this script

    print(write(out, "latent")["results.md"])


def _saved(reasoner: LatentReasoner, run: Path):
    if not (run / "latent.json").exists():
        return None, None
    _, q, lik = LatentReasoner.load(reasoner.model, run)
    return q, lik


def _diagnostic(reasoner: LatentReasoner, test, pred: Prediction) -> dict:
    """From the prior's rationales of each test item: the fraction whose argmax label is the
    gold one, under the prior and under sigma(Z | X, gold) (self-normalised weights
    p(gold | X, Z)), and the fraction of items where any rationale gets it right."""
    each = torch.tensor(pred.per_rationale)  # (n, k, labels)
    gold = torch.tensor([reasoner.latent.index(ex.y) for ex in test])
    p_gold = each.gather(2, gold.view(-1, 1, 1).expand(-1, each.shape[1], 1)).squeeze(2)
    right = (each.argmax(-1) == gold[:, None]).double()
    w = p_gold.double() / p_gold.double().sum(1, keepdim=True).clamp(min=1e-300)
    return {"right_under_prior": float(right.mean()), "right_under_sigma": float((w * right).sum(1).mean()),
            "any_right": float(right.max(1).values.mean())}


def table(rows: list[dict]) -> str:
    """results.md: test accuracy [95% Wilson interval] · share predicted objective (training
    seconds) per method and label count, then the diagnostic (rationales per item from its config)."""
    names = [("zero-shot", "zero-shot"), ("few-shot", "few-shot (labels in the prompt)"), ("sft", "SFT (LoRA, labels only)"),
             ("cot-vote", "CoT vote (prior, hard)"), ("cot-vote-soft", "CoT vote (prior, soft)"),
             ("e-step", "amortised posterior, E-step only (hard)"), ("e-step-soft", "amortised posterior, E-step only (soft)"),
             ("em", "+ EM, one round (hard)"), ("em-soft", "+ EM, one round (soft)")]
    by = {(r["labels"], r["method"]): r for r in rows}
    ns = sorted({r["labels"] for r in rows if r["labels"]})
    n_test = next((r["n_test"] for r in rows if "n_test" in r), 0)
    lines = [f"Test accuracy (%) on the first {n_test} sentences of test.jsonl (half objective), 95% Wilson "
             "intervals, the share predicted objective, and training seconds in brackets. Zero-shot and the CoT vote "
             "use no labels; — : not run (see the text).", "",
             "| method | " + " | ".join(f"{n} labels" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for key, name in names:
        cells = []
        for n in ns:
            r = by.get((n, key)) or by.get((0, key))
            cells.append("—" if r is None else f"{100 * r['accuracy']:.1f} [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]"
                         + f" · {100 * r['predicted_share']['objective']:.0f}% obj"
                         + (f" ({r['train_seconds']:.0f} s)" if r["train_seconds"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    d = by.get((0, "diagnostic"))
    if d:
        lines += ["", f"Diagnostic (prior rationales, {d['config']['samples']} per test item): a rationale's argmax is "
                  f"the gold label for {100 * d['right_under_prior']:.1f}% of prior draws and "
                  f"{100 * d['right_under_sigma']:.1f}% of sigma(Z | X, gold) draws (self-normalised); some rationale "
                  f"gets it right for {100 * d['any_right']:.1f}% of items."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
