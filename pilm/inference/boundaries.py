"""Where a row's step ends: after every token (token SMC) or at a reasoning step's delimiter.

The engine draws every running row's tokens until each has reached its boundary; ``ends``
says which of the rows that just drew are there (a finished row always is), ``close`` runs
once at the boundary (a step boundary records each row's step text and finishes chains that
reached ``Steps.max_steps`` or stated their final answer), and ``select`` keeps its per-row
records in step with the particles.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..steps import Steps
from ..target import Target
from .batch import as_list


class Boundary:
    """After every token (the token SMC boundary); subclasses end steps elsewhere.
    ``every_token``: one boundary per token (progress counts tokens, up to the horizon).
    ``drops_dead``: under an importance rule a row at weight 0 stops drawing. A step
    boundary drops it (it would run a whole step for nothing); at a token boundary it costs
    one row of the next forward until resampling replaces it, and keeps drawing."""

    every_token: bool = True
    drops_dead: bool = False
    unit: str = "tok"

    def begin(self, targets: Sequence[Target], n: int) -> None:
        """Start ``n`` rows per target."""

    def ends(self, rows: Tensor, drawn: Tensor, tokens: Tensor, lengths: Tensor, step_start: Tensor,
             finished: Tensor) -> Tensor:
        """Which of ``rows``, that just drew ``drawn`` (``finished``: it ended its sequence), ended its step."""
        return torch.ones(len(rows), dtype=torch.bool)

    def room(self, rows: Tensor, lengths: Tensor, step_start: Tensor) -> Tensor:
        """The most tokens each of ``rows`` may draw before its step must have ended (a backend
        that generates natively asks for no more)."""
        return torch.ones(len(rows), dtype=torch.long)

    def stop_marks(self, g: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Token ids and texts after which target g's step has surely ended (a native
        backend's stops, which only save tokens: ``ends`` decides)."""
        return (), ()

    def close(self, particles, live: Tensor, finished: Tensor) -> Tensor:
        """At the boundary: which of the ``live`` rows are finished besides ``finished``."""
        return torch.zeros(len(live), dtype=torch.bool)

    def texts(self, live: Tensor) -> list[list[str]] | None:
        """The texts of each live row's steps so far (``None``: this boundary keeps none)."""
        return None

    def select(self, parents: Tensor) -> None:
        """Row k becomes a copy of row ``parents[k]``."""


