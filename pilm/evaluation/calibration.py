"""Does a twist know the future? log psi_t against Monte Carlo estimates of the optimal twist.

The optimal twist is psi*_t(s_1:t) = E_p0[phi(s) | s_1:t] (Zhao et al. 2024), defined up to one
constant per target. For held-out prefixes s_1:t, ``twist_calibration`` estimates
log psi*_t by R rollouts of the rest of the sequence from p0 (log of the mean phi: unbiased
for psi*, biased low in log by about Var/2 of the mean) and reads the twist's log psi_t at
the same prefix. A twist that pays off ranks prefixes as psi* does (high correlation at
each t) on the right scale (slope of log psi* on log psi near 1).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from ..inference.smc import run_smc
from ..models.device import seeded_generator
from ..potentials.likelihood import SuffixLikelihood, suffix_of
from ..proposals import log_mean_exp
from ..target import Target
from ..twists.base import TwistFunction


def twist_calibration(
    pairs: Sequence[tuple[Target, Sequence[int]]],
    twist: TwistFunction,
    positions: Sequence[int],
    *,
    rollouts: int = 32,
    seed: int = 0,
) -> dict:
    """Rows (one per pair and position t <= len(s) with no EOS before t: ``pair``, ``t``)
    with ``log_psi`` (the twist at s_1:t) and ``log_mc`` (log mean phi over ``rollouts`` p0 completions of
    s_1:t, phi scored on the whole sequence); and per t the Pearson correlation and the
    least-squares slope of log_mc on log_psi (``summary``), and the same for the increments
    between consecutive positions of one pair (``summary["increments"]``). ``pairs``: (target,
    sequence), e.g. ``exact_sigma_samples`` or base-model samples; a conditional twist reads each
    target's condition. Batched: one forward for every prefix's twist value, one decode for
    every prefix's rollouts; the targets share one model."""
    cells = [(i, target, list(seq)[:t]) for i, (target, seq) in enumerate(pairs) for t in positions
             if 1 <= t <= len(seq) and target.model.eos_token_id not in list(seq)[: t - 1]]
    if not cells:
        return {"rows": [], "summary": calibration_summary([])}
    model = cells[0][1].model
    # The twist at every prefix in one forward (prefixes as ExactTwist reads them, one condition per row).
    with torch.no_grad():
        hidden = model.start_many([list(tg.prompt_ids) + p[:-1] for _, tg, p in cells], 1).hidden
        conditions = [twist.condition_for(tg) for _, tg, _ in cells]
        condition = None if conditions[0] is None else torch.stack(cast("list[Tensor]", conditions))  # all or none
        log_psi = twist.log_psi_at([tuple(p[:-1]) for _, _, p in cells], hidden,
                                   torch.tensor([p[-1] for _, _, p in cells], device=hidden.device), condition).tolist()
    # Every unfinished prefix's rollouts in one batched decode.
    open_cells = [c for c in cells if not c[1].is_complete(c[2])]
    rests = [Target(model, list(tg.prompt_ids) + p, max_new_tokens=tg.max_new_tokens - len(p), stop=tg.stop)
             for _, tg, p in open_cells]
    g = seeded_generator(seed, model.device)  # on the device it draws from
    runs = run_smc(rests, rollouts, g, ess_threshold=0.0, use_prefix=False) if rests else []
    continuations = {id(c): r.tokens for c, r in zip(open_cells, runs)}
    rows = []
    for cell, value in zip(cells, log_psi):
        i, target, prefix = cell
        completed = [prefix + list(c) for c in continuations.get(id(cell), [[]])]
        log_phi = target.log_potential(completed).double()
        log_mc = float(log_mean_exp(log_phi))
        rows.append({"pair": i, "t": len(prefix), "log_psi": value, "log_mc": log_mc})
    return {"rows": rows, "summary": calibration_summary(rows)}


