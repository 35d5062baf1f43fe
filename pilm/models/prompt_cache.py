"""Keys and values of prompts already run, found again by their tokens: a prefix cache (as
vLLM's automatic prefix caching) for calls that score many prompts which grow.

A judge asks its question about a chain after every step, so each of its prompts repeats the
last one up to the new step: with a ``PromptCache``, ``HFModel.choice_logprobs`` runs only
what follows the longest prefix it already ran (the new step and the question after it),
which makes a judged chain of T steps cost O(T) positions, not O(T²), while the cache holds a
step's prompts. Lookup is by content, not by row, so it survives resampling: a particle copied
to two rows finds its parent's prompt from either. A prompt's cached keys and values are what
a forward of the whole prompt computes (the same positions and causal context; models with a
sliding window, where padding between a prefix and its rest would shift the window, run
whole prompts instead), so scores do not change, up to the rounding of another batch shape.

Each call's forward is kept whole (``Run``: its layers' keys and values, and where each row's
positions lie in them). Beyond ``max_bytes`` whole runs are evicted: first those a later call
extended (a judge's next step holds their rows' prompts up to their closing question), then
the least recently used. ``positions`` counts the positions calls with this cache ran through
the model (a judge's compute), on any backend. The cache assumes fixed weights: ``clear()``
it after changing them (runs of another model or adapter are kept apart).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .device import free_memory


@dataclass(eq=False)
class Run:
    """One call's forward: ``layers`` of (keys, values), each (rows, heads, width, head_dim).
    Row i's prompt is ``tokens[i]``: its first ``cached[i]`` positions at ``cached_at[i]`` of
    the width and onwards, the rest from ``rest_at[i]`` on."""

    owner: Hashable
    layers: list[tuple[Tensor, Tensor]]
    tokens: list[list[int]]
    cached: list[int]
    cached_at: list[int]
    rest_at: list[int]
    used: int = 0
    extended: bool = False
    nbytes: int = field(init=False)
    table: Tensor = field(init=False)  # every row's tokens, padded with -1

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for layer in self.layers for t in layer)
        self.table = torch.full((len(self.tokens), max(map(len, self.tokens))), -1, dtype=torch.long)
        for i, ids in enumerate(self.tokens):
            self.table[i, : len(ids)] = torch.tensor(ids)


@dataclass
class Hit:
    """The ``length`` first positions of a prompt, found at row ``row`` of ``run``."""

    run: Run | None = None
    row: int = 0
    length: int = 0


class PromptCache:
    """The runs of earlier calls (see the module docstring); ``max_bytes`` None: a quarter of
    the device's free memory when a run is first kept (again after ``clear()``)."""

    def __init__(self, max_bytes: int | None = None):
        self._budget = max_bytes
        self.max_bytes = max_bytes
        self.runs: list[Run] = []
        self.positions = 0
        self._clock = 0

    def clear(self) -> None:
        self.runs, self.max_bytes = [], self._budget

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def longest(self, owner: Hashable, ids: list[int], limit: int) -> Hit:
        """The longest prefix of ``ids``, at most ``limit`` positions, that a run of ``owner``
        holds (the latest run's on a tie; an empty ``Hit`` if none). Its run is marked
        extended."""
        best, query = Hit(), torch.tensor(ids[:limit])
        for run in reversed(self.runs):
            if run.owner != owner:
                continue
            width = min(run.table.shape[1], len(query))
            lengths = (run.table[:, :width] == query[:width]).cumprod(1).sum(1)
            row = int(lengths.argmax())
            if int(lengths[row]) > best.length:
                best = Hit(run, row, int(lengths[row]))
        if best.run is not None:
            self._clock += 1
            best.run.used, best.run.extended = self._clock, True
        return best

    def add(self, run: Run) -> None:
        """Keep ``run``, then evict runs (those extended first, then the least recently used,
        ``run`` last) while the cache holds more than ``max_bytes``."""
        if self.max_bytes is None:
            self.max_bytes = free_memory(run.layers[0][0].device) // 4
        self._clock += 1
        run.used = self._clock
        self.runs.append(run)
        held = self.nbytes
        while self.runs and held > self.max_bytes:
            victim = min(self.runs, key=lambda r: (r is run, not r.extended, r.used))
            self.runs.remove(victim)
            held -= victim.nbytes


def gather(hits: list[Hit], width: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """The hits' keys and values as one batch, right-aligned in ``width`` positions (row i's
    ``hits[i].length`` positions last), and the (rows, width) mask of them; the positions
    before are masked out. At least one hit must be found (have a run); all runs have the
    same layers."""
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
        source = [hits[i].row for i in rows]
        n, cached, cached_at, rest_at = (torch.tensor(v, device=device)[:, None] for v in (
            [hits[i].length for i in rows], [run.cached[j] for j in source], [run.cached_at[j] for j in source],
            [run.rest_at[j] for j in source]))
        k = (torch.arange(width, device=device) - (width - n)).clamp(min=0)  # position k of the prompt
        index = torch.where(k < cached, cached_at + k, rest_at + k - cached)
        into, source_rows = torch.tensor(rows, device=device), torch.tensor(source, device=device)
        for (keys, values), out in zip(run.layers, layers, strict=True):
            for t, o in zip((keys, values), out, strict=True):
                picked = t.index_select(0, source_rows)
                o[into] = picked.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
    return [(k, v) for k, v in layers], mask
