"""What the command line says: notes, library messages in flags, and the line an interrupt ends with."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path


def note(message: str) -> None:
    print(f"pilm: note: {message}", file=sys.stderr)


def for_cli(message: str, settings: set[str]) -> str:
    """A library message as the command line says it: each ``setting=value`` of a config (a
    Python argument, one of ``settings``) becomes ``--setting value`` (its flag)."""
    return re.sub(r"\b([a-z_]+)=", lambda m: f"--{m[1].replace('_', '-')} " if m[1] in settings else m[0], message)


RESUMABLE = {"train-twist": "checkpoint/checkpoint/state.json", "train-skip": "checkpoint/checkpoint/state.json",
             "finetune": "checkpoint/checkpoint/state.json",
             "scale": "rows.jsonl", "red-team": "stage1/adapter_config.json", "train-prm": "collection.safetensors"}
"""Commands that resume an interrupted run when rerun with the same flags, and the file in
--out that shows there is something to resume from."""


def what_was_saved(command: str, made, argv: list[str] | None) -> str:
    """The one line an interrupt ends with: what was kept, and the command that resumes
    (the same flags, less --overwrite, which would delete what was kept)."""
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    rerun = "pilm " + " ".join(shlex.quote(a) for a in given)
    out = out_of(made)
    if command in RESUMABLE and out is not None and (out / RESUMABLE[command]).exists():
        return f"{out / RESUMABLE[command].split('/')[0]} is kept; resume with: {rerun}"
    return f"nothing was saved; start again with: {rerun}"


def out_of(made) -> Path | None:
    """The command's --out, if it has one."""
    return next((Path(c.out) for c in made if getattr(c, "out", None)), None)


def flag(setting: str) -> str:
    """A run key's setting as the reader knows it: its flag where it has one."""
    named = {"dtype": "dtype (PILM_DTYPE)", "targets": "the targets", "processes": "processes (accelerate launch)",
             "key": "settings"}
    return named.get(setting, "--" + setting.replace("_", "-"))

