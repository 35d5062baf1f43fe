"""Where a search spends its rows: at each step boundary of PRM beam search, DVTS and the
particle filter on arithmetic chains with the exact step verifier, how many of the N rows
extend a prefix the verifier still holds right, and how many distinct right prefixes they
extend. A row that extends a prefix already ruled wrong is spent on a chain no later step can
save (the verifier scores whole prefixes). ``beam-all`` is beam search without the recipe's
duplicate filter, which measures whether that filter is where beam search's rows go. Writes
one row per (method, problem, boundary) to ``--out`` (resumable: problems already there are
skipped) and the table in ``results.md`` beside it.

    python experiments/search_diagnosis.py --model qwen2.5-coder-1.5b --chat --operands 8 12 \
        --problems 8 --out docs/scale_qwen/search_diagnosis/boundaries.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pilm
from pilm.commands.scaling import runner
from pilm.config import ScaleConfig
from pilm.evaluation.metrics import t_interval
from pilm.prm import ProcessReward, StepBatch
from pilm.tasks import arithmetic_chain as task

SEARCHES = ("beam", "beam-all", "dvts", "pf")  # as pilm scale runs them (``runner``)


class Recorder(ProcessReward):
    """The exact verifier, which also records, per boundary and problem, the rows scored,
    the rows whose prefix before this step was right, those right after it, and the distinct
    right prefixes they extended."""

    def __init__(self) -> None:
        super().__init__()
        self.verifier = task.step_verifier()
        self.calls: list[dict[str, dict]] = []

    def score(self, batch: StepBatch):
        out = self.verifier.score(batch)
        call: dict[str, dict] = defaultdict(lambda: {"rows": 0, "on_right": 0, "right": 0, "prefixes": set()})
        for q, steps, r in zip(batch.questions, batch.steps, out.tolist(), strict=True):
            cell = call[q]
            cell["rows"] += 1
            if task.chain_is_right(q, steps[:-1]):
                cell["on_right"] += 1
                cell["prefixes"].add(tuple(s.strip() for s in steps[:-1]))
            cell["right"] += r == 1.0
        self.calls.append(dict(call))
        return out


def run(method: str, problems: list[dict], model, args) -> list[dict]:
    recorder = Recorder()
    targets = [task.target(model, p["question"], chat=args.chat) for p in problems]
    results = runner(method, recorder, ScaleConfig(temperature=args.temperature, seed=args.seed))(targets, args.n)
    rows = []
    for p, res in zip(problems, results, strict=True):
        q = p["question"]
        for t, call in enumerate(c[q] for c in recorder.calls if q in c):
            rows.append({"method": method, "n": args.n, "problem": p["index"], "boundary": t, "rows": call["rows"],
                         "on_right": call["on_right"], "right_prefixes": len(call["prefixes"]), "right": call["right"],
                         "correct": res.answer("argmax") == p["answer"], "seed": args.seed})
    return rows


def table(rows: list[dict]) -> str:
    """Per method: problems, how many end with a right answer, the share of rows extending a
    right prefix at the boundaries after the first where one exists (mean over problems, 95% t
    interval), the distinct right prefixes extended there, and the problems where a right
    prefix was drawn and the answer is still wrong (every right prefix lost)."""
    lines = ["| method | N | problems | right | rows on a right prefix (share) | distinct right prefixes | a right prefix "
             "drawn, then lost |", "|---|---|---|---|---|---|---|"]
    by: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["method"], r["n"])][r["problem"]].append(r)
    for (method, n), problems in sorted(by.items(), key=lambda kv: (SEARCHES.index(kv[0][0]), kv[0][1])):
        shares, distinct, lost = [], [], 0
        for calls in problems.values():
            held = [c for c in calls if c["on_right"] and c["boundary"] > 0]  # after the search chose once
            if held:
                shares.append(sum(c["on_right"] / c["rows"] for c in held) / len(held))
                distinct.append(sum(c["right_prefixes"] for c in held) / len(held))
            lost += any(c["right"] for c in calls) and not calls[0]["correct"]
        right = sum(calls[0]["correct"] for calls in problems.values())
        share, half = t_interval(shares) if shares else (float("nan"), float("nan"))
        lines.append(f"| {method} | {n} | {len(problems)} | {right} | {share:.2f} ± {half:.2f} | "
                     f"{sum(distinct) / max(1, len(distinct)):.2f} | {lost} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--operands", type=int, nargs=2, default=(3, 5))
    parser.add_argument("--problems", type=int, default=8, help="the first problems of seed 0 (pilm scale's)")
    parser.add_argument("--block", type=int, default=4, help="problems searched in one batch")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(SEARCHES), choices=SEARCHES)
    parser.add_argument("--out", type=Path, default=Path("search_diagnosis/boundaries.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["problem"]) for r in map(json.loads, args.out.open())} if args.out.exists() else set()
    model = pilm.load_model(args.model)
    problems = [{**p, "index": i} for i, p in enumerate(task.problems(args.problems, tuple(args.operands), seed=0))]
    for method in args.methods:
        todo = [p for p in problems if (method, p["index"]) not in done]
        for lo in range(0, len(todo), args.block):
            block = todo[lo: lo + args.block]
            rows = run(method, block, model, args)
            with args.out.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"{method}: problems {[p['index'] for p in block]} done", flush=True)
    text = table([json.loads(line) for line in args.out.open()])
    (args.out.parent / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
