"""The documentation site builds offline with every warning an error (make docs): a broken
API reference, link, snippet include or nav entry fails the suite."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    for page in ("index.html", "reference/pilm/index.html", "guide/sample/index.html", "results/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
