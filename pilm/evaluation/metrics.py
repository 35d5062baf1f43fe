"""Scores of a set of samples that need no target density: likelihood and diversity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..learning.replay import edit_distance
from ..target import Target


def likelihood_and_diversity(target: Target, rows: Tensor | Sequence[Sequence[int]]) -> dict:
    """Scores of a set of completions (-1-padded rows) of ``target``'s prompt:
    ``max_log_p`` / ``mean_log_p``: log p0(s | x) (stop token included when present);
    ``distinct``: the fraction of distinct completions; ``pairwise_edit``: the mean token
    edit distance between two of them over the longer length (0 = identical, 1 = disjoint);
    ``finished``: the fraction ending at the stop token."""
    seqs = [tuple(t for t in row if t >= 0) for row in (rows.tolist() if isinstance(rows, Tensor) else rows)]
    with torch.no_grad():
        log_p = target.model.log_prob(target.prompt_ids, [list(s) for s in seqs]).double()
    pairs = [(a, b) for i, a in enumerate(seqs) for b in seqs[i + 1:]]
    edit = [edit_distance(a, b) / max(len(a), len(b), 1) for a, b in pairs]
    return {"max_log_p": float(log_p.max()), "mean_log_p": float(log_p.mean()),
            "distinct": len(set(seqs)) / len(seqs), "pairwise_edit": sum(edit) / max(len(edit), 1),
            "finished": sum(bool(s) and s[-1] == target.stop_token_id for s in seqs) / len(seqs)}
