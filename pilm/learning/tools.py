"""Tools: tokens a program appends to a trajectory (a calculator, in the arithmetic task of
Hu et al. 2024, §4.4).

A tool is a deterministic function of the completion so far (token ids) returning the
tokens it appends, or none. It is called after every token the policy *draws* (not after
its own tokens), and the policy then continues after them. The appended tokens are part of
the sequence s that sigma scores (p0 and phi see them) but not choices of the policy: they
are left out of log q, and the state right before each of them is not terminable (the
policy cannot stop there). Both masks are recomputed from the tokens by replaying the tool
(``forced_mask``), so stored and demonstrated trajectories need no extra bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Tool = Callable[[list[int]], Sequence[int]]


def tool_output(tool: Tool, completion: list[int], stop: int | None) -> list[int]:
    """The tokens ``tool`` appends after ``completion``; the stop token may not be among
    them (stopping is the policy's choice)."""
    out = [int(t) for t in tool(completion)]
    if stop is not None and stop in out:
        raise ValueError(f"the tool appended the stop token {stop} after {completion}: a tool may not end a "
                         "trajectory; let the policy stop")
    return out


def forced_mask(tokens: Tensor, tool: Tool | None, stop: int | None = None) -> Tensor:
    """(B, T) bool, True where a token was appended by ``tool`` (all False without a tool),
    for -1-padded rows. Raises if a row contradicts the tool (a demonstration that does not
    follow it)."""
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    if tool is None:
        return mask
    for b, row in enumerate(tokens.tolist()):
        pending: list[int] = []
        for t, tok in enumerate(row):
            if tok < 0:
                break
            if pending:
                if tok != pending[0]:
                    raise ValueError(f"row {b} does not follow the tool: token {t} is {tok}, the tool appends "
                                     f"{pending[0]} there")
                mask[b, t] = True
                pending.pop(0)
            elif tok != stop:
                pending = tool_output(tool, row[: t + 1], stop)
    return mask
