"""The scaling experiment's table and figure from the rows of every ``pilm scale`` run under a folder.

    python experiments/scale_report.py docs/scale      # reads docs/scale/*/rows.jsonl

Writes ``results.md`` (``table``: accuracy [95% Wilson interval] and tokens per problem, one
row per method and PRM, one column per budget N; each run's ``table.md`` too) and ``scale.png``
(accuracy against tokens per problem, policy + judge tokens) in that folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pilm.commands.scale_report import METHODS, plot, read_rows, summarise
from pilm.evaluation.metrics import wilson

NAMES = {"greedy": "greedy CoT", "sc": "self-consistency (vote)", "bon": "best-of-N (argmax)",
         "wbon": "weighted best-of-N", "beam": "PRM beam search (M = 4)",
         "beam-all": "PRM beam search, copies kept (M = 4)", "dvts": "DVTS (M = 4)",
         "pf": "particle filter, paper weights (argmax)", "pf-twisted": "particle filter, twisted (weighted vote)",
         "pg": "particle Gibbs, 2 sweeps of N/2 (argmax)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="docs/scale")
    folder = Path(parser.parse_args().folder)
    plot(summary(folder), folder / "scale.png")
    from results import write  # experiments/results.py, next to this script

    tables = write(folder, "scale")
    print(tables["results.md"])
    print(json.dumps({"wrote": [*(str(folder / name) for name in tables), str(folder / "scale.png")]}))


def summary(folder: Path) -> list[dict]:
    """``pilm.commands.scale_report.summarise`` of every ``folder/*/rows.jsonl``, each (method, PRM, N) once:
    self-consistency (no PRM) appears in every run's folder."""
    out, seen = [], set()
    for rows in sorted(folder.glob("*/rows.jsonl")):
        for s in summarise(rows):
            key = (s["method"], s["prm"], s["n"])
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def table(summary: list[dict]) -> str:
    """results.md: accuracy [95% Wilson interval] · tokens per problem, a row per method and PRM,
    a column per budget N, then the problems per cell."""
    budgets = sorted({s["n"] for s in summary})
    cells = {(s["method"], s["prm"], s["n"]): s for s in summary}
    lines = ["| method | PRM | " + " | ".join(f"N = {n}" for n in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for method in METHODS:  # a method without a name is a KeyError, not a row left out
        for prm in ("none", "verifier", "learned", "judge"):
            row = [cells.get((method, prm, n)) for n in budgets]
            if not any(row):
                continue
            text = [f"{c['accuracy']:.2f} [{c['low']:.2f}, {c['high']:.2f}] · {c['tokens']:.0f} tok" if c else "–"
                    for c in row]
            lines.append(f"| {NAMES[method]} | {prm} | " + " | ".join(text) + " |")
    problems = sorted({s["problems"] for s in summary})
    lines.append("")
    lines.append(f"Problems per cell: {', '.join(map(str, problems))}. Accuracy [95% Wilson interval over problems] "
                 "· mean tokens per problem (policy tokens + tokens a judge ran).")
    return "\n".join(lines) + "\n"


def baselines(runs: list[Path]) -> str:
    """results.md of a folder of runs on different tasks (docs/scale_qwen): per run its task
    (operands of an arithmetic chain, chat template), greedy accuracy and pass@N, the share of problems where
    any of self-consistency's N independent chains states the gold answer (the ceiling of any
    selection from them); each with its 95% Wilson interval. Rows from before ``any_correct``
    was written give pass@1 only (one chain: its answer is the selection)."""
    every = {path: read_rows(path) for path in runs}
    budgets = sorted({r["n"] for rows in every.values() for r in rows if r["method"] == "sc"})
    lines = ["| run | task | operands | chat template | greedy | " + " | ".join(f"pass@{n}" for n in budgets) + " |",
             "|---|---|---|---|---|" + "---|" * len(budgets)]

    def cell(hits: list[bool]) -> str:
        if not hits:
            return "–"
        lo, hi = wilson(sum(hits), len(hits))
        return f"{sum(hits)}/{len(hits)} = {sum(hits) / len(hits):.2f} [{lo:.2f}, {hi:.2f}]"

    for path in runs:
        rows, run = every[path], json.loads((path.parent / "run.json").read_text())
        task = run.get("task", "arithmetic-chain")  # run.json keeps every setting: GSM8K's has unused operands
        operands = "–".join(map(str, run["operands"])) if task == "arithmetic-chain" and "operands" in run else "–"
        passes = [cell([r.get("any_correct", r["correct"] if n == 1 else None) for r in rows
                        if r["method"] == "sc" and r["n"] == n and ("any_correct" in r or n == 1)]) for n in budgets]
        lines.append(f"| [{path.parent.name}]({path.parent.name}/table.md) | {task} | {operands} | "
                     f"{'yes' if run.get('chat') else 'no'} | "
                     f"{cell([r['correct'] for r in rows if r['method'] == 'greedy'])} | " + " | ".join(passes) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
