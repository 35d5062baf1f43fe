"""A rationale Z between a question X and an answer Y, all from language models.

A template with slots ``{x}``, ``{z}`` and ``{y}`` in that order, e.g.

    'Classify this movie review as objective or subjective: "{x}" This review is{z}, so it is {y}.'

cuts the joint into three token blocks: the prefix (everything before ``{z}``, with X
filled in), the middle (between ``{z}`` and ``{y}``) and the label. Then

* the prior p(Z | X) is the base model continuing the prefix: Z is at most ``max_tokens``
  tokens ending at the *stop* token, the middle's first token ("," above), which is part of
  Z and counted in p(Z | X); a Z that reaches ``max_tokens`` without it is truncated
  (the probability of the drawn tokens only, as in ``Target``) and the stop is inserted. Z
  with fewer than ``min_tokens`` tokens before the stop has prior mass but likelihood 0.
* the likelihood is normalised over the label set (as in Hu et al. 2024's M-step):

      p(Y = y | X, Z) = p(y | prefix, Z, middle) / sum_{y'} p(y' | prefix, Z, middle),

  where p(y | ...) is the probability of all of y's tokens under the likelihood model (the
  base, or a LoRA on it after an M-step). The middle's own tokens are common to every label
  and cancel. Whitespace before ``{y}`` belongs to the label's tokens (" objective").
* the posterior p(Z | X, Y) ∝ p(Z | X) p(Y | X, Z) is a pilm ``Target`` with the potential
  ``LabelLikelihood`` (so every sampler and ``pilm.finetune`` work on it), and the posterior
  predictive is p(Y | X) = sum_Z p(Z | X) p(Y | X, Z).
* the *direct* form drops Z and the middle: p(y | prefix) normalised over the labels
  ("This review is objective."), for zero-shot, few-shot and supervised baselines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.base import LanguageModel
from ..potentials.base import Potential, Sequences
from ..target import Target

_SLOT = re.compile(r"\{(\w*)\}")


@dataclass(frozen=True)
class Example:
    """One labelled item: the question text and its answer (one of the label set)."""

    x: str
    y: str


class LatentModel:
    """The template, label set and rationale length of a latent-rationale task, and the
    token blocks they make on ``model``'s tokenizer (see the module docstring)."""

    def __init__(self, model: LanguageModel, template: str, labels: Sequence[str], *,
                 rationale_tokens: tuple[int, int] = (1, 5)):
        slots = _SLOT.findall(template)
        missing = [s for s in ("x", "z", "y") if slots.count(s) != 1]
        if missing or [s for s in slots if s in ("x", "z", "y")] != ["x", "z", "y"]:
            raise ValueError(f"the template needs the slots {{x}}, {{z}} and {{y}} once each and in that order "
                             f"(missing or repeated: {missing or 'none'}; found {slots}): {template!r}")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"give at least two distinct labels, got {list(labels)}")
        lo, hi = rationale_tokens
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"rationale_tokens must be (min, max) with 0 <= min <= max and max >= 1, got {rationale_tokens}")
        self.model, self.template, self.labels = model, template, tuple(labels)
        self.min_tokens, self.max_tokens = lo, hi
        head, rest = template.split("{z}")
        middle, self._tail = rest.split("{y}")
        self._head = head
        space = middle[len(middle.rstrip()):]  # whitespace before {y} belongs to the label
        self.middle_ids = model.encode(middle.rstrip())
        if not self.middle_ids:
            raise ValueError(f"the template needs text between {{z}} and {{y}} (its first token ends Z): {template!r}")
        self.stop_id = self.middle_ids[0]
        self.label_ids = [model.encode(space + label) for label in self.labels]
        if len({tuple(ids) for ids in self.label_ids}) != len(self.labels) or not all(self.label_ids):
            raise ValueError(f"the labels {list(self.labels)} must tokenise to distinct, non-empty token sequences")

    def index(self, y: str) -> int:
        """The position of label ``y`` in the label set (a clear error if it is not in it)."""
        if y not in self.labels:
            raise ValueError(f"label {y!r} is not in the label set {list(self.labels)}")
        return self.labels.index(y)

    def checked(self, data: Sequence[Example]) -> list[Example]:
        """Labelled examples, refused when there are none or a label is not in the set."""
        data = list(data)
        if not data:
            raise ValueError("no labelled examples given")
        for ex in data:
            self.index(ex.y)
        return data

    def items(self, test: Sequence[Example] | Sequence[str]) -> list[Example]:
        """Test items (texts, or examples whose labels, where given, must be in the set)."""
        items = [Example(t, "") if isinstance(t, str) else t for t in test]
        if not items:
            raise ValueError("no test items given")
        for ex in items:
            if ex.y:
                self.index(ex.y)
        return items

    def prefix_ids(self, x: str) -> list[int]:
        """The prompt of the prior: the template up to ``{z}`` with X filled in."""
        return self.model.encode_prompt(self._head.replace("{x}", x))

    def body(self, z: Sequence[int]) -> list[int]:
        """Z's tokens without its stop token."""
        z = [int(t) for t in z if t >= 0]
        return z[:-1] if z and z[-1] == self.stop_id else z

    def context(self, prefix: Sequence[int], z: Sequence[int]) -> list[int]:
        """prefix, Z (without its stop), the middle: what the label is scored after."""
        return list(prefix) + self.body(z) + self.middle_ids

    def render(self, x: str, z: Sequence[int], y: str) -> str:
        """The whole text X Z Y as the template writes it."""
        return self.model.decode(self.context(self.prefix_ids(x), z) + self.label_ids[self.index(y)]) + self._tail

    def prior(self, x: str) -> Target:
        """p(Z | X) as a target (no potential)."""
        return Target(self.model, self.prefix_ids(x), max_new_tokens=self.max_tokens, stop=self.stop_id)

    def posterior(self, example: Example, likelihood: LanguageModel | None = None) -> Target:
        """p(Z | X, Y) ∝ p(Z | X) p(Y | X, Z) as a target, the likelihood from ``likelihood``
        (default: the base model)."""
        return Target(self.model, self.prefix_ids(example.x), LabelLikelihood(self, example.y, likelihood),
                      max_new_tokens=self.max_tokens, stop=self.stop_id)


