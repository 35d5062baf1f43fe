"""The committed results tables are what their saved data give, and the seed intervals are Student's t."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pilm.evaluation.metrics import t_half_width, t_interval

ROOT = Path(__file__).resolve().parents[1]


def test_committed_tables_match_their_data():
    """``experiments/results.py --check`` rebuilds every docs/ table in memory from its JSONL / JSON."""
    done = subprocess.run([sys.executable, "experiments/results.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_t_interval_uses_the_t_quantile():
    values = [1.0, 2.0, 4.0, 7.0, 11.0]  # n = 5: t_{0.975, 4} = 2.776
    mean, half = t_interval(values)
    assert mean == pytest.approx(5.0)
    assert half == pytest.approx(2.776445 * statistics.stdev(values) / math.sqrt(5), rel=1e-6)
    assert t_half_width(1.0, 10) == pytest.approx(2.262157 / math.sqrt(10), rel=1e-6)  # t_{0.975, 9}


def test_t_interval_is_undefined_below_two_values_or_with_a_non_finite_one():
    assert math.isnan(t_interval([3.0])[1])
    assert math.isnan(t_interval([1.0, -math.inf, 2.0])[1])


@pytest.mark.parametrize("script, flag, help_text", [
    ("twists.py", "--steps", "optimiser steps"),
    ("bounds.py", "--lr", "AdamW learning rate"),
    ("payoff.py", "--reuse", "head updates per drawn batch"),
    ("finetune.py", "--lora-rank", "LoRA rank"),
    ("latent.py", "--e-steps", "fine-tuning steps of each E-step"),
    ("red_team.py", "--mle-n", "attacks drawn from stage 1"),
])
def test_the_experiments_flags_are_the_configs(script, flag, help_text, tmp_path):
    """Each experiment's training flags are generated from pilm's config dataclasses (the
    CLI's): the config's help text, and its range checks before anything loads."""
    shown = subprocess.run([sys.executable, f"experiments/{script}", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and flag in shown.stdout
    assert help_text in " ".join(shown.stdout.split())
    target = ["--target", "toxicity"] if script == "payoff.py" else []
    bad = subprocess.run([sys.executable, f"experiments/{script}", "--out", str(tmp_path / "out"), *target, flag, "-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith(f"pilm: error: argument {flag}: must be"), bad.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_prm_quality_selects_by_the_last_and_the_lowest_score():
    """Two problems of two chains each, written out: the chain with the higher last score is right
    on problem 0 only; the chain with the higher lowest score on both; a uniform pick is right on
    1/2 + 1/2 of them, some chain on both. Rows come out of step order (the last end is the
    highest step, not the last row)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import prm_quality

    chains = {(0, 0): ([0.9, 0.2], False), (0, 1): ([0.5, 0.4], True),
              (1, 0): ([0.3, 0.8], True), (1, 1): ([0.1, 0.85], False)}
    rows = [{"problem": p, "chain": c, "step": t + 1, "score": s, "final_right": right}
            for (p, c), (scores, right) in chains.items() for t, s in reversed(list(enumerate(scores)))]
    assert sorted(r["score"] for r in prm_quality.last_ends(rows)) == [0.2, 0.4, 0.8, 0.85]
    table = prm_quality.selections(rows)
    for line in ("| argmax of the last score (best-of-N) | 2 | 1 |", "| argmax of the lowest score | 2 | 2 |",
                 "| a uniform pick (expected) | 2 | 1 |", "| any chain (pass@N) | 2 | 2 |"):
        assert line in table, table


def test_the_baselines_table_names_each_runs_task_and_gives_operands_to_chains_only(tmp_path):
    """A GSM8K run's run.json keeps the config's unused operands: its row shows none. Greedy is
    right on 1 of 2 chains problems; pass@4 is any of four chains right (2 of 2)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import json

    import scale_report

    runs = {"chains": ("arithmetic-chain", [{"method": "greedy", "n": 1, "correct": c} for c in (True, False)]
                       + [{"method": "sc", "n": 4, "correct": False, "any_correct": True}] * 2),
            "gsm": ("gsm8k", [{"method": "greedy", "n": 1, "correct": False}])}
    paths = []
    for name, (task, rows) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"task": task, "operands": [8, 12], "chat": True}))
        path = tmp_path / name / "rows.jsonl"
        path.write_text("".join(json.dumps({**r, "problem": i, "prm": "none"}) + "\n" for i, r in enumerate(rows)))
        paths.append(path)
    table = scale_report.baselines(paths)
    assert "| [chains](chains/table.md) | arithmetic-chain | 8–12 | yes | 1/2 = 0.50" in table, table
    assert "| 2/2 = 1.00" in table and "| [gsm](gsm/table.md) | gsm8k | – | yes | 0/1 = 0.00" in table, table


def test_the_combined_scale_table_names_every_method_pilm_scale_runs():
    """docs/scale's results.md names each method: one it lacked (beam-all did) was left out of the
    table with no error; every method pilm scale runs has a name and a row."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import scale_report

    from pilm.commands.scale_report import METHODS

    assert set(scale_report.NAMES) == set(METHODS)
    summary = [{"method": m, "prm": "verifier", "n": 4, "accuracy": 0.5, "low": 0.1, "high": 0.9, "tokens": 10.0,
                "problems": 2} for m in METHODS]
    assert len([line for line in scale_report.table(summary).splitlines() if "| verifier |" in line]) == len(METHODS)