class StepBoundary(Boundary):
    """Reasoning steps (``pilm.steps.Steps``: each target's own, or ``steps`` for all). A step
    ends at its delimiter, or is cut after ``max_step_tokens`` tokens (counted in ``cut``). A
    one-character delimiter or a token id is tested on the drawn tokens as a batch (each
    token's text decoded once per model); a longer delimiter or a pattern is searched in each
    row's step text."""

    every_token, drops_dead, unit = False, True, "step"
    keeps_texts = True  # the closed steps' texts, for PRMs and results (a count is all the rules need)

    def __init__(self, steps: Steps | None = None):
        self.override = steps
        self.cuts: list[Steps] = []

    def begin(self, targets: Sequence[Target], n: int) -> None:
        self.model, self.n = targets[0].model, n
        self.cuts = [self.override or t.steps or Steps() for t in targets]
        self.stops = [t.stop_token_id for t in targets]
        r = len(targets) * n
        self.steps: list[list[str]] = [[] for _ in range(r)]
        self.taken = torch.zeros(r, dtype=torch.long)  # steps closed
        self.cut = torch.zeros(r, dtype=torch.long)
        self.text = [""] * r
        self.max_tokens = torch.tensor([c.max_step_tokens for c in self.cuts]).repeat_interleave(n)
        self.marks = [_marks(self.model, c.delimiter) for c in self.cuts]

    def ends(self, rows, drawn, tokens, lengths, step_start, finished) -> Tensor:
        groups = rows // self.n
        ended = torch.zeros(len(rows), dtype=torch.bool)
        for g in groups.unique().tolist():
            mine = (groups == g).nonzero().squeeze(1)
            marks = self.marks[g]
            if marks is not None:
                ended[mine] = marks(drawn[mine])
            else:
                for i in mine.tolist():
                    row, v = int(rows[i]), int(drawn[i])
                    self.text[row] += _piece(self.model, v)
                    ended[i] = self.cuts[g].ends(self.text[row], v)
        long = (lengths[rows] - step_start[rows] == self.max_tokens[rows]) & ~ended & ~finished
        self.cut[rows[long]] += 1
        return ended | long

    def room(self, rows, lengths, step_start) -> Tensor:
        return self.max_tokens[rows] - (lengths[rows] - step_start[rows])

    def stop_marks(self, g: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        delimiter = self.cuts[g].delimiter
        if isinstance(delimiter, int):
            return (delimiter,), ()
        if isinstance(delimiter, str) and len(delimiter) == 1:
            return _holding(self.model, delimiter), ()
        return (), (delimiter,) if isinstance(delimiter, str) else ()  # a pattern: ends finds it

    def close(self, particles, live, finished) -> Tensor:
        more = torch.zeros(len(live), dtype=torch.bool)
        spans = zip(live.tolist(), self._starts(particles, live).tolist(), particles.lengths[live].tolist(), strict=True)
        for i, (row, lo, hi) in enumerate(spans):
            g = row // self.n
            ids = particles.tokens[row, lo:hi].tolist()
            if ids and ids[-1] == self.stops[g]:
                ids = ids[:-1]
            text = self.model.decode(ids)
            if self.keeps_texts:
                self.steps[row].append(text)
            self.text[row] = ""
            self.taken[row] += 1
            more[i] = self.cuts[g].finishes(int(self.taken[row]), text)
        return more

    def _starts(self, particles, live: Tensor) -> Tensor:
        """Where each live row's open step began."""
        return particles.step_start[live]

    def texts(self, live: Tensor) -> list[list[str]]:
        return [self.steps[row] for row in live.tolist()]

    def select(self, parents: Tensor) -> None:
        p = parents.tolist()
        if self.keeps_texts:
            self.steps = [list(self.steps[i]) for i in p]
        self.text = [self.text[i] for i in p]
        self.cut, self.taken = self.cut[parents], self.taken[parents]


class TokenStepBoundary(StepBoundary):
    """A boundary after every token (token SMC) that still ends each chain where its target's
    ``Steps`` say: after ``max_steps`` steps, or at a step stating the final answer, as the
    step-level samplers and exact enumeration do, so that one target has one sigma. Rows of a
    target without ``steps`` are never ended by it (``StepBoundary`` would give them ``Steps()``)."""

    every_token, drops_dead, unit = True, False, "tok"
    keeps_texts = False
    room = Boundary.room  # one token: every token is a boundary

    def begin(self, targets: Sequence[Target], n: int) -> None:
        super().begin(targets, n)
        self.active = torch.tensor([t.steps is not None for t in targets]).repeat_interleave(n)
        self.start = torch.zeros(len(self.active), dtype=torch.long)  # where each row's open step began
        self.closing = torch.zeros(len(self.active), dtype=torch.bool)  # its last token ended a step

    def ends(self, rows, drawn, tokens, lengths, step_start, finished) -> Tensor:
        active = self.active[rows]
        self.closing[rows] = False
        if active.any():
            self.closing[rows[active]] = super().ends(rows[active], drawn[active], tokens, lengths, self.start,
                                                      finished[active])
        return torch.ones(len(rows), dtype=torch.bool)

    def close(self, particles, live, finished) -> Tensor:
        more = torch.zeros(len(live), dtype=torch.bool)
        closing = self.closing[live] & ~finished
        if closing.any():
            more[closing] = super().close(particles, live[closing], finished[closing])
            self.start[live[closing]] = particles.lengths[live[closing]]
        return more

    def _starts(self, particles, live: Tensor) -> Tensor:
        return self.start[live]

    def texts(self, live: Tensor) -> None:  # type: ignore[override]  # a token boundary keeps no step texts
        return None

    def select(self, parents: Tensor) -> None:
        super().select(parents)
        self.start = self.start[parents]


def step_targets(target: Target | Sequence[Target], step) -> tuple[list[Target], bool]:
    """The targets as a list (and whether one was given), with ``step`` as their delimiter."""
    targets, single = as_list(target)
    if step is not None:
        targets = [replace(t, steps=replace(t.steps or Steps(), delimiter=step)) if (t.steps is None or
                   t.steps.delimiter != step) else t for t in targets]
    return targets, single


_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {token: its text}


def _piece(model, v: int) -> str:
    pieces = _PIECES.setdefault(model, {})
    if v not in pieces:
        pieces[v] = model.decode([v])
    return pieces[v]


def _holding(model, character: str) -> tuple[int, ...]:
    """Every token whose text holds ``character`` (the whole vocabulary decoded once per model)."""
    held = _HOLDING.setdefault(model, {})
    if character not in held:
        held[character] = tuple(v for v in range(model.vocab_size) if character in _piece(model, v))
    return held[character]


_HOLDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {character: token ids}


def _marks(model, delimiter):
    """A batch test "this token ends a step" for a token id or a one-character delimiter (a
    token's text holds it, each text decoded once), or ``None`` where the step's text must be
    searched."""
    if isinstance(delimiter, int):
        return lambda drawn: drawn == delimiter
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        return None
    known = torch.full((model.vocab_size,), -1, dtype=torch.int8)

    def marks(drawn: Tensor) -> Tensor:
        new = drawn[known[drawn] < 0].unique().tolist()
        for v in new:
            known[v] = delimiter in _piece(model, v)
        return known[drawn] > 0

    return marks