def calibration_summary(rows: list[dict]) -> dict:
    """Per position t, and for the increments between consecutive positions of one pair (the
    twist's constant per target cancels there: it matters when every pair has its own target,
    e.g. its own infilling ending), the fit of log_mc on log_psi."""
    summary: dict = {}
    for t in sorted({r["t"] for r in rows}):
        at = [r for r in rows if r["t"] == t]
        summary[t] = _fit([r["log_psi"] for r in at], [r["log_mc"] for r in at])
    steps = [(a, b) for a, b in zip(rows, rows[1:]) if a["pair"] == b["pair"]]
    summary["increments"] = _fit([b["log_psi"] - a["log_psi"] for a, b in steps],
                                 [b["log_mc"] - a["log_mc"] for a, b in steps])
    return summary


def _fit(x: list[float], y: list[float]) -> dict:
    """Pearson correlation and least-squares slope of y on x, with both spreads (NaN where undefined)."""
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else math.nan  # noqa: E731
    out = {"n": len(x), "corr": math.nan, "slope": math.nan, "sd_log_mc": sd(y), "sd_log_psi": sd(x)}
    if len(x) > 2 and statistics.pstdev(x) > 0 and statistics.pstdev(y) > 0 and all(map(math.isfinite, y)):
        out.update(corr=statistics.correlation(x, y), slope=statistics.covariance(x, y) / statistics.variance(x))
    return out


def fit_lookahead(targets: Sequence[Target], n: int = 16, *, seed: int = 0) -> tuple[float, ...]:
    """Per-step powers (a_1, ..., a_{T-1}) for the look-ahead of the targets' suffix potential,
    ``SuffixLikelihood(model, suffix, lookahead=(a_1, ...))``, fitted on p0's own draws.

    With l_t(s) = log p(ending | x, s_1:t) ("the ending could follow now"), a_t is the
    least-squares slope of l_T(s) = log phi(s) on l_t(s) over ``n`` p0 draws of each target,
    pooled within target (each target's means removed: a target's own ending shifts both),
    clipped to [0, 1]: log psi_t = a_t l_t is then the best linear predictor of log phi from
    l_t, a proxy for the optimal twist log E[phi | s_1:t] (Zhao et al. 2024). Where the
    ending's likelihood right after the prefix says little about it after the whole middle,
    a_t goes to 0 and the twist to bootstrap's. Costs n draws and one scoring forward of
    every draw's every prefix per target; no training."""
    suffixes = [suffix_of(t.potential) for t in targets]
    if not targets or any(s is None for s in suffixes):
        raise ValueError("fit_lookahead needs targets whose potential has a SuffixLikelihood factor")
    runs = run_smc(list(targets), n, seeded_generator(seed, targets[0].model.device), ess_threshold=0.0,
                   use_prefix=False)  # never resampled: p0's own draws
    pairs: dict[int, list[tuple[float, float]]] = {}  # t: (l_t, l_T) with each target's means removed
    for target, suffix, run in zip(targets, suffixes, runs, strict=True):
        draws = [list(s) for s in run.tokens if s]
        prefixes = [s[:t] for s in draws for t in range(1, len(s) + 1)]
        scores = iter(cast("SuffixLikelihood", suffix).log_phi(target.sequences(prefixes)).double().tolist())
        per_t: dict[int, list[tuple[float, float]]] = {}
        for s in draws:
            ell = [next(scores) for _ in s]
            for t in range(1, len(s)):
                per_t.setdefault(t, []).append((ell[t - 1], ell[-1]))
        for t, xy in per_t.items():
            mx, my = statistics.fmean(x for x, _ in xy), statistics.fmean(y for _, y in xy)
            pairs.setdefault(t, []).extend((x - mx, y - my) for x, y in xy)
    powers = []
    for t in range(1, max(2, max(t.max_new_tokens for t in targets))):  # a complete chain is scored by phi itself
        xy = pairs.get(t, [])
        var = sum(x * x for x, _ in xy)
        powers.append(min(1.0, max(0.0, sum(x * y for x, y in xy) / var)) if var > 0 else 0.0)
    return tuple(powers)
