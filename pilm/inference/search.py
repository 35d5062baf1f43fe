"""Beam search and diverse beam search over tokens, and PRM-guided searches over reasoning
steps (beam search, DVTS): the deterministic baselines.

Token level: beam search and diverse beam search are the deterministic baselines an amortised sampler of
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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.base import LanguageModel, Tokens, decode_step
from ..prm import ProcessReward, as_prm
from ..target import Target
from ..twists.base import TwistFunction
from .batch import seeded_generators
from .boundaries import step_targets
from .chains import run_steps
from .result import StepResult
from .rules import Decision, Rule, View


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
        live: list[list[tuple[tuple[int, ...], float]]] = [[((), 0.0)] for _ in range(groups)]  # per group: (tokens, log p0)
        done: list[list[Hypothesis]] = [[] for _ in range(groups)]
        for t in range(max_new_tokens):
            counts = torch.zeros(state.logprobs.shape[1])
            new_live: list[list[tuple[tuple[int, ...], float]]]
            parents, tokens, new_live, row = [], [], [], 0
            for g in range(groups):
                rows = list(range(row, row + len(live[g])))
                row += len(live[g])
                if not rows:
                    new_live.append([])
                    continue
                # ranked on the host: one transfer per group and step, then Python over the candidates
                scores = torch.tensor([s for _, s in live[g]])[:, None] + state.logprobs[rows[0]:rows[-1] + 1].cpu()
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


class _WidthRule(Rule):
    """A search rule with a width M (beam width, or rows per DVTS subtree)."""

    def __init__(self, width: int):
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"{self.name} width must be a positive integer, got {width!r}")
        self.width = width


class BeamSelection(_WidthRule):
    """PRM beam search over steps (after search-and-learn's ``beam_search``): keep the
    ceil(N / ``width``) best rows by aggregated score, a finished chain once, and share the
    other rows among the unfinished kept ones as evenly as they divide (``width`` copies each
    when ceil(N / ``width``) unfinished ones are kept and ``width`` divides N, more when fewer
    are left), as the reference extends its active beams to N every iteration, so that each
    copy draws its own next step: N chains in flight while any is unfinished. With
    ``filter_duplicates`` (the reference recipe's setting, and the default) an unfinished chain
    is kept once too, ranked by its best row; without it, copies of one unfinished chain may
    fill every kept slot, so a chain that outscores all others gets all N rows. Unlike the
    reference, which sets finished chains aside, finished chains compete for the kept slots."""

    name = "beam"

    def __init__(self, width: int, filter_duplicates: bool = True):
        super().__init__(width)
        self.filter_duplicates = filter_duplicates

    def decide(self, b: View) -> Decision:
        n = len(b.scores)
        ranked, seen, chains = [], set(), b.chains
        for k in sorted(b.alive.nonzero().squeeze(1).tolist(), key=lambda k: -_score(b.scores, k)):
            if self.filter_duplicates or b.finished[k]:  # this chain's best-ranked row only
                if chains[k] in seen:
                    continue
                seen.add(chains[k])
            ranked.append(k)
        kept = ranked[: -(-n // self.width)]
        going = [k for k in kept if not b.finished[k]]
        each, extra = divmod(n - (len(kept) - len(going)), max(1, len(going)))
        copies = {k: each + (i < extra) for i, k in enumerate(going)}
        parents: list[int] = []
        for k in kept:  # in rank order, the copies of a chain side by side
            parents += [k] * copies.get(k, 1)
        alive = torch.zeros(n, dtype=torch.bool)
        alive[: len(parents)] = True
        parents += [parents[0]] * (n - len(parents))
        return Decision(b.log_w.new_zeros(n), b.log_psi, alive, torch.tensor(parents))


class SubtreeSelection(_WidthRule):
    """DVTS (search-and-learn's ``diverse_verifier_tree_search``): the N rows form N / ``width``
    independent subtrees of ``width`` rows; in each, the chain with the highest aggregated
    score is kept and copied to all the subtree's rows (once only, if it is finished)."""

    name = "dvts"

    def decide(self, b: View) -> Decision:
        n = len(b.scores)
        parents, alive = torch.arange(n), b.alive.clone()
        for lo in range(0, n, self.width):
            rows = [k for k in range(lo, min(lo + self.width, n)) if b.alive[k]]
            if not rows:
                continue
            best = max(rows, key=lambda k: _score(b.scores, k))
            parents[lo: lo + self.width] = best
            alive[lo: lo + self.width] = not bool(b.finished[best])
            alive[lo] = True
        return Decision(b.log_w.new_zeros(n), b.log_psi, alive, parents)


def _score(scores, k: int) -> float:
    value = float(scores[k])
    return -math.inf if math.isnan(value) else value


def _search(target, prm, n, rule, *, temperature, aggregation, step, seed, method, progress, settings=None):
    targets, single = step_targets(target, step)
    if not isinstance(n, int) or n < rule.width:
        raise ValueError(f"{method} needs n >= its width ({rule.width}), got {n!r}")
    out = run_steps(targets, n, as_prm(prm), rule, seeded_generators(seed, len(targets), targets[0].model.device),
                    temperature=temperature, aggregation=aggregation, method=method, progress=progress,
                    info={"seed": seed, "width": rule.width, **(settings or {})})
    return out[0] if single else out


def prm_beam_search(target: Target | Sequence[Target], prm: ProcessReward | TwistFunction, n: int, *, width: int = 4,
                    temperature: float = 1.0, aggregation: str = "last", step=None, seed: int = 0,
                    filter_duplicates: bool = True, progress: bool = False) -> StepResult | list[StepResult]:
    """Step-level beam search guided by ``prm`` with ``n`` chains in flight and beam width
    ``width`` (``BeamSelection``): a deterministic search for high-scoring chains, not a
    sampler of any distribution. ``filter_duplicates`` keeps ceil(n / width) distinct chains
    at every boundary (search-and-learn's recipe); False keeps the best rows, copies included.
    Answer with ``.answer("argmax")`` or a vote."""
    return _search(target, prm, n, BeamSelection(width, filter_duplicates), temperature=temperature,
                   aggregation=aggregation, step=step, seed=seed, method="beam", progress=progress,
                   settings={"filter_duplicates": filter_duplicates})


def dvts(target: Target | Sequence[Target], prm: ProcessReward | TwistFunction, n: int, *, width: int = 4,
         temperature: float = 1.0, aggregation: str = "last", step=None, seed: int = 0,
         progress: bool = False) -> StepResult | list[StepResult]:
    """Diverse verifier tree search: n / ``width`` independent greedy-by-PRM subtrees
    (``SubtreeSelection``). Answer with ``.answer("argmax")`` or a vote."""
    return _search(target, prm, n, SubtreeSelection(width), temperature=temperature, aggregation=aggregation,
                   step=step, seed=seed, method="dvts", progress=progress)
