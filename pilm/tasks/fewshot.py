"""Worked examples as a prompt: one document for a base model, turns of a chat for an instruct one."""

from __future__ import annotations

from collections.abc import Iterable


def chat_turns(shots: Iterable[tuple[str, str]], question: str) -> list[dict]:
    """Each (question, worked answer) as a user turn and the assistant's reply, then the
    question as the last user turn (``Target(..., chat=True)`` applies the model's template)."""
    earlier = [t for q, a in shots for t in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return [*earlier, {"role": "user", "content": question}]
