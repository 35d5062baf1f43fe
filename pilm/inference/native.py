"""The particle engine's advance move on a backend that generates natively (a serving engine,
``LanguageModel.generates_steps``): rows reach their boundary a step at a time, not a forward
per token.

Every running row sends one request (``pilm.models.base.StepRequest``): its prompt and tokens
so far, at most as many tokens as its step and horizon have room for, its step's end (the
delimiter's token ids or text) and its target's stop token as stops, and a seed drawn from its
target's generator. What comes back is replayed token by token through the tests the token
engine applies after each draw (the target's stop and horizon, then the boundary's ``ends``),
so pilm's rule, not the engine's stop, decides where a step ends: tokens drawn past it are
dropped (the tokens up to the boundary are still an exact draw of p_M), and a row the engine
stopped short of its boundary sends another request. A reference row (conditional SMC)
replays its reference instead.

The draws are p_M's own, so advancing changes no weight: a backend like this runs exactly the
samplers whose proposal is p_M and whose critic reads no hidden state (``check``); the others
need every token's full-vocabulary log-probs and are refused before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..errors import BackendError
from ..models.base import StepRequest
from ..proposals import BaseProposal
from ..target import Target
from .particles import Particles, Sampler

_SEEDS = 2**63 - 1


def check(model, sampler: Sampler, observed: bool) -> None:
    """Refuse, before any work, what ``model`` cannot run exactly (module docstring)."""
    proposal, why = sampler.proposal, None
    if type(proposal) is not BaseProposal or proposal.temperature != sampler.temperature:
        why = f"its proposal ({type(proposal).__name__}) needs every token's full-vocabulary log-probs"
    elif sampler.critic.reads_hidden:
        why = ("its process reward reads the policy's hidden states, which the engine does not return: give it a "
               "transformers copy of the policy to read them with (pilm.prm.TwistPRM(twist, reader=...)), or use a "
               "process reward that scores step texts (an exact verifier, pilm.prm.LMJudge)")
    elif sampler.rule.reads_model:
        why = f"its rule ({type(sampler.rule).__name__}) runs the model teacher-forced over the vocabulary"
    elif observed:
        why = "an observer of every draw needs each token's full-vocabulary log-probs"
    if why:
        raise BackendError(f"{model.name} generates by requests and this sampler cannot run exactly on it: {why}. "
                           "Run it with backend='hf' (pilm.load_model(name)).")


def advance(model, p: Particles, sampler: Sampler, targets: Sequence[Target], generators: Sequence[torch.Generator],
            references, compute: dict, ends) -> Particles:
    """Every running row drawn to its boundary by requests (module docstring)."""
    boundary, live = sampler.boundary, p.running
    tokens, lengths = p.tokens.clone(), p.lengths.clone()
    waiting = torch.zeros(len(live), dtype=torch.bool)
    while not waiting.all():
        idx = (~waiting).nonzero().squeeze(1)
        rows = live[idx]
        room = torch.minimum(boundary.room(rows, lengths, p.step_start), ends.horizon[rows] - lengths[rows])
        drawn = _draw(model, rows, room, tokens, lengths, sampler, targets, generators, references, compute)
        before = lengths[rows]
        ended = _replay(drawn, rows, tokens, lengths, p.step_start, boundary, ends)
        compute["tokens"] = compute.get("tokens", 0) + int((lengths[rows] - before).sum())  # kept: the chains' tokens
        waiting[idx[ended]] = True
    return replace(p, tokens=tokens, lengths=lengths)


def _draw(model, rows: Tensor, room: Tensor, tokens: Tensor, lengths: Tensor, sampler: Sampler, targets, generators,
          references, compute: dict) -> list[list[int]]:
    """Each row's next stretch of tokens: a reference row's from its reference, the others' from
    one call to the engine."""
    n = len(tokens) // len(targets)
    groups = rows // n
    seeds = torch.zeros(len(rows), dtype=torch.long)
    for g in groups.unique().tolist():  # each target's seeds from its own generator: its draws do not depend on the batch
        mine = groups == g
        seeds[mine] = torch.randint(_SEEDS, (int(mine.sum()),), generator=generators[g if len(generators) > 1 else 0],
                                    device=generators[0].device).cpu()
    out: list[list[int]] = [[] for _ in rows]
    asks, at, heads = [], [], {}
    for i, (row, g, k, r) in enumerate(zip(rows.tolist(), groups.tolist(), lengths[rows].tolist(), room.tolist(),
                                           strict=True)):
        ref = None if references is None else references[g]
        if ref is not None and row == g * n:
            out[i] = list(ref[k: k + r])
            if not out[i]:
                raise ValueError(f"the reference of target {g} ends after {k} tokens, before its chain is finished "
                                 "by its target's steps, stop token or horizon: give a complete chain")
            continue
        if g not in heads:  # per target, once a call: its context and its stops
            stop_ids, stop_texts = sampler.boundary.stop_marks(g)
            stop = targets[g].stop_token_id
            heads[g] = (tuple(targets[g].model.context(targets[g].prompt_ids)),
                        stop_ids if stop is None else (*stop_ids, stop), stop_texts)
        context, stop_ids, stop_texts = heads[g]
        asks.append(StepRequest(context + tuple(tokens[row, :k].tolist()), int(r), sampler.temperature,
                                int(seeds[i]), stop_ids, stop_texts))
        at.append(i)
    for i, ask, got in zip(at, asks, model.generate(asks), strict=True):
        if not got.tokens:
            raise BackendError(f"{model.name} drew no token after {len(ask.context)} tokens: is the row past the "
                               "engine's max_model_len?")
        out[i] = list(got.tokens)
        compute["prompt_tokens"] = compute.get("prompt_tokens", 0) + len(ask.context)
        compute["cached_tokens"] = compute.get("cached_tokens", 0) + got.cached
        compute["drawn_tokens"] = compute.get("drawn_tokens", 0) + len(got.tokens)
    compute["requests"] = compute.get("requests", 0) + len(asks)
    compute["engine_calls"] = compute.get("engine_calls", 0) + 1
    return out


def _replay(drawn: list[list[int]], rows: Tensor, tokens: Tensor, lengths: Tensor, step_start: Tensor, boundary,
            ends) -> Tensor:
    """Append each row's drawn tokens one position at a time, through the finished test and the
    boundary's ``ends``, until its step ends; returns which rows ended their step."""
    ended = torch.zeros(len(rows), dtype=torch.bool)
    counts = torch.tensor([len(d) for d in drawn], dtype=torch.long)
    padded = torch.full((len(rows), int(counts.max()) if len(rows) else 0), -1, dtype=torch.long)
    for i, d in enumerate(drawn):
        padded[i, : len(d)] = torch.tensor(d, dtype=torch.long)
    for j in range(padded.shape[1]):
        at = ((counts > j) & ~ended).nonzero().squeeze(1)
        if not len(at):
            break
        sub, v = rows[at], padded[at, j]
        pos = lengths[sub]
        tokens[sub, pos], lengths[sub] = v, pos + 1
        done = ends.finished(sub, v, pos + 1)
        ended[at] = done | boundary.ends(sub, v, tokens, lengths, step_start, done)
    return ended
