"""The target distribution sigma(s | x) ∝ p0(s | x) phi(s) that every algorithm works on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import TargetConfig
from .errors import ImpossibleTargetError
from .models.base import LanguageModel
from .potentials.base import Potential, Sequences, evaluate
from .potentials.spec import parse_potential
from .steps import Steps


@dataclass
class Target:
    """sigma(s | prompt) = p0(s | prompt) phi(s) / Z over completions s = s_1..s_T.

    A completion ends at the stop token (EOS by default, or ``stop``, one token such as
    "."; it is part of s and its probability counted; with ``stop`` set, EOS is an ordinary
    token) or when it has ``max_new_tokens`` tokens (truncation: p0(s) is the probability of
    the drawn tokens only; no stop is forced). Z = sum_s p0(s | prompt) phi(s); with no
    potential phi = 1 and sigma = p0. ``chat=True`` wraps a text prompt in the model's
    chat template.
    """

    model: LanguageModel
    prompt: str | Sequence[int] | Sequence[dict]  # text, token ids, or chat turns (with chat=True)
    potential: Potential | None = None  # given as a Potential or a spec string (pilm.potentials.parse_potential)
    max_new_tokens: int = TargetConfig.max_new_tokens
    chat: bool = False
    stop: str | int | None = None
    steps: Steps | None = None
    question: str | None = None
    prompt_ids: tuple[int, ...] = field(init=False)
    stop_token_id: int | None = field(init=False)

    if TYPE_CHECKING:  # the dataclass's own __init__, but taking a spec string for the potential (parsed below)
        def __init__(self, model: LanguageModel, prompt: str | Sequence[int] | Sequence[dict],
                     potential: Potential | str | None = None, max_new_tokens: int = TargetConfig.max_new_tokens,
                     chat: bool = False, stop: str | int | None = None, steps: Steps | None = None,
                     question: str | None = None) -> None: ...

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.potential, str):  # a spec, as on the command line: "regex:^[^e]*$"
            self.potential = parse_potential(self.potential, self.model)
        if self.potential is not None and not isinstance(self.potential, Potential):
            raise TypeError(
                f"potential must be a pilm Potential, got {type(self.potential).__name__}; "
                "wrap a function with pilm.potentials.FunctionPotential, or give a spec string such as 'regex:[^e]*'"
            )
        self.prompt_ids = tuple(self.model.encode_prompt(self.prompt, chat=self.chat))
        bad = [t for t in self.prompt_ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary of {self.model.name}")
        context = len(self.model.context(self.prompt_ids))  # an empty prompt on a model with no BOS fails here
        limit = self.model.context_length
        if limit is not None and context + self.max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} after a {context}-token prompt passes the "
                             f"{limit}-token context of {self.model.name}: at most {max(limit - context, 0)} new tokens fit")
        self.stop_token_id = self._stop_id()
        need = max((f.min_new_tokens(self.model, self.max_new_tokens) for f, e in self.potential.factors() if e > 0),
                   default=0) if self.potential is not None else 0
        if need > self.max_new_tokens:
            what = ("no token of the vocabulary can write it" if math.isinf(need)
                    else f"every completion it accepts needs at least {need} tokens of {self.model.name}")
            raise ImpossibleTargetError(f"{self.potential} cannot be met within max_new_tokens={self.max_new_tokens}: "
                                        f"{what}")
        if self.steps is not None and not isinstance(self.steps, Steps):
            raise TypeError(f"steps must be a pilm.steps.Steps, got {type(self.steps).__name__}")
        if self.question is None:
            self.question = self.model.decode(self.prompt_ids)

    def _stop_id(self) -> int | None:
        if self.stop is None:
            return self.model.eos_token_id
        if isinstance(self.stop, int):
            ids = [self.stop]
        else:
            ids = self.model.encode(self.stop)
        if len(ids) != 1 or not 0 <= ids[0] < self.model.vocab_size:
            raise ValueError(f"stop must be one token of {self.model.name}, got {self.stop!r} ({len(ids)} tokens)")
        return ids[0]

    def describe(self) -> dict:
        """What this target is, in words: prompt text, potential and horizon (saved with a
        twist trained for it, to warn when the twist is used elsewhere)."""
        return {"prompt": self.model.decode(self.prompt_ids), "potential": str(self.potential),
                "max_new_tokens": self.max_new_tokens}

    @property
    def has_prefix_potential(self) -> bool:
        return self.potential is not None and self.potential.has_prefix

    def sequences(self, tokens: Sequence[Sequence[int]]) -> Sequences:
        return Sequences(self.model, self.prompt_ids, [tuple(int(t) for t in s) for s in tokens])

    def is_complete(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` is a whole completion: it reaches the horizon, ends at the stop
        token, or (with ``steps``) its last step ends the chain."""
        if len(tokens) == self.max_new_tokens or (bool(tokens) and tokens[-1] == self.stop_token_id):
            return True
        return self.steps is not None and self.steps.chain_end(self.model.decode, list(tokens),
                                                               self.stop_token_id) == len(tokens)

    def log_potential(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """log phi of completed sequences (0 without a potential), checked."""
        if self.potential is None:
            return torch.zeros(len(tokens))
        return evaluate(self.potential, self.sequences(tokens), final=True)

    def log_prefix_potential(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """log psi of incomplete prefixes (0 without a prefix-aware potential), checked."""
        if not self.has_prefix_potential:
            return torch.zeros(len(tokens))
        assert self.potential is not None  # has_prefix_potential says there is one
        return evaluate(self.potential, self.sequences(tokens), final=False)

    def log_p0(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """log p0(s | prompt) of completions given as token ids, one batched forward."""
        return self.model.log_prob(self.prompt_ids, tokens)

    def log_unnormalized(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """log sigma~(s) = log p0(s | prompt) + log phi(s)."""
        return self.log_p0(tokens) + self.log_potential(tokens)
