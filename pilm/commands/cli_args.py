"""Command-line flags generated from config dataclasses, and what is checked before a run.

A field ``n_particles: int = arg(32, "particles per target", low=1)`` becomes
``--n-particles N`` (default 32, shown by ``--help``); a ``Literal`` becomes a choice, a
``bool`` an on/off flag, a ``tuple[X, ...]`` a list of values (``repeat=True``: the flag is
repeated instead), a ``tuple[X, Y]`` exactly two values. Parsing builds the configs, which
check their own ranges; ``check_paths`` then checks the folders and files they name.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import tempfile
import typing
from dataclasses import fields
from pathlib import Path
from typing import Literal

from ..config import SMCConfig, TargetConfig, TwistTrainingConfig
from ..errors import ConfigError
from ..learning.checkpoint import RUN
from .jobs import BoundsJob, FinetuneJob, SampleOutput


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``pilm: error: ...`` line (exit code 2)
    and whose help shows every default."""

    commands: dict[str, Parser]  # the top-level parser's subcommand parsers, by name (cli.build_parser)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"pilm: error: {message}{self._did_you_mean(message)} (see {self.prog} --help)\n")

    def _did_you_mean(self, message: str) -> str:
        """'; did you mean X?' for a mistyped command, choice or flag close to a real one."""
        if choice := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            word, known = choice[1], re.findall(r"[\w.+-]+", choice[2])
        elif message.startswith("unrecognized arguments: "):
            word = message.split()[2]
            known = [o for action in self._actions for o in action.option_strings]
        else:
            return ""
        # 0.75: a typo of a real name (--outt, sytematic: 0.9+) is close, another command's flag
        # that merely shares letters (--n-particles for train-twist's --negatives: 0.67) is not
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
        return f"; did you mean {close[0]}?" if close else ""

    def add_configs(self, classes, defaults: dict, only: typing.Collection[str] | None = None) -> None:
        """One flag per field of each config class (``only``: of these fields; ``configs`` gives
        the others their defaults); ``defaults`` overrides field defaults."""
        for cls in classes:
            group = self.add_argument_group(cls.__doc__.strip().splitlines()[0].rstrip(".:").replace("``", ""))
            hints = typing.get_type_hints(cls)
            for f in fields(cls):
                if only is not None and f.name not in only:
                    continue
                group.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                                   **_flag(hints[f.name], defaults.get(f.name, f.default), f.metadata))


    def parse_configs(self, classes, defaults: dict, args: typing.Sequence[str] | None = None):
        """Parse ``args`` (default: the command line), then build the configs of ``classes`` as
        ``configs`` does; a value out of its range is an ``error`` naming the flag, as a wrong
        type is. Returns the parsed namespace and the configs."""
        namespace = self.parse_args(args)
        try:
            return namespace, configs(namespace, classes, defaults)
        except ConfigError as err:
            self.error(f"argument --{err.field.replace('_', '-')}: {err.reason}")


