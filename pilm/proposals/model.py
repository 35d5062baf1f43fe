"""Another language model as the proposal: a fine-tuned policy, or a prompted one.

q(s_t | s_{<t}) comes from ``model`` conditioned on ``prompt`` (default: the target's
prompt), scored on the target's own token ids, so the proposal must share the target
model's tokenizer. The model steps in lock-step with the target's model (its own KV cache,
reindexed with it). SMC then weights by p0 psi / q, so any such model, however it was
obtained, gives an unbiased Z-hat and bounds on log Z.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ..models.base import LanguageModel, ModelState
from ..target import Target
from ..twists.base import Prefixes
from .base import Proposal, Proposed


class ModelProposal(Proposal):
    """q = ``model`` given ``prompt`` (text or ids; ``None`` = each target's own prompt; a
    function of the target = a prompt per target, e.g. the ``policy_prompt`` a policy was
    fine-tuned with)."""

    def __init__(self, model: LanguageModel, prompt: str | Sequence[int] | Callable | None = None, *,
                 chat: bool = False):
        self.model, self.prompt, self.chat = model, prompt, chat
        self._state: ModelState | None = None
        self.name = (model.name if prompt is None else f"{model.name} | prompt per target" if callable(prompt)
                     else f"{model.name} | prompt {prompt!r}")

    def check_compatible(self, target: Target) -> None:
        if self.model is target.model:
            return
        same = self.model.vocab_size == target.model.vocab_size
        vocab = getattr(getattr(self.model, "tokenizer", None), "get_vocab", None)
        other = getattr(getattr(target.model, "tokenizer", None), "get_vocab", None)
        if same and vocab and other:
            same = vocab() == other()
        if not same:
            raise ValueError(
                f"the proposal {self.model.name} and the target model {target.model.name} have different "
                "tokenizers: a proposal must score the target's own token ids"
            )

    def prompt_ids(self, target: Target) -> list[int]:
        """The ids this proposal conditions on for ``target``."""
        prompt = self.prompt(target) if callable(self.prompt) else self.prompt
        return list(target.prompt_ids) if prompt is None else self.model.encode_prompt(prompt, chat=self.chat)

    def begin(self, targets: Sequence[Target], n: int) -> None:
        for t in targets:
            self.check_compatible(t)
        self._state = self.model.start_many([self.prompt_ids(t) for t in targets], n)

    def propose(self, state: ModelState, prefixes: Prefixes | None) -> Proposed:
        assert self._state is not None  # begin() came first
        return Proposed(self._state.logprobs.to(state.logprobs.device))

    def advance(self, tokens: Tensor, hold: Tensor | None = None) -> None:
        assert self._state is not None  # begin() came first
        self._state = self.model.advance(self._state, tokens, hold=hold)

    def reindex(self, idx: Tensor) -> None:
        assert self._state is not None  # begin() came first
        self._state = self.model.reindex(self._state, idx)
