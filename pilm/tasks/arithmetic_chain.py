"""Step-by-step arithmetic chains: a reasoning task with exact answers and exact step checks.

A problem is a chain of one-digit operands joined by + and -, "6 - 0 + 4 - 8"; the model is
shown three worked examples and writes one step per line, then the answer:

    6 - 0 = 6
    6 + 4 = 10
    10 - 8 = 2
    The answer is 2.

Steps end at "\\n"; a chain is finished by the line "The answer is N." Every step can be
checked exactly (``step_verifier``: the operands follow the question and the result is
right) and so can the answer (``answer_checker``). With 3 to 5 operands, greedy decoding
of the embedded SmolLM2-135M is right on about 15% of problems (40 probed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.base import LanguageModel
from ..models.registry import load_model
from ..potentials import FunctionPotential
from ..prm import ProcessReward, StepBatch
from ..steps import Steps
from ..target import Target
from .fewshot import chat_turns

FINAL = r"The answer is (-?\d+)"
_STEP = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_QUESTION = re.compile(r"^\s*-?\d(\s*[+-]\s*\d)+\s*$")


def _terms(question: str) -> tuple[list[int], list[str]]:
    if not _QUESTION.match(question):
        raise ValueError(f"not an arithmetic chain: {question!r} (expected one-digit operands joined by + and -)")
    tokens = question.split()
    return [int(x) for x in tokens[::2]], tokens[1::2]


def solve(question: str) -> int:
    """The value of the chain, left to right."""
    operands, ops = _terms(question)
    value = operands[0]
    for o, b in zip(ops, operands[1:]):
        value = value + b if o == "+" else value - b
    return value


def solution(question: str) -> str:
    """The worked steps and the answer line, one per line."""
    operands, ops = _terms(question)
    lines, acc = [], operands[0]
    for o, b in zip(ops, operands[1:]):
        r = acc + b if o == "+" else acc - b
        lines.append(f"{acc} {o} {b} = {r}")
        acc = r
    return "\n".join(lines + [f"The answer is {acc}."])


def distinct(operands: tuple[int, int]) -> int:
    """How many distinct problems have between ``operands[0]`` and ``operands[1]`` one-digit
    operands (worked examples excluded)."""
    lo, hi = operands
    if not 2 <= lo <= hi:
        raise ValueError(f"operands must be a range (lo, hi) with 2 <= lo <= hi, got {tuple(operands)}")
    return sum(10 ** k * 2 ** (k - 1) for k in range(lo, hi + 1)) - sum(lo <= len(s.split()) // 2 + 1 <= hi
                                                                         for s in SHOTS)


def problems(n: int, operands: tuple[int, int] = (3, 5), seed: int = 0) -> list[dict]:
    """``n`` distinct problems with between ``operands[0]`` and ``operands[1]`` one-digit
    operands, as {"question", "answer"} (the answer as a string); none is a worked example."""
    lo, hi = operands
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    if n > distinct(operands):
        raise ValueError(f"there are fewer than {n} distinct problems with {lo} to {hi} operands")
    while len(seen) < n:
        k = rng.randint(lo, hi)
        q = " ".join(f"{rng.randrange(10)} {rng.choice('+-')}" for _ in range(k - 1)) + f" {rng.randrange(10)}"
        if q not in SHOTS:
            seen.setdefault(q)
    return [{"question": q, "answer": str(solve(q))} for q in seen]


SHOTS = ("6 - 0 + 4", "5 + 9 - 3 - 2", "9 + 4 - 8")


def prompt(question: str, shots: Sequence[str] = SHOTS) -> str:
    return "".join(f"Question: {s}\n{solution(s)}\n\n" for s in shots) + f"Question: {question}\n"


def turns(question: str, shots: Sequence[str] = SHOTS) -> list[dict]:
    """The worked examples as earlier turns of a chat, then the question: the prompt of an
    instruct model under its chat template."""
    return chat_turns(((f"Question: {s}", solution(s)) for s in shots), f"Question: {question}")


def steps(n_operands: int = 5) -> Steps:
    """Lines as steps; at most one step per operation plus the answer line and one spare."""
    return Steps(delimiter="\n", max_steps=n_operands + 1, max_step_tokens=16, final=FINAL)


def target(model: LanguageModel | None, question: str, *, answer: str | None = None,
           max_new_tokens: int | None = None, chat: bool = False) -> Target:
    """The policy's chains for ``question``: sigma = p_M (no potential), or with ``answer``
    the posterior over chains that state it, sigma ∝ p_M 1[answer is right]. ``chat``: the
    prompt is ``turns(question)`` under the model's chat template."""
    model = model or load_model()
    n_operands = len(_terms(question)[0])
    potential = None
    if answer is not None:
        cut = steps(n_operands)
        potential = FunctionPotential(lambda text: 0.0 if cut.answer(text) == str(answer) else float("-inf"),
                                      name=f"answer is {answer}")
    return Target(model, turns(question) if chat else prompt(question), potential, chat=chat,
                  max_new_tokens=max_new_tokens or 12 * (n_operands + 1), steps=steps(n_operands), question=question)


class StepVerifier(ProcessReward):
    """Exact process reward of arithmetic chains: r = 1 while every step so far is right
    (its first operand is the previous result, or the question's first operand; its operator
    and second operand are the question's next; its result is correct) and the answer line,
    if reached, states the chain's value; r = ``floor`` otherwise (also for a step after the
    last operation that is not the answer line). ``floor=0`` is the exact 0/1 verifier; the
    default 0.01 lets a filter whose every particle slipped keep the least-bad chains (as
    the peers' clipped logits do) instead of going extinct."""

    def __init__(self, floor: float = 0.01):
        super().__init__()
        if not 0 <= floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {floor}")
        self.floor = floor

    def score(self, batch: StepBatch) -> Tensor:
        return torch.tensor([1.0 if chain_is_right(q, s) else self.floor
                             for q, s in zip(batch.questions, batch.steps, strict=True)], dtype=torch.float64)


def chain_is_right(question: str, steps_so_far: Sequence[str]) -> bool:
    """Whether every step so far is a right step of ``question``'s chain (``StepVerifier``)."""
    operands, ops = _terms(question)
    acc = operands[0]
    lines = [s.strip() for s in steps_so_far if s.strip()]
    for i, line in enumerate(lines):
        if i >= len(ops):  # only the answer line may follow the last operation
            return i == len(ops) and len(lines) == i + 1 and re.fullmatch(rf"The answer is {acc}\.?", line) is not None
        m = _STEP.match(line)
        if m is None or (int(m.group(1)), m.group(2), int(m.group(3))) != (acc, ops[i], operands[i + 1]):
            return False
        acc = acc + operands[i + 1] if ops[i] == "+" else acc - operands[i + 1]
        if int(m.group(4)) != acc:
            return False
    return True


def step_verifier(floor: float = 0.01) -> StepVerifier:
    """The exact step verifier (``StepVerifier``)."""
    return StepVerifier(floor)


def answer_checker():
    """``check(question, answer) -> bool``: whether a canonical final answer is the chain's value."""
    def check(question: str, answer: str | None) -> bool:
        return answer is not None and answer == str(solve(question))

    return check