def _flag(kind, default, metadata) -> dict:
    kw = {"default": default, "help": metadata["help"]}
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if kind is bool:
        return {**kw, "action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {**kw, "choices": list(args), "type": type(args[0])}
    if origin is tuple:
        shown = " ".join(map(str, default)) if default else "none"
        if metadata.get("repeat"):  # one item per flag: a spec may itself contain commas
            return {**kw, "type": args[0], "action": "append", "default": argparse.SUPPRESS,
                    "help": f"{metadata['help']} (repeatable; default: {shown})"}
        return {**kw, "type": _items(args[0]), "nargs": "+", "action": "extend", "default": argparse.SUPPRESS,
                "metavar": "V", "help": f"{metadata['help']} (space- or comma-separated; default: {shown})"}
    return {**kw, "type": kind}


def _items(item):
    """An argparse type for a list flag: one token of comma-separated values of ``item``."""
    choices = typing.get_args(item) if typing.get_origin(item) is Literal else None
    convert = str if choices else item

    def parse(text: str) -> list:
        values = []
        for part in filter(None, text.split(",")):
            try:
                values.append(convert(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid {convert.__name__} value: {part!r}") from None
            if choices and values[-1] not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice: {part!r} (choose from {', '.join(choices)})")
        return values

    return parse


def configs(namespace: argparse.Namespace, classes, defaults: dict | None = None) -> list:
    """The configs the parsed flags describe (each checks its ranges as it is made);
    ``defaults``: the command's own defaults of repeatable flags."""
    defaults = defaults or {}
    made = []
    for cls in classes:
        values = {}
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if not hasattr(namespace, f.name):  # a list flag not given, or a field with no flag
                value = defaults.get(f.name, f.default)
            else:
                value = getattr(namespace, f.name)
            if isinstance(value, list):  # tokens, each a list of comma-separated items for a list flag
                value = tuple(v for part in value for v in (part if isinstance(part, list) else [part]))
                size = _fixed_size(hints[f.name])
                if size is not None and len(value) != size:
                    raise ConfigError(f.name, f"takes {size} values, got {len(value)}")
            values[f.name] = value
        made.append(cls(**values))
    return made


def _fixed_size(kind) -> int | None:
    """How many items a ``tuple[X, Y, ...]`` field takes (``None``: any number)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args and typing.get_origin(args[0]) is tuple:  # X | None
        args = list(typing.get_args(args[0]))
    return None if not args or args[-1] is Ellipsis else len(args)


def output_folders(made) -> list[Path]:
    """The folders a command writes into: its ``path="folder"`` settings, and the folder of each
    ``path="file"`` one."""
    out = []
    for config in made:
        for f in fields(config):
            value, kind = getattr(config, f.name), f.metadata.get("path")
            if value is not None and kind in ("folder", "file"):
                out.append(Path(value) if kind == "folder" else Path(value).parent)
    return out


def new_folders(made) -> list[Path]:
    """The topmost folders that writing the command's outputs will create (none exist yet)."""
    roots = set()
    for folder in output_folders(made):
        if not folder.exists():
            while not folder.parent.exists():
                folder = folder.parent
            roots.add(folder)
    return sorted(roots)


def remove_if_empty(folders: list[Path]) -> None:
    """Delete each of ``folders`` that holds no file but its run key (a failed command leaves
    no empty folder)."""
    for folder in folders:
        if folder.is_dir() and not any(p.is_file() and p.name != RUN for p in folder.rglob("*")):
            shutil.rmtree(folder)


def check_paths(made) -> None:
    """Before any model loads: potential specs parse, input folders hold what they should,
    output files and folders can be written."""
    from ..potentials.spec import check_spec

    for config in made:
        for f in fields(config):
            value, kind = getattr(config, f.name), f.metadata.get("path")
            if f.name == "potential":
                for spec in value:
                    check_spec(spec)
            if value is None or kind is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if kind == "twist":
                _check_twist_folder(flag, Path(value))
            elif kind == "skip":
                if not (Path(value) / "skip_config.json").exists():
                    what = "does not exist" if not Path(value).exists() else "holds no skip model (skip_config.json is missing)"
                    raise ValueError(f"{flag}: {value} {what}; train one with: pilm train-skip ... --out {value}")
            elif kind == "adapter":
                if not (Path(value) / "adapter_config.json").exists():
                    what = "does not exist" if not Path(value).exists() else "holds no adapter (adapter_config.json is missing)"
                    raise ValueError(f"{flag}: {value} {what}; fine-tune one with: pilm finetune ... --out {value}")
            else:
                _check_writable(flag, Path(value), folder=kind == "folder")
        if isinstance(config, BoundsJob):
            for _, where in config.samplers():
                if not where.startswith(("model:", "adapter:")):
                    _check_twist_folder("--sampler", Path(where))
                elif where.startswith("adapter:") and not Path(where.removeprefix("adapter:")).is_dir():
                    raise ValueError(f"--sampler: no adapter folder {where.removeprefix('adapter:')}")


def _check_twist_folder(flag: str, path: Path) -> None:
    if not (path / "twist_config.json").exists() and not (path / "lora_twist_config.json").exists():
        maker = "train-prm" if flag == "--prm-path" else "train-twist"
        if not path.exists():
            raise ValueError(f"{flag}: {path} does not exist; make it with: pilm {maker} ... --out {path}")
        raise ValueError(f"{flag}: {path} holds no saved {'process reward' if maker == 'train-prm' else 'twist'} "
                         f"(twist_config.json is missing); make one in a new folder with: pilm {maker} ... --out FOLDER")


def _check_writable(flag: str, path: Path, *, folder: bool) -> None:
    """Write to ``path`` now (a probe file in a folder; an empty append to a file, removed
    again if it was new), so a run never ends unable to save what it made."""
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{flag}: {path} is {'a file' if folder else 'a folder'}; give a {'folder' if folder else 'file'}")
    try:
        (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
        if folder:
            tempfile.TemporaryFile(dir=path).close()
        else:
            new = not path.exists()
            open(path, "a").close()
            if new:
                path.unlink()
    except OSError as err:
        raise ValueError(f"{flag}: cannot write {path}: {err.strerror or err}") from None


HARD_CONSTRAINTS = ("regex:", "json:", "grammar:")
LOOKAHEAD = ("suffix:", "sentiment:", "toxicity:")  # the specs --lookahead scores ahead (potentials.spec)
PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def check_together(made) -> None:
    """Settings that contradict each other, refused before any model loads."""
    def one(cls):
        return next((c for c in made if isinstance(c, cls)), None)

    target, smc, job, out = one(TargetConfig), one(SMCConfig), one(FinetuneJob), one(SampleOutput)
    training = one(TwistTrainingConfig)
    residual = training is not None and training.residual is not None
    if smc and smc.mask and target and target.potential and not any(
            spec.startswith(HARD_CONSTRAINTS) for spec in target.potential):
        raise ValueError("--mask: no --potential is a hard constraint (regex:, json:, grammar:), so there is "
                         "nothing to mask; leave out --mask")
    if target and target.lookahead and not any(spec.startswith(LOOKAHEAD) for spec in target.potential):
        raise ValueError("--lookahead scores a suffix:, sentiment: or toxicity: potential ahead; give one with "
                         "--potential")
    if target and target.lookahead and not (smc or residual):
        raise ValueError("--lookahead is a prefix score that SMC resamples on (pilm sample) or that a residual twist "
                         "learns on (pilm train-twist --residual A)")
    if training and training.negatives == "smc" and not training.pool:
        raise ValueError("--negatives smc contrasts SMC populations with samples of sigma: give them with --pool P")
    if training and training.pool and training.objective != "ctl":
        raise ValueError(f"--pool gives ctl its positives; --objective {training.objective} does not read them")
    if target and target.rollouts and not target.potential:
        raise ValueError("--rollouts estimates E[phi | prefix]: give a --potential to look ahead for")
    if target and target.rollouts and target.lookahead:
        raise ValueError("--rollouts and --lookahead are two prefix scores for the same potential: give one")
    if target and target.rollouts and not smc:
        raise ValueError("--rollouts is a prefix score that SMC resamples on: only pilm sample uses it")
    if out and out.skip and (target is None or len(target.potential) != 1 or not target.potential[0].startswith("suffix:")):
        raise ValueError("--skip looks ahead for an ending: give it, and no other potential, with --potential suffix:TEXT")
    if out and out.skip and (out.twist or out.adapter or (target and (target.lookahead or target.rollouts))):
        raise ValueError("--skip is the prefix score: leave out --twist, --adapter, --lookahead and --rollouts")
    if job and job.task and target and (target.prompt or target.potential):
        raise ValueError(f"--task {job.task} brings its own prompt and potential: leave out --prompt and --potential")
    if out and out.adapter and ((smc and smc.mask) or out.twist):
        raise ValueError("--adapter proposes by itself: leave out --mask and --twist")
    for config in made:
        plot = getattr(config, "plot", None)
        if plot and not plot.lower().endswith(PLOT_FORMATS):
            raise ValueError(f"--plot: {plot} is not a picture file; end it in one of {', '.join(PLOT_FORMATS)}")
