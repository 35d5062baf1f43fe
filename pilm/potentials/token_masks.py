"""A language over a model's tokens: a regular expression, a JSON schema or a grammar, compiled
by xgrammar against the vocabulary, judging prefixes and completions and giving next-token masks.

The text of a token sequence is its bytes (EOS adds none; an added token such as
"<|im_start|>" is its text, as ``decode`` shows it). For a prefix s, ``viable(s)`` says whether its bytes can still be
extended to a string of the language, ``accepts(s)`` whether they are one, and ``allowed``
the next tokens v with viable(s + v) — bytes-exact: a token holding the first byte of a
multi-byte character is allowed where some character that starts with it keeps the prefix
viable, so a sampler that masks loses no path the potential would keep. The three always
agree, as all read the same token automaton.

Why xgrammar (measured on the embedded tokenizer, ``experiments/mask_engines.py``,
``docs/masks/engines.json``): llguidance, outlines-core and xgrammar all fill 64 masks in
2–8 ms, but only xgrammar's masks equal the byte-level reference on a pattern of multi-byte
words; llguidance allows only the canonical tokenisation where the pattern forces a literal
("c" may not be followed by "a" towards "café", only by "af") and outlines-core dropped the
space after a word ending in a multi-byte character — both forbid tokens that lead to
phi > 0, which biases a masked sampler.

Matchers are memoised per prefix (a child forks its parent's matcher and accepts one token),
so a step costs one token per distinct particle, and within a step particles that share a
prefix (after resampling) share one mask.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

Kind = Literal["regex", "json", "grammar"]
_SEARCH = 4_096  # prefixes the shortest-completion search may open before it settles for a lower bound
_MEMO = 16_384  # matchers kept per language, least recently used dropped first: ~19 KB each (measured),
# and SMC asks for the children of the prefixes it asked for one step before, so twice the rows suffice


def _compiler(model):
    """xgrammar's compiler for ``model``'s vocabulary: a transformers tokenizer's bytes, or each
    token's decoded text for models without one (tabular LMs)."""
    import xgrammar as xgr

    stops = [] if model.eos_token_id is None else [model.eos_token_id]
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.vocab_size, stop_token_ids=stops or None)
    else:
        vocab = ["" if v == model.eos_token_id else model.decode([v]) for v in range(model.vocab_size)]
        info = xgr.TokenizerInfo(vocab, stop_token_ids=stops or None)
    return xgr.GrammarCompiler(info, max_threads=1)


_per_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiler and languages