def label_logprobs(model: LanguageModel, contexts: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]]) -> Tensor:
    """log p(y | context) normalised over the labels, (len(contexts), n_labels), no grad: every
    label's tokens scored after every context by ``model.score``, which runs the prefix all
    contexts share (the prompt of one X, few-shot demonstrations) once. Call it per group of
    contexts that share a long prefix (e.g. the rationales of one X)."""
    n, k = len(contexts), len(label_ids)
    if n == 0:
        return torch.zeros(0, k)
    seqs = [list(c) + list(ids) for c in contexts for ids in label_ids]
    with torch.no_grad():
        raw = model.score(seqs, [len(c) for c in contexts for _ in label_ids]).view(n, k)
    return torch.log_softmax(raw.double(), -1).float()


def label_logprobs_grad(model: LanguageModel, context: Sequence[int], label_ids: Sequence[Sequence[int]]) -> Tensor:
    """log p(y | context) normalised over the labels, (n_labels,), with gradients through
    ``model`` (one teacher-forced forward, a row per label)."""
    width = max(map(len, label_ids))
    tokens = torch.tensor([list(ids) + [-1] * (width - len(ids)) for ids in label_ids])
    lp = model.prefix_logprobs(context, tokens)[:, :width]  # (k, width, V)
    tokens = tokens.to(lp.device)
    tok = lp.gather(2, tokens.clamp(min=0)[..., None]).squeeze(2).masked_fill(tokens < 0, 0.0)
    return torch.log_softmax(tok.sum(1), 0)


class LabelLikelihood(Potential):
    """phi(Z) = p(Y = y | X, Z), normalised over the label set (see the module docstring),
    0 for a Z shorter than the latent model's ``min_tokens``. X is the prompt the target gives
    (the template's prefix). ``likelihood``: the model that scores labels (default: the base)."""

    def __init__(self, latent: LatentModel, y: str, likelihood: LanguageModel | None = None):
        self.latent, self.y, self.which = latent, y, latent.index(y)
        self.likelihood = likelihood or latent.model

    @property
    def name(self) -> str:
        return f"label({self.y!r} | {self.likelihood.name})"

    def log_phi(self, seqs: Sequences) -> Tensor:
        lat = self.latent
        contexts = [lat.context(seqs.prompt, z) for z in seqs.tokens]
        out = label_logprobs(self.likelihood, contexts, lat.label_ids)[:, self.which]
        short = torch.tensor([len(lat.body(z)) < lat.min_tokens for z in seqs.tokens], dtype=torch.bool)
        return out.masked_fill(short, -torch.inf)


def all_bodies(vocab: int, stop: int, length: int) -> list[list[int]]:
    """Every rationale body of at most ``length`` tokens over a ``vocab``-token table (no stop token)."""
    level: list[list[int]] = [[]]
    out: list[list[int]] = [[]]
    for _ in range(length):
        level = [b + [v] for b in level for v in range(vocab) if v != stop]
        out += level
    return out
