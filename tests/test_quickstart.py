"""The quickstart of the README and the docs home page runs as written, on the embedded model."""

import runpy
from pathlib import Path

import pytest

import pilm

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.py"


def test_the_quickstart_runs_as_written(real_model, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: real_model)  # loaded once per session
    names = runpy.run_path(str(QUICKSTART))
    assert (tmp_path / "results.jsonl").is_file()
    assert len(names["results"]) == 2 and all(r.log_z <= 0 for r in names["results"])
    assert all("e" not in text.lower() for _, text in names["res"].top(5))  # the masked run never breaks it
    assert names["res"].log_z > float("-inf")
    assert capsys.readouterr().out.strip()
