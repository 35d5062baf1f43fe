"""Every results table in docs/ from its saved data, so that no table drifts from the rows it reports.

    python experiments/results.py                 # rewrite the tables in docs/
    python experiments/results.py --check         # exit 1 listing every table that differs from its data
    python experiments/results.py --out-root DIR  # write them under DIR (same layout) instead

Each table comes from its experiment's pure ``table`` function, the one the experiment itself
calls after a run (through ``write``), fed with the folder's JSONL / JSON: results.md in every
folder of FOLDERS, and docs/scale/<prm>/table.md (``pilm.commands.scale_report.report``, as ``pilm scale``
writes it). Plots stay the experiments' business. Rerun: make results
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import analytic_twists
import bounds
import decisive
import finetune
import latent
import mask_engines
import masked
import payoff
import prm_quality
import red_team
import residual_twist
import scale_report
import search_diagnosis
import skip_twist
import twists

from pilm.commands.bench import table as bench_table
from pilm.commands.scale_report import families, families_text, growth, paired, paired_table, report
from pilm.inference.result import read_jsonl

DOCS = Path(__file__).resolve().parents[1] / "docs"

def rows(folder: Path, pattern: str = "results.jsonl") -> list[dict]:
    """The rows of every file of ``folder`` matching ``pattern``, in name order."""
    return [r for path in sorted(folder.glob(pattern)) for r in read_jsonl(path)]


def scale(folder: Path) -> dict[str, str]:
    """results.md across the PRMs' subfolders, and each subfolder's table.md."""
    runs = sorted(folder.glob("*/rows.jsonl"))
    return {"results.md": scale_report.table(scale_report.summary(folder)),
            **{f"{p.parent.name}/table.md": report(p) for p in runs},
            **{f"{p.parent.name}/pairs.md": pairs(p) for p in runs}}


def scale_runs(folder: Path) -> dict[str, str]:
    """A folder of scale runs on different tasks (docs/scale_qwen): results.md the greedy and pass@N
    baselines of every run, and each run's table.md and pairs.md."""
    runs = sorted(folder.glob("*/rows.jsonl"))
    return {"results.md": scale_report.baselines(runs), **{f"{p.parent.name}/table.md": report(p) for p in runs},
            **{f"{p.parent.name}/pairs.md": pairs(p) for p in runs}}


def pairs(rows: Path) -> str:
    """A scale run's McNemar pairs against self-consistency, greedy, both particle filters and beam
    search without its duplicate filter (those it ran), one table each, then the size of each
    PRM's family of tests."""
    found = {ref: c for ref in ("sc", "greedy", "pf", "pf-twisted", "beam-all") if (c := paired(rows, reference=ref))}
    parts = [f"Against {ref}, on the same problems (McNemar's exact test):\n\n{paired_table(c)}\n"
             for ref, c in found.items()]
    sizes = families([x for c in found.values() for x in c], growth(rows))
    return "\n".join(parts) + (f"\n{families_text(sizes)}\n" if sizes else "")


KINDS: dict[str, Callable[[Path], dict[str, str]]] = {
    "analytic": lambda f: {"results.md": analytic_twists.table(rows(f))},
    "bench": lambda f: {"results.md": bench_table(json.loads((f / "bench.json").read_text()))},
    "bounds": lambda f: {"results.md": bounds.table(rows(f))},
    "decisive": lambda f: {"decisive.md": decisive.table(f)},
    "finetune": lambda f: {"results.md": finetune.table(rows(f, "results_*.jsonl"))},
    "latent": lambda f: {"results.md": latent.table(rows(f))},
    "masked": lambda f: {"results.md": masked.table(rows(f))},
    "masks": lambda f: {"results.md": mask_engines.table(json.loads((f / "engines.json").read_text()))},
    "payoff": lambda f: {"results.md": payoff.table(rows(f))},
    "prm_quality": lambda f: {"quality.md": prm_quality.report(rows(f, "steps.jsonl"))},
    "red_team": lambda f: {"results.md": red_team.table(rows(f))},
    "scale": scale,
    "scale_runs": scale_runs,
    "search": lambda f: {"results.md": search_diagnosis.table(rows(f, "boundaries.jsonl"))},
    "residual": lambda f: {"results.md": residual_twist.table(
        rows(f), json.loads((f / "pool.json").read_text()) if (f / "pool.json").exists() else None)},
    "skip": lambda f: {"results.md": skip_twist.table(rows(f))},
    "twists": lambda f: {"results.md": twists.table(rows(f))},
}
"""Per kind of experiment: a folder of its data -> {file name in that folder: markdown}."""

FOLDERS = {"bench": "bench", "bounds": "bounds", "finetune": "finetune", "latent": "latent", "masked": "masked", "masks": "masks",
           "payoff/infilling": "payoff", "payoff/toxicity": "payoff", "payoff/toxicity_lr3e-3": "payoff",
           "payoff/analytic_infilling": "analytic", "payoff/analytic_toxicity": "analytic",
           "payoff/analytic_sentiment": "analytic",
           "payoff": "decisive", "payoff/skip_infilling": "skip", "payoff/residual_toxicity": "residual",
           "payoff/residual_toxicity_control": "residual", "payoff/residual_toxicity_smc": "residual",
           "payoff/residual_toxicity_hour": "residual",
           "red_team": "red_team", "scale": "scale", "scale_qwen": "scale_runs",
           "scale_qwen/search_diagnosis": "search", "scale_qwen/prm_quality": "prm_quality", "twists": "twists",
           "twists_tied": "twists"}
"""Every folder of docs/ with tables, and its kind."""


def write(folder: str | Path, kind: str) -> dict[str, str]:
    """Write the tables of ``kind`` built from the data in ``folder`` into it (what an experiment
    calls after a run); returns them by file name."""
    tables = KINDS[kind](Path(folder))
    for name, text in tables.items():
        (Path(folder) / name).write_text(text)
    return tables


def render() -> dict[Path, str]:
    """Every table of docs/, by its path relative to docs/."""
    return {Path(sub) / name: text for sub, kind in FOLDERS.items() for name, text in KINDS[kind](DOCS / sub).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the tables that differ")
    p.add_argument("--out-root", type=Path, default=DOCS, help="where to write the tables (default: docs/)")
    args = p.parse_args()
    tables = render()
    if args.check:
        stale = [path for path, text in tables.items()
                 if not (DOCS / path).exists() or (DOCS / path).read_text() != text]
        for path in stale:
            print(f"docs/{path.as_posix()} differs from what its data give: run make results", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for path, text in tables.items():
        (args.out_root / path).parent.mkdir(parents=True, exist_ok=True)
        (args.out_root / path).write_text(text)
    print(f"wrote {len(tables)} tables under {args.out_root}")


if __name__ == "__main__":
    main()
