"""The language-model protocol every sampler steps through.

A model is p0(s_t | x, s_{<t}) exposed as a batched state machine: ``start`` encodes the
prompt once and broadcasts it to ``n`` rows, ``advance`` feeds one token per row (one
forward pass for all rows), ``reindex`` selects/duplicates rows (resampling, dropping
finished particles) without recomputing any prefix. ``score`` is teacher-forced
log-likelihood of whole sequences in one batched forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import BackendError, EmptyPromptError

if TYPE_CHECKING:
    from .prompt_cache import PromptCache

Tokens = Sequence[int]


@dataclass
class ModelState:
    """Rows of a batched decode.

    ``logprobs`` is log p0(next token | row's context), float32, shape (n, V).
    ``hidden`` is the last hidden state at the last position, float32, shape (n, H).
    ``cache`` is backend-specific and is consumed by ``advance``/``reindex``: after either
    call, only the returned state is valid (a backend may ``release`` the one it was given).
    """

    logprobs: Tensor
    hidden: Tensor
    cache: Any
    length: int

    @property
    def n(self) -> int:
        return self.logprobs.shape[0]

    def release(self) -> None:
        """Drop this state's next-token tensors (a backend does, once ``advance`` or ``reindex``
        has consumed the state), so that its (n, V) log-probabilities are not held beside the
        next step's: at 1,024 rows of a 49k vocabulary each copy is 201 MB."""
        self.logprobs = self.logprobs.new_empty(0, self.logprobs.shape[-1])
        self.hidden = self.hidden.new_empty(0, self.hidden.shape[-1])


@dataclass(frozen=True)
class StepRequest:
    """One row's next stretch of tokens, drawn by a backend that generates natively
    (``LanguageModel.generates_steps``): continue ``context`` by at most ``max_tokens`` tokens
    of p0^(1/temperature) (temperature 0: greedy), stopping after a token in ``stop_ids`` or
    once the text holds one of ``stop_texts``; ``seed`` makes the draw reproducible."""

    context: tuple[int, ...]
    max_tokens: int
    temperature: float
    seed: int
    stop_ids: tuple[int, ...] = ()
    stop_texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """What a ``StepRequest`` drew: ``tokens``, and how many of the context's tokens the
    backend's prefix cache served (``cached``). No log-probs: the draws are p_M's own, so no
    weight reads them (and a weight never mixes two backends' log-probs)."""

    tokens: tuple[int, ...]
    cached: int = 0


