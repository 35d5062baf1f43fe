"""A language model as judge: r = p(" Yes") / (p(" Yes") + p(" No")) after a question about the steps."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import LanguageModel
from ..models.prompt_cache import PromptCache
from .base import ProcessReward, StepBatch

TEMPLATE = (
    "Question: {question}\n"
    "Proposed solution, so far:\n{steps}\n"
    "Is every step of this solution correct? Answer Yes or No.\n"
    "Answer:"
)


class LMJudge(ProcessReward):
    """r(c, x_{<=t}) = p(yes | judge prompt) / (p(yes | .) + p(no | .)) with the judge prompt
    ``template`` filled with the question and the steps so far (joined by newlines), under
    ``model`` (the policy itself, or any other model), in batched forwards of at most
    ``batch_rows`` prompts. ``yes`` and ``no`` are the answer words; their first token is read.

    Each prompt repeats the judge's last prompt about the chain up to the new step, so the
    judge keeps its forwards in a ``PromptCache`` and a backend that keeps keys and values
    (transformers) runs only what follows the longest prefix it already ran: a chain of T
    steps costs O(T) judge positions, not O(T²), while the cache holds a step's prompts. There
    a question's rows also go in calls of their own (``shares_choice_prefix``), so its
    instructions and question run once. Rows with the same question and steps (a resampling's
    copies, the same step drawn twice) ask one prompt. ``lm_tokens`` counts the positions run;
    ``cache_bytes`` bounds the cache (None: a quarter of the device's free memory when it
    first keeps a forward); ``begin()`` (a run starting) empties it."""

    def __init__(self, model: LanguageModel, template: str = TEMPLATE, *, yes: str = " Yes", no: str = " No",
                 chat: bool = False, batch_rows: int = 256, cache_bytes: int | None = None):
        super().__init__()
        missing = [slot for slot in ("{question}", "{steps}") if slot not in template]
        if missing:
            raise ValueError(f"the judge template needs the slots {missing} (it has {template!r})")
        self.model, self.template, self.chat, self.batch_rows = model, template, chat, batch_rows
        self.cache = PromptCache(cache_bytes)
        ids = [model.encode(w) for w in (yes, no)]
        if not all(ids) or ids[0][0] == ids[1][0]:
            raise ValueError(f"the judge's answers {yes!r} and {no!r} must start with different tokens")
        self.yes, self.no = ids[0][0], ids[1][0]

    @property
    def name(self) -> str:
        return f"LMJudge({self.model.name})"

    def begin(self) -> None:
        self.cache.clear()

    @torch.no_grad()
    def score(self, batch: StepBatch) -> Tensor:
        # Rows that hold the same question and steps (copies a resampling made, or the same step
        # drawn twice) ask one prompt: it is encoded and run once and its score given to each.
        texts: dict[tuple[str, str], int] = {}
        row_of = [texts.setdefault((q, "\n".join(s).strip()), len(texts))
                  for q, s in zip(batch.questions, batch.steps, strict=True)]
        prompts = [self.model.encode_prompt(self.template.format(question=q, steps=s), chat=self.chat) for q, s in texts]
        calls = [list(range(len(prompts)))]
        if self.model.shares_choice_prefix:  # a question's prompts in calls of their own; lone ones together
            by_question: dict[str, list[int]] = {}
            for i, (q, _) in enumerate(texts):
                by_question.setdefault(q, []).append(i)
            lone = [i for rows in by_question.values() if len(rows) == 1 for i in rows]
            calls = [rows for rows in by_question.values() if len(rows) > 1] + ([lone] if lone else [])
        scores = torch.zeros(len(prompts), dtype=torch.float64)
        before = self.cache.positions
        for rows in calls:
            for lo in range(0, len(rows), self.batch_rows):
                chunk = rows[lo: lo + self.batch_rows]
                lp = self.model.choice_logprobs([prompts[i] for i in chunk], [self.yes, self.no], cache=self.cache)
                scores[chunk] = torch.softmax(lp.double(), -1)[:, 0].cpu()
        self.lm_tokens += self.cache.positions - before
        return scores[row_of]
