"""How well a learned process reward ranks reasoning steps: on arithmetic chains, where the exact
verifier says whether every step so far is right, N independent chains per problem are drawn
(best-of-N's run), each step end is scored by the learned PRM, and the scores are compared with
the verifier's verdict on the prefix and with whether the chain's final answer is right.

The learned PRM estimates V = P(right answer | prefix) under the policy (pilm.train_prm), so a
wrong prefix should score near 0 and a right one by how often the policy finishes it right. The
table gives, per label, the step ends and their mean score, and the AUC (the probability that a
random right step end outscores a random wrong one, pooled over problems, ties counting half)
with a 95% percentile bootstrap interval over problems (step ends of one problem are not
independent; a resample holding one label only is dropped); a third row takes each chain's last
step end only, the score best-of-N selects by. A second table counts the problems where one chain
of the N, chosen by the head's scores, is right. A row is a step end of one chain:
a prefix that several chains of a problem share is counted once per chain. Writes the rows to
``--out`` (resumable: problems already there are skipped; rerun with the same ``--block``) and
``quality.md`` beside it.

    python experiments/prm_quality.py --model qwen2.5-coder-1.5b --chat --operands 8 12 \
        --prm-path docs/scale_qwen/learned_prm --problems 20 --out docs/scale_qwen/prm_quality/steps.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import pilm
from pilm.prm import ProcessReward, StepBatch, as_prm
from pilm.tasks import arithmetic_chain as task
from pilm.twists import Twist


class Scored(ProcessReward):
    """The learned PRM, recording at every step end its score by question and tokens so far."""

    reads_hidden = True

    def __init__(self, learned: ProcessReward) -> None:
        super().__init__()
        self.learned, self.seen = learned, {}

    def score(self, batch: StepBatch):
        out = self.learned.score(batch)
        for q, steps, toks, r in zip(batch.questions, batch.steps, batch.tokens, out.tolist(), strict=True):
            self.seen[(q, tuple(toks))] = (len(steps), r, task.chain_is_right(q, steps))
        return out


def auc(right: list[float], wrong: list[float]) -> float:
    """P(a right step end outscores a wrong one), ties half (Mann-Whitney)."""
    if not right or not wrong:
        return float("nan")
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def last_ends(rows: list[dict]) -> list[dict]:
    """Each chain's last step end: the finished chain's score, what best-of-N selects by (the
    "last" aggregation)."""
    last: dict[tuple[int, int], dict] = {}
    for r in rows:
        key = (r["problem"], r["chain"])
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    return list(last.values())


def table(rows: list[dict], label: str, seed: int = 0, draws: int = 2000, name: str | None = None) -> str:
    """Step ends by ``label`` (prefix_right or final_right): counts, mean scores, AUC [95% CI]."""
    by: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["problem"]].append(r)

    def split(problems):
        cells = [r for p in problems for r in by[p]]
        return [r["score"] for r in cells if r[label]], [r["score"] for r in cells if not r[label]]

    right, wrong = split(by)
    rng, keys = random.Random(seed), list(by)
    boot = sorted(b for b in (auc(*split(rng.choices(keys, k=len(keys)))) for _ in range(draws))
                  if b == b)  # a resample with one class only has no AUC: dropped (conditions on both)
    low, high = (boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]) if boot else (float("nan"),) * 2
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return (f"| {name or label.replace('_', ' ')} | {len(by)} | {len(right)} | {mean(right):.3f} | {len(wrong)} | "
            f"{mean(wrong):.3f} | {auc(right, wrong):.3f} [{low:.3f}, {high:.3f}] |")


def report(rows: list[dict]) -> str:
    head = ("| label | problems | step ends, label true | mean score | step ends, label false | mean score | "
            "AUC [95% bootstrap over problems] |\n|---|---|---|---|---|---|---|")
    scores = "\n".join([head, table(rows, "prefix_right"), table(rows, "final_right"),
                        table(last_ends(rows), "final_right", name="final right, chains' last step ends")])
    return scores + "\n\n" + selections(rows)


def selections(rows: list[dict]) -> str:
    """One chain of each problem's N, chosen by the head's score at its last step end (best-of-N
    with the "last" aggregation) or by its lowest score over its step ends ("min"; ties: the
    first chain), against a uniform pick (its expected count) and any chain (pass@N)."""
    chains: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        chains[r["problem"]][r["chain"]].append(r)
    picks: dict[str, float] = defaultdict(float)
    for by_chain in chains.values():
        ends = {c: max(rs, key=lambda r: r["step"]) for c, rs in sorted(by_chain.items())}
        right = {c: e["final_right"] for c, e in ends.items()}
        picks["argmax of the last score (best-of-N)"] += right[max(ends, key=lambda c: ends[c]["score"])]
        picks["argmax of the lowest score"] += right[max(by_chain, key=lambda c: min(r["score"] for r in by_chain[c]))]
        picks["a uniform pick (expected)"] += sum(right.values()) / len(right)
        picks["any chain (pass@N)"] += any(right.values())
    lines = [f"| {k} | {len(chains)} | {v:g} |" for k, v in picks.items()]
    return "\n".join(["| one chain of N chosen by | problems | right |", "|---|---|---|", *lines]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--operands", type=int, nargs=2, default=(3, 5))
    parser.add_argument("--prm-path", required=True, help="a folder written by pilm train-prm")
    parser.add_argument("--problems", type=int, default=20, help="the first problems of seed 0 (pilm scale's)")
    parser.add_argument("--block", type=int, default=4, help="problems drawn in one batch")
    parser.add_argument("--n", type=int, default=4, help="chains per problem")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("prm_quality/steps.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["problem"] for r in map(json.loads, args.out.open())} if args.out.exists() else set()
    model = pilm.load_model(args.model)
    learned = as_prm(Twist.from_pretrained(args.prm_path, model))  # reads the hidden state sampling made
    problems = [{**p, "index": i} for i, p in enumerate(task.problems(args.problems, tuple(args.operands), seed=0))]
    todo = [p for p in problems if p["index"] not in done]
    for lo in range(0, len(todo), args.block):
        block = todo[lo: lo + args.block]
        scored = Scored(learned)
        targets = [task.target(model, p["question"], chat=args.chat) for p in block]
        results = pilm.best_of_n(targets, scored, args.n, temperature=args.temperature,
                                 seed=args.seed + block[0]["index"])  # the same draws when resumed by block
        rows = []
        for p, res in zip(block, results, strict=True):  # each chain's step ends, with its own outcome
            for k, chain in enumerate(res.tokens):
                chain = tuple(chain)
                for (q, toks), (t, score, right) in scored.seen.items():
                    if q == p["question"] and chain[: len(toks)] == toks:
                        rows.append({"problem": p["index"], "chain": k, "step": t, "score": score,
                                     "prefix_right": right, "final_right": res.answers[k] == p["answer"],
                                     "n": args.n, "seed": args.seed, "temperature": args.temperature,
                                     "prm_path": args.prm_path})
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"problems {[p['index'] for p in block]} done", flush=True)
    text = report([json.loads(line) for line in args.out.open()])
    (args.out.parent / "quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