class LanguageModel(ABC):
    """Base class of pilm models (see the module docstring for the protocol).

    ``generates_steps``: the model is a serving engine that draws whole stretches of tokens
    itself (``generate``) instead of exposing one forward per token (``start``/``advance``):
    the particle engine then advances rows a step at a time on it."""

    generates_steps: bool = False
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None = None
    name: str = "model"
    context_length: int | None = None  # the most tokens (prompt + completion) it attends to; None: no limit

    # -- text <-> tokens ---------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Tokens) -> str: ...

    def encode_prompt(self, prompt: str | Tokens, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt: raw text by default; ``chat=True`` applies the chat template."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            raise ValueError(f"{self.name} has no chat template; use chat=False")
        return self.encode(prompt)

    def context(self, prompt_ids: Tokens) -> list[int]:
        """The ids the model conditions on for ``prompt_ids`` (a BOS stands in for an empty prompt)."""
        if prompt_ids:
            return list(prompt_ids)
        if self.bos_token_id is None:
            raise EmptyPromptError(
                f"the prompt is empty and {self.name} has no BOS token to condition on: "
                "give a non-empty prompt"
            )
        return [self.bos_token_id]

    # -- batched decoding --------------------------------------------------------------
    @abstractmethod
    def start(self, prompt_ids: Tokens, n: int) -> ModelState:
        """Encode the prompt once and return ``n`` identical rows ready for the first token."""

    def start_many(self, prompts: Sequence[Tokens], n: int) -> ModelState:
        """``n`` rows for each prompt, prompt-major (rows ``i*n .. i*n+n-1`` continue prompt i),
        each prompt encoded once. Backends override this for prompts that differ."""
        prompts = [tuple(int(t) for t in p) for p in prompts]
        if len(set(prompts)) != 1:
            raise NotImplementedError(f"{type(self).__name__} cannot batch different prompts")
        return self.start(prompts[0], n * len(prompts))

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        """Draw every request's tokens (``generates_steps`` backends only)."""
        raise BackendError(f"{type(self).__name__} decodes token by token (start/advance), not by requests")

    def choice_logprobs(self, prompts: Sequence[Tokens], choices: Sequence[int],
                        cache: PromptCache | None = None) -> Tensor:
        """log p0(v | prompt) for each prompt (rows) and each token v of ``choices`` (columns),
        float32: one forward of every prompt. ``cache`` (``models.prompt_cache``) counts the
        positions run (``positions``), and on a backend that keeps keys and values
        (transformers) lets later calls start from the longest prefix this one ran."""
        logprobs = self.start_many(prompts, 1).logprobs
        if cache is not None:
            cache.positions += sum(len(self.context(p)) for p in prompts)
        return torch.stack([logprobs[:, v] for v in choices], 1)  # no index tensor made on the host

    shares_choice_prefix: bool = False
    """Whether ``choice_logprobs`` runs the prefix its prompts share once (callers then group
    prompts that share one)."""

    def max_rows(self, length: int, *, prompt: int = 0, per_prompt: int = 1) -> int | None:
        """How many rows of ``length`` positions (prompt and completion) fit in the memory of
        this model's device at once (``None``: no limit); ``prompt`` of those positions are a
        prompt that ``per_prompt`` rows continue (a backend that stores it once counts it so)."""
        return None

    @abstractmethod
    def advance(self, state: ModelState, tokens: Tensor, hold: Tensor | None = None) -> ModelState:
        """Append ``tokens[i]`` to row i (one batched forward) and return the next-token state.
        Rows where the boolean ``hold`` is set wait: nothing is appended to them (their
        ``tokens`` entry is ignored) and their state stays as it was, so rows that reached a
        step boundary can wait while the others finish their step."""

    @abstractmethod
    def reindex(self, state: ModelState, idx: Tensor) -> ModelState:
        """Rows ``idx`` of ``state`` (duplicates allowed, fewer rows allowed), cache reused."""

    # -- scoring -------------------------------------------------------------------------
    @abstractmethod
    def score(self, sequences: Sequence[Tokens], starts: Sequence[int]) -> Tensor:
        """sum_{j >= starts[i]} log p0(seq_i[j] | seq_i[:j]) for each sequence, float32, shape (n,).

        ``seq_i[:starts[i]]`` is the context (passed through ``context`` so it may be empty).
        """

    def prefix_logprobs(self, prompt_ids: Tokens, tokens: Tensor) -> Tensor:
        """log p(. | x, s_{1:i}) for i = 0..L: shape (B, L+1, V), float32, under the caller's
        grad mode (a trainable model gets gradients through it). ``tokens`` is (B, L), right-
        padded with -1; rows past their length hold values for padding and must be masked.

        This default steps ``start``/``advance``; backends override it with one teacher-forced
        forward."""
        state = self.start(prompt_ids, len(tokens))
        out = [state.logprobs]
        for t in range(tokens.shape[1]):
            state = self.advance(state, tokens[:, t].clamp(min=0))
            out.append(state.logprobs)
        return torch.stack(out, 1)

    def log_prob(self, prompt: str | Tokens, completions: Sequence[str | Tokens]) -> Tensor:
        """log p0(completion | prompt) for each completion, batched in one forward.

        Completions may be texts or token ids; an EOS token inside the ids is counted like
        any other token (a text completion has no EOS).
        """
        prompt_ids = self.encode_prompt(prompt)
        ctx = self.context(prompt_ids)
        comps = [self.encode(c) if isinstance(c, str) else [int(t) for t in c] for c in completions]
        return self.score([ctx + c for c in comps], [len(ctx)] * len(comps))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype_name(self) -> str:
        """The dtype the forward passes run in (recorded in every result)."""
        return "float32"


class Trainable(Protocol):
    """What fine-tuning needs of a policy besides the model protocol (``LoRAPolicy``,
    ``TabularPolicy``): its weights, the dropout switch and saving."""

    trainable: nn.Module

    def train(self, mode: bool = True) -> object: ...

    def save_pretrained(self, directory: str | Path) -> Path: ...


def decode_step(model: LanguageModel, state: ModelState, rows: Tensor, tokens: Tensor, *followers) -> ModelState:
    """The batched decode step every sampler shares: keep rows ``rows`` of ``state``
    (duplicates: resampling; fewer: finished rows leave; the KV cache is reindexed, never
    recomputed) and append ``tokens[i]`` to row i in one forward. ``followers`` (proposals,
    twists with a body of their own) are reindexed and advanced in lock-step."""
    for f in followers:
        f.reindex(rows)
        f.advance(tokens)
    return model.advance(model.reindex(state, rows), tokens)


def encode_with_tokenizer(tokenizer, name: str, prompt: str | Tokens | Sequence[dict], chat: bool) -> list[int]:
    """A prompt's ids under a transformers tokenizer (``LanguageModel.encode_prompt``): raw
    text as the start of a document (the tokenizer's own special tokens, e.g. a BOS,
    included); ``chat=True`` wraps it as one user turn of the chat template and adds the
    generation prompt, and a list of ``{"role": ..., "content": ...}`` turns is a conversation."""
    messages = chat and not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], dict)
    if not isinstance(prompt, str) and not messages:
        return [int(t) for t in prompt]  # type: ignore[arg-type]  # token ids
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{name}'s tokenizer has no chat template; use chat=False")
        turns = list(prompt) if messages else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # BatchEncoding or plain ids
    return list(tokenizer(prompt).input_ids)


def single_id(*candidates) -> int | None:
    """The first candidate that names a token (a list names its first), as an int."""
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return None
