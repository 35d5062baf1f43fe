"""Tiny language models given by a table of next-token distributions, for exact tests.

Every sequence of a TabularLM can be enumerated, so ``pilm.exact`` gives log Z and sigma
exactly; the samplers step it through the same protocol (and so the same engine code) as a
transformers model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .base import LanguageModel, ModelState, Tokens
from .device import seeded_generator

# Token i prints as the i-th lower-case letter, so regex potentials work on tabular models.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class TabularLM(LanguageModel):
    """p0(v | prefix) = exp(next_logprobs(prefix)[v]).

    ``next_logprobs(prefix: tuple[int, ...])`` returns ``vocab_size`` log-probabilities
    (they are renormalised, so unnormalised logits are fine). The prefix includes the prompt
    ids. Token ``i`` decodes to the letter ``"abc..."[i]``; ``eos_id`` decodes to "".
    The hidden state of a row is a fixed random feature of its prefix (dimension
    ``hidden_size``), enough to tell prefixes apart.
    """

    def __init__(
        self,
        next_logprobs: Callable[[tuple[int, ...]], Sequence[float] | Tensor],
        vocab_size: int,
        eos_id: int | None,
        *,
        hidden_size: int = 16,
        name: str = "tabular",
    ):
        if not 1 <= vocab_size <= len(_ALPHABET):
            raise ValueError(f"vocab_size must be in 1..{len(_ALPHABET)}, got {vocab_size}")
        self.next_logprobs = next_logprobs
        self.vocab_size = vocab_size
        self.eos_token_id = eos_id
        self.hidden_size = hidden_size
        self.name = name
        self._memo: dict[tuple[int, ...], Tensor] = {}

    @classmethod
    def random(
        cls, vocab_size: int, seed: int = 0, *, eos_id: int | None = None, concentration: float = 1.0
    ) -> TabularLM:
        """A random LM: each prefix's next-token distribution is Dirichlet(concentration),
        drawn deterministically from (seed, prefix). ``eos_id=None`` means no EOS (every
        completion runs to the horizon)."""

        def table(prefix: tuple[int, ...]) -> Tensor:
            rng = np.random.default_rng(_prefix_seed(seed, prefix))
            return torch.from_numpy(np.log(rng.dirichlet([concentration] * vocab_size)))

        return cls(table, vocab_size, eos_id, name=f"tabular-random(V={vocab_size}, seed={seed})")

    # -- text <-> tokens ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        try:
            ids = [_ALPHABET.index(ch) for ch in text]
        except ValueError:
            raise ValueError(f"{text!r} has characters outside {_ALPHABET[: self.vocab_size]!r}") from None
        if any(i >= self.vocab_size for i in ids):
            raise ValueError(f"{text!r} has characters outside {_ALPHABET[: self.vocab_size]!r}")
        return ids

    def decode(self, ids: Tokens) -> str:
        return "".join("" if i == self.eos_token_id else _ALPHABET[i] for i in ids)

    # -- distributions ----------------------------------------------------------------------
    def logprobs_of(self, prefix: tuple[int, ...]) -> Tensor:
        """Normalised float32 log p0(. | prefix), memoised."""
        lp = self._memo.get(prefix)
        if lp is None:
            raw = torch.as_tensor(self.next_logprobs(prefix), dtype=torch.float64)
            if raw.shape != (self.vocab_size,):
                raise ValueError(f"next_logprobs{prefix} has shape {tuple(raw.shape)}, expected ({self.vocab_size},)")
            lp = torch.log_softmax(raw, 0).float()
            self._memo[prefix] = lp
        return lp

    def _hidden_of(self, prefix: tuple[int, ...]) -> Tensor:
        g = seeded_generator(_prefix_seed(-1, prefix), "cpu")  # a table lives on the CPU
        return torch.randn(self.hidden_size, generator=g)

    def _state(self, prefixes: list[tuple[int, ...]]) -> ModelState:
        logprobs = torch.stack([self.logprobs_of(p) for p in prefixes])
        hidden = torch.stack([self._hidden_of(p) for p in prefixes])
        return ModelState(logprobs, hidden, prefixes, len(prefixes[0]) if prefixes else 0)

    # -- batched decoding --------------------------------------------------------------
    def context(self, prompt_ids: Tokens) -> list[int]:
        return list(prompt_ids)  # the empty prefix is a valid context of a table

    def start(self, prompt_ids: Tokens, n: int) -> ModelState:
        return self._state([tuple(int(t) for t in prompt_ids)] * n)

    def start_many(self, prompts: Sequence[Tokens], n: int) -> ModelState:
        return self._state([tuple(int(t) for t in p) for p in prompts for _ in range(n)])

    def advance(self, state: ModelState, tokens: Tensor, hold: Tensor | None = None) -> ModelState:
        held = [False] * len(tokens) if hold is None else hold.tolist()
        return self._state([p if h else p + (int(t),) for p, t, h in zip(state.cache, tokens.tolist(), held, strict=True)])

    def reindex(self, state: ModelState, idx: Tensor) -> ModelState:
        prefixes = [state.cache[i] for i in idx.tolist()]
        return ModelState(state.logprobs[idx], state.hidden[idx], prefixes, state.length)

    @torch.no_grad()
    def score(self, sequences: Sequence[Tokens], starts: Sequence[int]) -> Tensor:
        out = []
        for seq, s in zip(sequences, starts, strict=True):
            seq = tuple(int(t) for t in seq)
            out.append(sum(float(self.logprobs_of(seq[:j])[seq[j]]) for j in range(s, len(seq))))
        return torch.tensor(out, dtype=torch.float32)


class TabularPolicy(TabularLM):
    """A trainable policy on a tabular base: log q(v | prefix) = log_softmax(log p0(v | prefix)
    + theta[prefix, v]), one free logit vector per prefix of the prompt shorter than
    ``horizon`` (prefixes without the stop token; others fall back to p0), for one prompt or
    several (a list of prompts: amortised over them). Every policy over those sequences is
    representable, so a fine-tuning objective can be checked at its exact optimum. ``stop``
    is the target's stop token (default EOS). ``theta`` starts at 0 (q = p0)."""

    def __init__(self, base: TabularLM, prompt_ids: Tokens | Sequence[Tokens], horizon: int, *,
                 stop: int | None = None):
        super().__init__(base.next_logprobs, base.vocab_size, base.eos_token_id, hidden_size=base.hidden_size,
                         name=f"{base.name}+policy")
        self.base = base
        stop = base.eos_token_id if stop is None else stop
        tokens = [v for v in range(base.vocab_size) if v != stop]
        prompts = cast("Sequence[Tokens]", prompt_ids if prompt_ids and not isinstance(prompt_ids[0], int) else [prompt_ids])
        level = list(dict.fromkeys(tuple(int(t) for t in p) for p in prompts))
        prefixes = []
        for _ in range(horizon):
            prefixes += level
            level = [p + (v,) for p in level for v in tokens]
        self.index = {p: i for i, p in enumerate(prefixes)}
        self.trainable = nn.ParameterDict({"theta": nn.Parameter(torch.zeros(len(prefixes), base.vocab_size))})

    def logprobs_of(self, prefix: tuple[int, ...]) -> Tensor:
        lp = self.base.logprobs_of(prefix)
        i = self.index.get(prefix)
        return lp if i is None else torch.log_softmax(lp + self.trainable["theta"][i], 0)

    def train(self, mode: bool = True) -> TabularPolicy:
        return self

    def save_pretrained(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"theta": self.trainable["theta"].detach().contiguous()}, directory / "policy.safetensors")
        return directory


def _prefix_seed(seed: int, prefix: tuple[int, ...]) -> int:
    digest = hashlib.blake2b(repr((seed, prefix)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
