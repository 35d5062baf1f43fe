"""Reasoning steps: how a completion is cut into steps x_1, x_2, ... (Puri et al. 2025).

A step ends at the token whose text completes the ``delimiter`` (a string such as "\\n", a
compiled regular expression searched in the step's text, or one token id, as tabular models
use), or after ``max_step_tokens`` tokens (the step is cut there, and the run counts it). A
completion ends at the target's stop token or horizon, after ``max_steps`` steps, or at the
end of a step whose text matches ``final`` (the final-answer pattern; its first group, if it
has one, is the answer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast


@dataclass(frozen=True)
class Steps:
    """Where steps end and when a reasoning chain is finished (module docstring)."""

    delimiter: str | re.Pattern | int = "\n"
    max_steps: int = 16
    max_step_tokens: int = 64
    final: str | re.Pattern | None = None

    def __post_init__(self):
        if isinstance(self.delimiter, str) and not self.delimiter:
            raise ValueError("the step delimiter must be a non-empty string, a compiled regex or a token id")
        if isinstance(self.delimiter, bool) or not isinstance(self.delimiter, (str, re.Pattern, int)):
            raise TypeError(f"step delimiter must be a string, a compiled regex or a token id, got {self.delimiter!r}")
        for name in ("max_steps", "max_step_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.final, str):
            object.__setattr__(self, "final", re.compile(self.final))

    def ends(self, text: str, token: int) -> bool:
        """Whether a step whose text (so far) is ``text`` and last token ``token`` is over."""
        if isinstance(self.delimiter, int):
            return token == self.delimiter
        if isinstance(self.delimiter, str):
            return self.delimiter in text
        return self.delimiter.search(text) is not None

    def answer(self, text: str) -> str | None:
        """The final answer in ``text`` (the last match of the ``final`` pattern: its first
        group, or the whole match), canonical (``canonical_answer``), or ``None``."""
        if self.final is None:
            return None
        found = None
        for found in cast(re.Pattern, self.final).finditer(text):  # noqa: B007 (the last match is the answer; compiled above)
            pass
        if found is None:
            return None
        return canonical_answer(found.group(1) if found.re.groups else found.group(0))

    def finishes(self, steps_done: int, step_text: str) -> bool:
        """Whether a chain whose ``steps_done``-th step (text ``step_text``) just closed is
        finished: it has taken ``max_steps`` steps or this step states the final answer."""
        return steps_done >= self.max_steps or self.is_final(step_text)

    def chain_end(self, decode, tokens: list[int], stop: int | None = None) -> int | None:
        """How many of ``tokens`` the chain keeps before these rules end it (after
        ``max_steps`` steps or a final step; a cut step counts), or ``None`` if they do not
        end it; ``decode`` turns token ids into text, ``stop`` (the stop token) ends it anyway."""
        taken, ids, text = 0, [], ""
        for k, v in enumerate(tokens):
            if v == stop:
                return None
            ids.append(v)
            text += decode([v])  # the step's text token by token, as the step samplers read it
            if self.ends(text, v) or len(ids) == self.max_step_tokens:
                taken += 1
                if self.finishes(taken, decode(ids)):
                    return k + 1
                ids, text = [], ""
        return None

    def is_final(self, step_text: str) -> bool:
        """Whether this step states the final answer (``final`` matches it)."""
        return self.final is not None and cast(re.Pattern, self.final).search(step_text) is not None  # compiled


def canonical_answer(text: str) -> str:
    """One spelling per answer, so votes count equal answers together: surrounding spaces,
    a trailing full stop, "$" and thousands separators go; a number is written as an integer
    when it is one ("12.0" -> "12", "1,200" -> "1200"), else as Python prints the float."""
    text = text.strip().rstrip(".").strip().replace("$", "")
    number = text.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return text
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
