"""Keys and values of prompts already run, found again by their tokens: a prefix cache (as
vLLM's automatic prefix caching) for calls that score many prompts which grow.

A judge asks its question about a chain after every step, so each of its prompts repeats the
last one up to the new step: with a ``PromptCache``, ``HFModel.choice_logprobs`` runs only
what follows the longest prefix it already ran (the new step and the question after it),
which makes a judged chain of T steps cost O(T) positions, not O(T²). Lookup is by content,
not by row, so it survives resampling: a particle copied to two rows finds its parent's
prompt from either. The cached keys and values are exactly what a forward of the whole
prompt would compute (the positions and the causal context are the same), so scores do not
change, up to the rounding of a different batch shape.

Each call's forward is kept whole (``Run``: its layers' keys and values, and where each row's
positions lie in them), and whole runs are evicted, least recently used first, beyond
``max_bytes`` (0: nothing is kept). ``positions`` counts the positions calls with this cache ran through the model
(a judge's compute), on any backend. The cache assumes fixed weights: ``clear()`` it after
changing them (runs under another adapter are kept apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch import Tensor


@dataclass
class Run:
    """One call's forward: ``layers`` of (keys, values), each (rows, heads, width, head_dim);
    row i's prompt is ``tokens[i]`` and its position k is at ``where[i][k]`` of the width."""

    owner: Hashable
    layers: list[tuple[Tensor, Tensor]]
    tokens: list[list[int]]
    where: list[Tensor]
    used: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


@dataclass
class Hit:
    """The ``length`` first positions of a prompt, found at row ``row`` of ``run``."""

    run: Run | None = None
    row: int = 0
    length: int = 0


class PromptCache:
    """The runs of earlier calls (see the module docstring); ``max_bytes`` None: a quarter of
    the device's free memory when the first run is added."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.runs: list[Run] = []
        self.positions = 0
        self._clock = 0
        self._table: tuple[Tensor, list[tuple[Run, int]]] | None = None  # every row's tokens, padded with -1

    def clear(self) -> None:
        self.runs, self._table = [], None

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def longest(self, owner: Hashable, ids: list[int], limit: int) -> Hit:
        """The longest prefix of ``ids``, at most ``limit`` positions, that a run of ``owner``
        holds (an empty ``Hit`` if none)."""
        if not self.runs or limit <= 0:
            return Hit()
        tokens, rows = self._rows()
        width = min(tokens.shape[1], limit)
        same = tokens[:, :width] == torch.tensor(ids[:width])
        lengths = same.cumprod(1).sum(1)
        for k in lengths.argsort(descending=True, stable=True).tolist():
            run, row = rows[k]
            if int(lengths[k]) == 0:
                break
            if run.owner == owner:
                self._clock += 1
                run.used = self._clock
                return Hit(run, row, int(lengths[k]))
        return Hit()

    def add(self, run: Run, free_bytes: int) -> None:
        """Keep ``run``, then evict the least recently used runs (``run`` last) while the
        cache holds more than ``max_bytes`` (``free_bytes``: the device's free memory)."""
        if self.max_bytes is None:
            self.max_bytes = free_bytes // 4
        self._clock += 1
        run.used = self._clock
        self.runs.append(run)
        self.runs.sort(key=lambda r: r.used)
        while self.runs and self.nbytes > self.max_bytes:
            self.runs.pop(0)
        self._table = None

    def _rows(self) -> tuple[Tensor, list[tuple[Run, int]]]:
        if self._table is None:
            rows = [(run, i) for run in self.runs for i in range(len(run.tokens))]
            width = max(len(run.tokens[i]) for run, i in rows)
            table = torch.full((len(rows), width), -1, dtype=torch.long)
            for k, (run, i) in enumerate(rows):
                table[k, : len(run.tokens[i])] = torch.tensor(run.tokens[i])
            self._table = table, rows
        return self._table


def gather(hits: list[Hit], width: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """The hits' keys and values as one batch, right-aligned in ``width`` positions (row i's
    ``hits[i].length`` positions last, zeros before), and the (rows, width) mask of them.
    Every hit must have a run, all with the same layers."""
    first = next(h.run for h in hits if h.run is not None)
    device = first.layers[0][0].device
    lengths = torch.tensor([h.length for h in hits], device=device)
    mask = torch.arange(width, device=device) >= (width - lengths)[:, None]
    layers = [[t.new_zeros((len(hits), t.shape[1], width, t.shape[3])) for t in layer] for layer in first.layers]
    by_run: dict[int, list[int]] = {}
    for i, h in enumerate(hits):
        if h.length:
            by_run.setdefault(id(h.run), []).append(i)
    for rows in by_run.values():
        run = hits[rows[0]].run
        assert run is not None
        source = torch.tensor([hits[i].row for i in rows], device=device)
        index = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for j, i in enumerate(rows):
            n = hits[i].length
            index[j, width - n:] = run.where[hits[i].row][:n]
        into = torch.tensor(rows, device=device)
        for (keys, values), out in zip(run.layers, layers, strict=True):
            for t, o in zip((keys, values), out, strict=True):
                picked = t.index_select(0, source)
                o[into] = picked.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
    return [(k, v) for k, v in layers], mask
