"""How many tokens a regular expression needs at least, known before sampling.

A completion that full-matches ``pattern`` has at least ``m`` characters (the pattern's
minimum width), every one of them in the pattern's character class ``C`` (all the literals,
sets and ranges it can match). A token can add at most ``k`` characters of ``C`` to a text,
with ``k`` the most characters of ``C`` in one token of the vocabulary whose characters all
lie in ``C`` (a token that decodes to part of a multi-byte character counts one more). So
any completion needs at least ceil(m / k) tokens, and none if no token fits (k = 0). Both
``m`` and ``C`` are over-approximated where the pattern is not plain (flags, negated sets,
``.``, word classes): then ``C`` is every character and the bound is ceil(m / longest token).
Where ``C`` holds a space, every token counts one character more (a SentencePiece tokenizer
drops a token's leading space when it decodes it alone). Syntax the stdlib parser reads
differently from the engines (flags, look-arounds, fuzzy matching, POSIX classes) gets no bound.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
import weakref
from collections.abc import Callable
from re import _constants as c  # type: ignore[attr-defined]  # noqa: PLC2701 (the parser's own opcodes; no stub)
from re import _parser as sre  # type: ignore[attr-defined]  # noqa: PLC2701 (the stdlib's regex parser; no stub)
from typing import cast

from ..models.base import LanguageModel

CharTest = Callable[[str], bool]
_ANY: CharTest = lambda ch: True  # noqa: E731
_CATEGORIES: dict = {c.CATEGORY_DIGIT: lambda ch: unicodedata.category(ch) == "Nd", c.CATEGORY_SPACE: str.isspace}


def min_new_tokens(pattern: str, model: LanguageModel, horizon: int) -> float:
    """A lower bound on the tokens of ``model`` any full match of ``pattern`` needs, as far
    as it matters for ``horizon`` (0 when the pattern is no longer than the horizon in
    characters, or not one Python's ``re`` parses; inf when no token can write it)."""
    m, tests = _parse(pattern)
    if m <= horizon:  # a token writes at least one character: no bound past the horizon
        return 0
    per_model = _MOST.setdefault(model, {})
    if pattern not in per_model:
        per_model[pattern] = _most_chars_per_token(model, tests)
    k = per_model[pattern]
    return math.inf if k == 0 else math.ceil(m / k)


@functools.lru_cache(maxsize=256)
def _parse(pattern: str) -> tuple[int, list[CharTest] | None]:
    """The pattern's minimum width in characters (0: no bound) and its character tests, parsed
    once per pattern (a target is built per step in some loops)."""
    if _BEYOND_RE.search(pattern):
        return 0, None
    try:
        parsed = sre.parse(pattern)
    except (re.error, OverflowError, RecursionError):
        return 0, None
    flagged = parsed.state.flags & (re.IGNORECASE | re.VERBOSE)
    return parsed.getwidth()[0], None if flagged else _char_tests(parsed)


_BEYOND_RE = re.compile(r"\(\?(?!:)|\{[^\d,}]|\[\[:")
"""Syntax the stdlib parser would read differently from the engines (scoped or inline flags,
look-arounds, the ``regex`` module's fuzzy ``{e<=n}`` and POSIX classes): no bound."""

_MOST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {pattern: the most characters of the pattern's class one token adds}."""


def _char_tests(items) -> list[CharTest] | None:
    """Tests whose union holds every character ``items`` (a parsed pattern, or the members of
    a set) can match, or None for "any"."""
    tests: list[CharTest] = []
    for op, arg in items:
        if op == c.LITERAL:
            tests.append(functools.partial(str.__eq__, chr(arg)))
        elif op == c.RANGE:
            tests.append(cast(CharTest, lambda ch, lo=arg[0], hi=arg[1]: lo <= ord(ch) <= hi))
        elif op == c.CATEGORY and arg in _CATEGORIES:
            tests.append(_CATEGORIES[arg])
        elif op in _PARTS:
            for part in _PARTS[op](arg):
                sub = _char_tests(part)
                if sub is None:
                    return None
                tests += sub
        elif op != c.AT:  # ANY, NOT_LITERAL, NEGATE, word classes, groupref, assertions: anything
            return None
    return tests


_PARTS = {c.IN: lambda arg: [arg], c.MAX_REPEAT: lambda arg: [arg[2]], c.MIN_REPEAT: lambda arg: [arg[2]],
          c.POSSESSIVE_REPEAT: lambda arg: [arg[2]], c.SUBPATTERN: lambda arg: [arg[-1]],
          c.ATOMIC_GROUP: lambda arg: [arg], c.BRANCH: lambda arg: arg[1]}
"""The sub-patterns of each composite opcode."""


def _most_chars_per_token(model: LanguageModel, tests: list[CharTest] | None) -> int:
    """The most characters of the class one token adds (module docstring); ``tests=None``: any."""
    allowed = _ANY if tests is None else (lambda ch: any(t(ch) for t in tests))
    spaced = allowed(" ")  # a tokenizer may drop a token's leading space when it decodes it alone
    most = 0
    for v in range(model.vocab_size):
        if v == model.eos_token_id:
            continue
        text = model.decode([v])
        chars = text.replace("\ufffd", "")
        if all(allowed(ch) for ch in chars):
            most = max(most, len(chars) + ("\ufffd" in text) + spaced)
    return most
