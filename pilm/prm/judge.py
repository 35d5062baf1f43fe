"""A language model as judge: r = p(" Yes") / (p(" Yes") + p(" No")) after a question about the steps."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import LanguageModel
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
    ``batch_rows`` prompts. On a backend that runs a call's shared prompt prefix once
    (``shares_choice_prefix``: transformers) each question's rows go in calls of their own, so
    its instructions and question run once per call; ``lm_tokens`` counts the positions run
    (``choice_tokens``). ``yes`` and ``no`` are the answer words; their first token is read."""

    def __init__(self, model: LanguageModel, template: str = TEMPLATE, *, yes: str = " Yes", no: str = " No",
                 chat: bool = False, batch_rows: int = 256):
        super().__init__()
        missing = [slot for slot in ("{question}", "{steps}") if slot not in template]
        if missing:
            raise ValueError(f"the judge template needs the slots {missing} (it has {template!r})")
        self.model, self.template, self.chat, self.batch_rows = model, template, chat, batch_rows
        ids = [model.encode(w) for w in (yes, no)]
        if not all(ids) or ids[0][0] == ids[1][0]:
            raise ValueError(f"the judge's answers {yes!r} and {no!r} must start with different tokens")
        self.yes, self.no = ids[0][0], ids[1][0]

    @property
    def name(self) -> str:
        return f"LMJudge({self.model.name})"

    @torch.no_grad()
    def score(self, batch: StepBatch) -> Tensor:
        prompts = [self.model.encode_prompt(self.template.format(question=q, steps="\n".join(s).strip()), chat=self.chat)
                   for q, s in zip(batch.questions, batch.steps, strict=True)]
        calls = [list(range(len(prompts)))]
        if self.model.shares_choice_prefix:  # a question's rows in calls of their own; lone rows together
            by_question: dict[str, list[int]] = {}
            for i, q in enumerate(batch.questions):
                by_question.setdefault(q, []).append(i)
            lone = [i for rows in by_question.values() if len(rows) == 1 for i in rows]
            calls = [rows for rows in by_question.values() if len(rows) > 1] + ([lone] if lone else [])
        out = torch.zeros(len(prompts), dtype=torch.float64)
        for rows in calls:
            for lo in range(0, len(rows), self.batch_rows):
                chunk = rows[lo: lo + self.batch_rows]
                self.lm_tokens += self.model.choice_tokens([prompts[i] for i in chunk])
                lp = self.model.choice_logprobs([prompts[i] for i in chunk], [self.yes, self.no])
                out[chunk] = torch.softmax(lp.double(), -1)[:, 0].cpu()
        return out
