"""Subjectivity classification with a latent rationale (Hu et al. ICLR 2024, §4.3).

Movie-review sentences labelled objective (plot summaries) or subjective (review snippets),
Pang & Lee (2004), in the split of Hu et al.'s repository: it ships with pilm
(``pilm/tasks/data/subj``, MIT licence, provenance in its README), so ``load()`` needs no path.
``load`` also reads a folder of JSONL files of the same layout (``{"text", "label_text"}`` a
line), or, with a network and the ``datasets`` package, the hub id ``SetFit/subj``. The
template is the authors':

    Classify this movie review as objective or subjective: "<X>" This review is<Z>, so it is <Y>.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..latent import Example, LatentReasoner
from ..models.base import LanguageModel
from ..models.registry import load_model

TEMPLATE = 'Classify this movie review as objective or subjective: "{x}" This review is{z}, so it is {y}.'
LABELS = ("objective", "subjective")
HUB_ID = "SetFit/subj"
SHIPPED = Path(str(files(__package__).joinpath("data", "subj")))
"""The SUBJ data that ships with pilm: train.jsonl (8,000), train.{10,20,50}.jsonl, test.jsonl (1,500)."""
WHERE = ("a folder with train.jsonl / train.<n>.jsonl / test.jsonl ({\"text\", \"label_text\"} lines), "
         f"nothing for the data shipped with pilm ({SHIPPED}), or the hub id {HUB_ID} with a network")


@dataclass(frozen=True)
class Data:
    """Labelled training pairs, test pairs, and the label set."""

    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...] = LABELS


def read_jsonl(path: str | Path, labels: Sequence[str] = LABELS) -> list[Example]:
    """The examples of one JSONL file: ``text`` and ``label_text`` (or an integer ``label``
    indexing ``labels``) a line. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give {WHERE}")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            y = row["label_text"] if "label_text" in row else labels[int(row["label"])]
            text = row["text"]
        except (json.JSONDecodeError, KeyError, IndexError, ValueError, TypeError) as e:
            raise ValueError(f"{path}:{i}: expected a JSON object with 'text' and 'label_text' (or 'label'): {e}") from None
        if y not in labels:
            raise ValueError(f"{path}:{i}: label {y!r} is not in the label set {list(labels)}")
        out.append(Example(str(text), y))
    if not out:
        raise ValueError(f"{path} holds no examples (an empty file)")
    return out


def load(path: str | Path | None = None, labels: int | None = 10, *, test: str | Path | None = None,
         test_limit: int | None = None) -> Data:
    """Training pairs (``train.<labels>.jsonl``, or all of ``train.jsonl`` with ``labels=None``)
    and test pairs (``test.jsonl``, or the file ``test``; the first ``test_limit`` of them)
    from the folder ``path`` (default: the data shipped with pilm), or from the hub with a network."""
    folder = SHIPPED if path is None else Path(path)
    if folder.is_dir():
        train = read_jsonl(folder / ("train.jsonl" if labels is None else f"train.{labels}.jsonl"))
        tests = read_jsonl(test or folder / "test.jsonl")
    elif str(path) == HUB_ID:
        train, tests = _from_hub(labels)
        if test is not None:
            tests = read_jsonl(test)
    else:
        raise FileNotFoundError(f"{path} does not exist: give {WHERE}")
    return Data(train, tests[:test_limit] if test_limit else tests)


def load_test(path: str | Path | None = None, labels: Sequence[str] = LABELS) -> list[Example]:
    """The test pairs of ``path``: a JSONL file, or a folder's ``test.jsonl`` (default: the shipped data's)."""
    path = SHIPPED if path is None else Path(path)
    return read_jsonl(path / "test.jsonl" if path.is_dir() else path, labels)


def reasoner(model: LanguageModel | None = None, *, rationale_tokens: tuple[int, int] = (1, 5)) -> LatentReasoner:
    """The latent reasoner of this task on ``model`` (default: the embedded model)."""
    return LatentReasoner(model or load_model(), template=TEMPLATE, labels=LABELS, rationale_tokens=rationale_tokens)


def _from_hub(labels: int | None) -> tuple[list[Example], list[Example]]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise FileNotFoundError(f"loading {HUB_ID} needs the datasets package and a network; or give {WHERE}") from None
    ds = datasets.load_dataset(HUB_ID)
    rows = [Example(r["text"], r["label_text"]) for r in ds["train"]]
    return (rows if labels is None else rows[:labels]), [Example(r["text"], r["label_text"]) for r in ds["test"]]
