"""Arithmetic with a calculator tool (Hu et al. 2024, §4.4): reasoning as a latent.

A problem is a chain of one-digit operands joined by + and -, "6 - 0 - 4 - 8". The latent
rationale z is a sequence of steps " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6." in which the
language model writes each "a op b =" and a calculator appends the result (limited to the
last two operands, as the paper's ``limit_capability=2``; its tokens are not sampled and
not in log q). Given the question x and its answer y, the target is the posterior over
rationales

    sigma(z | x, y) ∝ p0(z | prompt, x) 1[z ends with a result] p(" The answer is y." | prompt, x, z),

with a few-shot ``prompt`` of worked examples; the rationale stops at ".", right after a
calculator result (the indicator, checked first, also spares the likelihood call on every
other prefix during fine-tuning). A policy trained
on (x, y) pairs is then asked questions alone: its answer is the last calculator result of
its rationale (``answer_of``), and ``accuracy`` counts how often that is y, in distribution
(3–4 operands) and out of it (5 operands).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..learning.rollout import sample_trajectories
from ..learning.tools import Tool
from ..models.base import LanguageModel
from ..models.device import seeded_generator
from ..models.registry import load_model
from ..potentials import FunctionPotential, SuffixLikelihood
from ..target import Target

_STEP = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*=$")
_RESULT = re.compile(r"=\s*(-?\d+)")
_ENDS_WITH_RESULT = re.compile(r"=\s*-?\d+\.$")


@dataclass(frozen=True)
class Problem:
    """operands[0] ops[0] operands[1] ops[1] ... (left to right)."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def question(self) -> str:
        return " ".join(f"{a} {o}" for a, o in zip(self.operands, self.ops)) + f" {self.operands[-1]}"

    @property
    def answer(self) -> int:
        return _partials(self)[-1]

    @property
    def rationale(self) -> str:
        """The worked steps, " a op b = r, r op c = s, ..." ending with "."."""
        steps, acc = [], self.operands[0]
        for o, b, r in zip(self.ops, self.operands[1:], _partials(self)[1:]):
            steps.append(f"{acc} {o} {b} = {r}")
            acc = r
        return " " + ", ".join(steps) + "."


def _partials(p: Problem) -> list[int]:
    out = [p.operands[0]]
    for o, b in zip(p.ops, p.operands[1:]):
        out.append(out[-1] + b if o == "+" else out[-1] - b)
    return out


def problems(n: int, n_operands: int | Sequence[int], seed: int) -> list[Problem]:
    """n distinct random problems with one-digit operands, + and -, and ``n_operands``
    operands (or one of several, uniformly)."""
    rng = random.Random(seed)
    sizes = [n_operands] if isinstance(n_operands, int) else list(n_operands)
    if n > sum(10 ** k * 2 ** (k - 1) for k in sizes):
        raise ValueError(f"there are fewer than {n} distinct problems with {sizes} operands")
    seen: dict[Problem, None] = {}
    while len(seen) < n:
        k = rng.choice(sizes)
        seen.setdefault(Problem(tuple(rng.randrange(10) for _ in range(k)), tuple(rng.choice("+-") for _ in range(k - 1))))
    return list(seen)


SHOTS = problems(3, (3, 4), seed=12345)  # the worked examples of the few-shot prompt


def few_shot_prompt(shots: Sequence[Problem] = SHOTS) -> str:
    return "".join(f"Question: {p.question} = ? Answer:{p.rationale} The answer is {p.answer}.\n" for p in shots)


def calculator(model: LanguageModel) -> Tool:
    """The tool: when the completion's text ends with "a op b =", append " r" (r = a op b)."""

    def tool(completion: list[int]) -> list[int]:
        m = _STEP.search(model.decode(completion))
        if m is None:
            return []
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return model.encode(f" {a + b if op == '+' else a - b}")

    return tool


def answer_of(model: LanguageModel, tokens: Sequence[int]) -> int | None:
    """The last result after "=" in a rationale (the calculator's last output), or None."""
    found = _RESULT.findall(model.decode([t for t in tokens if t >= 0]))
    return int(found[-1]) if found else None


def arithmetic(problem: Problem, model: LanguageModel | None = None, *, shots: Sequence[Problem] = SHOTS,
               max_new_tokens: int | None = None) -> Target:
    """The posterior over rationales of ``problem`` given its answer (module docstring).
    The horizon defaults to the length of the worked rationale plus 8 tokens."""
    model = model or load_model()
    prompt = few_shot_prompt(shots) + f"Question: {problem.question} = ? Answer:"
    horizon = max_new_tokens or len(model.encode(problem.rationale)) + 8
    ends = FunctionPotential(lambda text: 0.0 if _ENDS_WITH_RESULT.search(text) else -math.inf,
                             name="ends with a result")
    return Target(model, prompt, ends * SuffixLikelihood(model, f" The answer is {problem.answer}."),
                  max_new_tokens=horizon, stop=".")


def demonstration(problem: Problem, model: LanguageModel) -> list[int]:
    """The worked rationale's tokens as the calculator would complete them (for SFT)."""
    return model.encode(problem.rationale)


def training_set(model: LanguageModel, *, worked: int = 10, homework: int = 40, seed: int = 0
                 ) -> tuple[list[Target], dict[int, list[list[int]]], Tool]:
    """The paper's training setup in miniature: ``worked + homework`` problems with 3-4
    operands as targets, the first ``worked`` with their worked rationale as demonstrations
    ({target index: [tokens]}, for ``finetune(data=...)``), and the calculator tool."""
    train = problems(worked + homework, (3, 4), seed=seed)
    targets = [arithmetic(q, model) for q in train]
    return targets, {k: [demonstration(q, model)] for k, q in enumerate(train[:worked])}, calculator(model)


def held_out(n: int, n_operands: int | Sequence[int], seed: int, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """n problems none of which is in ``exclude`` or among the prompt's worked examples."""
    seen = set(exclude) | set(SHOTS)
    return [q for q in problems(n + len(seen), n_operands, seed=seed) if q not in seen][:n]


def accuracy(sampler: LanguageModel, items: Sequence[Problem], *, model: LanguageModel, samples: int = 1,
             temperature: float = 0.0, seed: int = 0, horizon_slack: int = 8) -> float:
    """The fraction of rationales whose answer is right: ``samples`` per problem from
    ``sampler`` with the calculator, at ``temperature`` (0: greedy)."""
    generator = seeded_generator(seed, sampler.device)  # on the device it draws from
    tool, right = calculator(model), 0
    for p in items:
        target = arithmetic(p, model, max_new_tokens=len(model.encode(p.rationale)) + horizon_slack)
        rows = sample_trajectories(sampler, target, samples, generator, temperature, tool)
        right += sum(answer_of(model, r) == p.answer for r in rows.tolist())
    return right / (len(items) * samples)