class TokenLanguage:
    """One constraint compiled for one model's vocabulary; raises ``ValueError`` naming the
    problem when xgrammar cannot compile it."""

    def __init__(self, kind: Kind, spec: str, model, **options):
        import xgrammar as xgr

        self.eos, self.vocab_size = model.eos_token_id, model.vocab_size  # no reference to the model: it keys the cache weakly
        compiler = _per_model[model]["compiler"]
        try:
            if kind == "regex":
                self.compiled = compiler.compile_regex(spec)
            elif kind == "json":
                self.compiled = compiler.compile_json_schema(spec, **options)
            else:
                self.compiled = compiler.compile_grammar(spec)
        except Exception as err:  # xgrammar raises RuntimeError or its own parse errors
            raise ValueError(f"xgrammar cannot compile this {kind}: {str(err).splitlines()[0]}") from err
        self._xgr = xgr
        root = xgr.GrammarMatcher(self.compiled, terminate_without_stop_token=True)
        self._memo: OrderedDict[tuple[int, ...], Any] = OrderedDict({(): root})  # xgrammar matchers (untyped)
        cache = _per_model[model]
        if "bytes" not in cache:
            cache["bytes"] = self.compiled.tokenizer_info.decoded_vocab  # each token's bytes, as the matcher reads them
        self._token_bytes = cache["bytes"]
        self._shortest: dict[int, float] = {}  # horizon -> min_tokens(horizon)

    def _text_tokens(self, tokens: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(t) for t in tokens if t != self.eos)

    def _matcher(self, key: tuple[int, ...]):
        """The matcher after a prefix of text tokens, or None where the prefix is dead."""
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        start = len(key) - 1
        while start > 0 and key[:start] not in self._memo:
            start -= 1
        matcher = self._memo[key[:start]]
        for end in range(start + 1, len(key) + 1):
            if matcher is not None:
                child = matcher.fork()
                matcher = child if child.accept_token(key[end - 1]) else None
            self._memo[key[:end]] = matcher
        self._memo.move_to_end(())  # the root is never dropped
        while len(self._memo) > _MEMO:
            self._memo.popitem(last=False)
        return matcher

    def min_tokens(self, horizon: int) -> float:
        """The fewest text tokens any accepted completion has (inf: none has any), or a lower
        bound on it past ``horizon``: a breadth-first search over the distinct texts each number of tokens can
        write (two token sequences with the same bytes reach the same automaton state). Depth
        d is searched only after every text of fewer tokens was found incomplete, so where the
        search stops — at a completed text, past the horizon, or at ``_SEARCH`` opened texts
        — its depth is a lower bound, and exact in the first case."""
        if horizon not in self._shortest:
            self._shortest[horizon] = self._search(horizon)
        return self._shortest[horizon]

    def _search(self, horizon: int) -> float:
        level, seen, opened = {b"": self._memo[()]}, {b""}, 0
        bits = self._xgr.allocate_token_bitmask(1, self.vocab_size)
        for depth in range(horizon + 1):
            if any(matcher.is_completed() for matcher in level.values()):
                return depth
            following: dict[bytes, Any] = {}
            for text, matcher in level.items():
                bits.zero_()
                matcher.fill_next_token_bitmask(bits, 0)
                for token in np.flatnonzero(_unpack(bits, self.vocab_size)[0].numpy()):
                    after = text + self._token_bytes[token]
                    if token == self.eos or after in seen:
                        continue
                    child = matcher.fork()
                    opened += 1
                    if child.accept_token(int(token)):
                        seen.add(after)
                        following[after] = child
                    if opened > _SEARCH:
                        return depth + 1
            if not following:
                return math.inf
            level = following
        return horizon + 1

    def viable(self, tokens: Sequence[int]) -> bool:
        return self._matcher(self._text_tokens(tokens)) is not None

    def accepts(self, tokens: Sequence[int]) -> bool:
        matcher = self._matcher(self._text_tokens(tokens))
        return matcher is not None and matcher.is_completed()

    def allowed(self, prefixes: Sequence[Sequence[int]], stop: int | None,
                device: torch.device | str = "cpu") -> Tensor:
        """(N, V) bool on ``device``: token v after prefix i keeps it viable; the stop token
        where the text (with the stop's own text when it is not EOS) is complete; EOS, when it
        is not the stop, wherever the prefix is viable (it adds no text and does not end the
        completion). The distinct prefixes' packed bitmasks (V/8 bytes a row) travel to the
        device and are unpacked and spread to the rows there."""
        keys = [self._text_tokens(p) for p in prefixes]
        distinct = list(dict.fromkeys(keys))
        bits = self._xgr.allocate_token_bitmask(len(distinct), self.vocab_size)
        bits.zero_()  # a dead prefix allows nothing
        matchers = [self._matcher(key) for key in distinct]
        eos_col, stop_col = [], []  # per distinct prefix: the EOS and stop columns (-1: leave)
        for j, (key, matcher) in enumerate(zip(distinct, matchers, strict=True)):
            if matcher is not None:
                matcher.fill_next_token_bitmask(bits, j)
            live = matcher is not None
            eos_col.append(int(stop != self.eos) if live and self.eos is not None else -1)
            if live and stop is not None:
                stop_col.append(int(self.accepts(key + (stop,)) if stop != self.eos else matcher.is_completed()))
            else:
                stop_col.append(-1)
        where = {key: j for j, key in enumerate(distinct)}
        index = [where[k] for k in keys]
        columns = torch.tensor([index + eos_col + stop_col], dtype=torch.long).to(device)  # one transfer
        rows = _unpack(bits.to(device), self.vocab_size)
        distinct_rows = torch.arange(len(distinct), device=rows.device)
        for col, values in ((self.eos, columns[0, len(keys):len(keys) + len(distinct)]),
                            (stop, columns[0, len(keys) + len(distinct):])):
            if col is not None:
                rows[distinct_rows, col] = torch.where(values >= 0, values.bool(), rows[:, col])
        return rows[columns[0, : len(keys)]]


def _unpack(bits: Tensor, vocab_size: int) -> Tensor:
    """xgrammar's int32 bitmask (bit j of word w = token 32 w + j) as (N, V) bool, where
    ``bits`` is. On the CPU numpy's unpackbits on the little-endian bytes is ~100x faster than
    shifting in torch; on an accelerator the shifts run there."""
    if bits.device.type == "cpu":
        flat = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(flat[:, :vocab_size].astype(bool))
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    return ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def language(kind: Kind, spec: str, model, **options) -> TokenLanguage:
    """The compiled language of (kind, spec) for ``model``, built once per model (and
    forgotten with it); ``options`` go to xgrammar's compiler (JSON: ``any_whitespace``)."""
    cache = _per_model.get(model)
    if cache is None:
        cache = _per_model[model] = {"compiler": _compiler(model)}
    key = (kind, spec, tuple(sorted(options.items())))
    if key not in cache:
        cache[key] = TokenLanguage(kind, spec, model, **options)
    return cache[key]
