"""Step-tag PRMs from the transformers hub (Math-Shepherd style), where a network exists.

A step-tag PRM is a causal LM fine-tuned to predict a "good" or "bad" token right after a
tag that closes each step: Math-Shepherd (``peiyi9979/math-shepherd-mistral-7b-prm``) tags
steps with " ки" and reads "+" against "-" (Wang et al. 2024). The score of the latest step is
p(good) / (p(good) + p(bad)) at the last tag, which is ``LMJudge``'s read-out on the text
"question step_1 tag\\n step_2 tag\\n ...". Classifier-head PRMs (Qwen2.5-Math-PRM) ship their
model class as remote code and are not supported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import LanguageModel
from ..models.registry import load_model
from .base import StepBatch
from .judge import LMJudge


class StepTagPRM(LMJudge):
    """A causal-LM PRM that reads ``good`` against ``bad`` after ``step_tag`` (module
    docstring); ``model`` is a pilm model (``pilm.load_model(hub_id)`` loads any transformers
    causal LM by id or folder)."""

    def __init__(self, model: LanguageModel, *, step_tag: str = " ки", good: str = "+", bad: str = "-",
                 batch_rows: int = 64):
        super().__init__(model, "{question} {steps}", yes=good, no=bad, batch_rows=batch_rows)
        self.step_tag = step_tag

    @classmethod
    def from_pretrained(cls, name: str, **kwargs) -> StepTagPRM:
        """Load the PRM by hub id or local folder (needs a network for a hub id)."""
        return cls(load_model(name), **kwargs)

    @property
    def name(self) -> str:
        return f"StepTagPRM({self.model.name})"

    @torch.no_grad()
    def score(self, batch: StepBatch) -> Tensor:
        tagged = [["".join(f"{s.strip()}{self.step_tag}\n" for s in steps).rstrip("\n")] for steps in batch.steps]
        return super().score(StepBatch(batch.questions, batch.prompts, tagged, batch.tokens))
