"""Beam search and diverse beam search: the deterministic baselines an amortised sampler of
p0^{1/T} is compared with (Hu et al. 2024, sentence continuation).

Beam search keeps the ``beams`` highest-scoring prefixes under log p0 and returns the best
completed sequences: it approximates the mode, not a distribution. Diverse beam search
(Vijayakumar et al., AAAI 2018) splits the beams into ``groups`` searched in turn at every
step; group g's candidate scores are lowered by ``diversity`` x the number of times earlier
groups chose the same token at this step (Hamming diversity). transformers 5 moved its
group beam search out of the library, so both live here, on pilm's model protocol: all live
beams of all groups advance in one batched forward per step and the KV cache is reindexed,
never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import LanguageModel, Tokens, decode_step


@dataclass(frozen=True)
class Hypothesis:
    """A completion and its log p0 (the stop token included when it ``finished``)."""

    tokens: tuple[int, ...]
    log_p: float
    finished: bool


def beam_search(model: LanguageModel, prompt_ids: Tokens, *, beams: int, max_new_tokens: int,
                stop: int | None = None, groups: int = 1, diversity: float = 0.0) -> list[Hypothesis]:
    """The ``beams`` best completions by log p0 (``beams // groups`` per group), best first
    within each group. A completion ends at ``stop`` (default EOS; ``finished``) or at the
    horizon (not ``finished``, complete all the same, as for a ``Target``); each
    group stops early once it holds ``beams // groups`` finished hypotheses that no live beam
    can beat (log p0 only decreases with length). ``groups > 1`` with ``diversity > 0`` is
    diverse beam search; ``groups = 1`` is plain beam search."""
    if beams < 1 or groups < 1 or beams % groups:
        raise ValueError(f"beams ({beams}) must be a positive multiple of groups ({groups})")
    stop = model.eos_token_id if stop is None else stop
    width = beams // groups
    with torch.no_grad():
        state = model.start(prompt_ids, groups)  # one live row per group to begin with
        live = [[((), 0.0)] for _ in range(groups)]  # per group: (tokens, log p0)
        done: list[list[Hypothesis]] = [[] for _ in range(groups)]
        for t in range(max_new_tokens):
            counts = torch.zeros(state.logprobs.shape[1])
            parents, tokens, new_live, row = [], [], [], 0
            for g in range(groups):
                rows = list(range(row, row + len(live[g])))
                row += len(live[g])
                if not rows:
                    new_live.append([])
                    continue
                scores = torch.tensor([s for _, s in live[g]])[:, None] + state.logprobs[rows]
                ranked = (scores - diversity * counts).flatten().argsort(descending=True)
                kept = []
                for k in ranked.tolist():
                    r, v = divmod(k, scores.shape[1])
                    seq, value = live[g][r][0] + (v,), float(scores[r, v])
                    if v == stop:
                        done[g].append(Hypothesis(seq, value, True))
                    else:
                        kept.append((seq, value))
                        parents.append(rows[r])
                        tokens.append(v)
                    counts[v] += 1
                    if len(kept) == width:
                        break
                done[g] = sorted(done[g], key=lambda h: -h.log_p)[:width]
                if kept and len(done[g]) == width and done[g][-1].log_p >= max(v for _, v in kept):
                    parents, tokens = parents[: len(parents) - len(kept)], tokens[: len(tokens) - len(kept)]
                    kept = []  # this group is settled
                new_live.append(kept)
            live = new_live
            if not parents or t + 1 == max_new_tokens:
                break
            idx = torch.tensor(parents)
            state = decode_step(model, state, idx, torch.tensor(tokens))
    out = []
    for g in range(groups):  # beams alive at the horizon are complete too (pilm's stopping rule)
        pool = done[g] + [Hypothesis(seq, s, False) for seq, s in live[g]]
        out += sorted(pool, key=lambda h: -h.log_p)[:width]
    return out
