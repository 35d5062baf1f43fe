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
