"""Bidirectional bounds on log Z and KL in both directions, for any sampler (Zhao et al. 2024, Twisted SMC;
the IWAE bounds of Burda et al. 2016 and the SMC / conditional-SMC bounds).

For a sampler q (the base model, a twisted proposal, or another language model) and K
particles, over independent seeds:

    lower  E[log Z-hat]                         <= log Z   (SIS/IWAE, or SMC resampling every step)
    upper  E[log Z-hat_c(s*)], s* ~ sigma         >= log Z   (the same run conditioned on an exact
                                                           sample kept as particle 0: IWAE-UB
                                                           without resampling, CSMC-UB with it)

Both tighten as K grows and meet at log Z. With f_q = E_q[log sigma~/q] (the ELBO) and
g_q = E_sigma[log sigma~/q] (the EUBO), and log Z_mid the midpoint of the tightest bound pair
at the largest K:

    KL(q || sigma) ≈ log Z_mid - f_q   in [LB - f_q, UB - f_q]
    KL(sigma || q) ≈ g_q - log Z_mid   in [g_q - UB, g_q - LB]

Exact samples of sigma come from enumeration (tabular), rejection (0 <= phi <= 1), or, for
infilling, the joint: then each seed conditions on its own sampled suffix and the bounds
are on E_c[log Z(c)].
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import BoundsConfig
from ..enumeration import sequence_bound
from ..errors import RejectionBudgetError
from ..extras import pyplot
from ..inference.joint import joint_samples
from ..inference.rejection import rejection_sample
from ..inference.result import SMCResult
from ..inference.smc import run_smc
from ..models.base import LanguageModel
from ..models.device import seeded_generator
from ..potentials import SuffixLikelihood
from ..proposals import ModelProposal, as_proposal
from ..target import Target
from ..twists.base import TwistFunction
from ..twists.head import condition_ids
from . import exact
from .metrics import t_interval

Sampler = None | TwistFunction | LanguageModel | ModelProposal
METHODS = {"sis": 0.0, "smc": 1.0}  # ess_threshold: never / every step (as in the paper)


@dataclass
class BoundsReport:
    """``rows``: one dict per (sampler, n_particles, method) with lower, upper (means over
    seeds) and their 95% Student-t half-widths (``metrics.t_interval``), gap and its 95%
    half-width ``gap_ci`` (from the
    per-seed gaps ``gaps``: every sampler meets the same targets and exact samples seed by
    seed, so gaps pair, also across calls with the same ``seed``), the sampler's KL
    estimates with guaranteed intervals, and SMC diagnostics (final ESS, distinct ancestors
    at the end)."""

    rows: list[dict]
    log_z_exact: float | None = None
    info: dict = field(default_factory=dict)

    def table(self) -> str:
        head = (f"{'sampler':>10} {'K':>5} {'method':>6} {'lower':>18} {'upper':>18} {'gap':>16} "
                f"{'KL(q||σ)':>9} {'KL(σ||q)':>9}")
        lines = [head, "-" * len(head)]
        if self.info.get("exact_samples") == "joint":
            lines.insert(0, "bounds on E_c[log Z(c)] over endings c sampled from the model (exact_samples='joint'), "
                            "not on one target's log Z")
        for r in self.rows:
            lines.append(
                f"{r['sampler']:>10} {r['n_particles']:>5} {r['method']:>6} "
                f"{r['lower']:>10.3f} ±{r['lower_ci']:<6.3f} {r['upper']:>10.3f} ±{r['upper_ci']:<6.3f} "
                f"{r['gap']:>8.3f} ±{r['gap_ci']:<6.3f} {r['kl_q_sigma']:>9.3f} {r['kl_sigma_q']:>9.3f}"
            )
        if self.log_z_exact is not None:
            lines.append(f"exact log Z = {self.log_z_exact:.4f}")
        return "\n".join(lines)

    def to_jsonl(self, path: str | Path, *, append: bool = True) -> None:
        """Add the report's rows to ``path``, one JSON line each (``append=False`` starts afresh)."""
        with open(path, "a" if append else "w") as f:
            f.writelines(json.dumps({**r, "log_z_exact": self.log_z_exact}) + "\n" for r in self.rows)

    def plot(self, path: str | Path, *, title: str = "bounds on log Z") -> Path:
        """Bounds vs K (log scale), a colour per sampler, LB solid, UB dashed, a marker per method."""
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6.8, 4.2))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        samplers = list(dict.fromkeys(r["sampler"] for r in self.rows))
        for i, name in enumerate(samplers):
            for method, marker in (("sis", "o"), ("smc", "s")):
                rows = [r for r in self.rows if r["sampler"] == name and r["method"] == method]
                if not rows:
                    continue
                k = [r["n_particles"] for r in rows]
                c = colours[i % len(colours)]
                ax.errorbar(k, [r["lower"] for r in rows], yerr=[r["lower_ci"] for r in rows], color=c, marker=marker,
                            ms=4, lw=1.3, capsize=2, label=f"{name} {method.upper()}")
                ax.errorbar(k, [r["upper"] for r in rows], yerr=[r["upper_ci"] for r in rows], color=c, marker=marker,
                            ms=4, lw=1.3, ls="--", capsize=2)
        if self.log_z_exact is not None:
            ax.axhline(self.log_z_exact, color="black", lw=0.8, ls=":", label="exact log Z")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="number of particles K", ylabel="log Z bound (LB solid, UB dashed)", title=title)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


AUTO_ENUMERATION = 200_000
"""The most completions ``exact_samples='auto'`` enumerates (its bound is known before any forward)."""


def exact_sigma_samples(
    target: Target, n: int, how: str = "auto", *, seed: int = 0, max_draws: int = 100_000
) -> list[tuple[Target, list[int]]]:
    """n pairs (target_i, s*_i) with s*_i an exact sample of target_i's sigma.

    ``"enumerate"``: from enumeration (target_i = target). ``"rejection"``: s ~ p0 accepted
    with probability phi (needs phi <= 1); refused up front when a pilot run predicts more
    than ``max_draws`` draws. ``"joint"`` (infilling): sample prompt + middle + suffix from p0;
    target_i conditions on the sampled suffix. ``"auto"`` picks joint for a suffix potential,
    enumeration when it fits, else rejection.
    """
    how = resolve_exact_samples(target, how)
    if how == "enumerate":
        return [(target, list(s)) for s in exact.sample(target, n, seed=seed)]
    if how == "rejection":
        pilot = run_smc(target, 256, seeded_generator(seed + 1, target.model.device), ess_threshold=0.0,
                        use_prefix=False, on_extinction="return")
        rate = float(torch.tensor(pilot.log_weights).clamp(max=0).exp().mean())
        if rate <= 0 or n / rate > max_draws:
            raise RejectionBudgetError(
                f"exact samples by rejection would need about {n / rate if rate > 0 else math.inf:,.0f} draws "
                f"(acceptance rate {rate:.2e} in a 256-draw pilot) for {n} samples, over max_draws={max_draws:,}: "
                "use exact_samples='joint' for infilling, or a smaller target"
            )
        batch = int(min(max(64, n / rate), 512))  # the pilot's estimate of the draws, in as few decodes as fit
        res = rejection_sample(target, n, seed=seed, max_draws=max_draws, batch_size=batch)
        return [(target, list(s)) for s in res.tokens]
    if how == "joint":
        suffix = condition_ids(target)
        if suffix is None:
            raise ValueError("exact_samples='joint' needs an infilling target (a SuffixLikelihood potential)")
        pairs = joint_samples(target.model, target.prompt_ids, max_new_tokens=target.max_new_tokens,
                              suffix_tokens=len(suffix), n=n, seed=seed)
        return [(Target(target.model, target.prompt_ids, SuffixLikelihood(target.model, c),
                        max_new_tokens=target.max_new_tokens), s) for s, c in pairs]
    raise ValueError(f"exact_samples must be 'auto', 'enumerate', 'rejection' or 'joint', got {how!r}")


def resolve_exact_samples(target: Target, how: str) -> str:
    """``how``, with ``"auto"`` resolved before anything runs: joint for a suffix potential,
    enumeration when at most ``AUTO_ENUMERATION`` completions can exist (sum_t V^t: tiny
    vocabularies and horizons, never a real tokenizer's beyond one token), else rejection."""
    if how != "auto":
        return how
    if condition_ids(target) is not None:
        return "joint"
    return "enumerate" if sequence_bound(target) <= AUTO_ENUMERATION else "rejection"


def distinct_ancestors(result: SMCResult) -> int:
    """How many step-1 particles the final particles descend from (path degeneracy)."""
    lineage = list(range(result.n_particles))
    for parents in reversed(result.ancestry):
        lineage = [parents[k] for k in lineage]
    return len(set(lineage))


def bounds(
    target: Target,
    samplers: Mapping[str, Sampler] | None = None,
    n_particles: Sequence[int] = BoundsConfig.n_particles,
    *,
    exact_samples: str | Sequence[tuple[Target, Sequence[int]]] = BoundsConfig.exact_samples,
    seeds: int = BoundsConfig.seeds,
    methods: Sequence[str] = BoundsConfig.methods,
    seed: int = BoundsConfig.seed,
    max_draws: int = BoundsConfig.max_draws,
    use_prefix: bool = False,
    progress: bool = True,
) -> BoundsReport:
    """Lower and upper bounds on log Z for each sampler, K and method, with KL estimates
    in both directions (see the module docstring). ``samplers`` maps names to ``None``
    (the base model), a twist, or a language model (scored on the target's tokens).
    ``exact_samples``: how to draw them (see ``exact_sigma_samples``), or the (target, sample)
    pairs it returned, one per seed: bounds computed in several calls then share them (rejection
    at a small Z is costly) and their per-seed gaps pair. ``use_prefix``: the samplers also
    weigh by the potential's prefix score (e.g. ``SuffixLikelihood(lookahead=alpha)``'s
    look-ahead); by default a sampler is its proposal alone."""
    from tqdm.auto import tqdm

    samplers = dict(samplers or {"base": None})
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: sis, smc")
    ks = sorted(set(int(k) for k in n_particles))
    pairs: Sequence[tuple[Target, Sequence[int]]]
    if isinstance(exact_samples, str):
        exact_samples = resolve_exact_samples(target, exact_samples)
        pairs = exact_sigma_samples(target, seeds, exact_samples, seed=seed, max_draws=max_draws)
    else:
        pairs, seeds = list(exact_samples), len(exact_samples)
        exact_samples = "joint" if any(t is not target for t, _ in pairs) else "given"
    g = seeded_generator(seed, target.model.device)  # on the device it draws from
    cells: dict[tuple, dict[str, list[float]]] = {}
    elbo: dict[str, list[float]] = {name: [] for name in samplers}
    eubo: dict[str, list[float]] = {name: [] for name in samplers}
    work = [(name, s, k, m) for name, s in samplers.items() for k in ks for m in methods]
    bar = tqdm(total=len(work) * len(pairs), desc="bounds", disable=not progress)
    for target_i, reference in pairs:
        for name, sampler, k, method in work:
            proposal, threshold = as_proposal(sampler), METHODS[method]
            lower = run_smc(target_i, k, g, proposal=proposal, ess_threshold=threshold, resample="multinomial",
                            use_prefix=use_prefix, on_extinction="return")
            upper = run_smc(target_i, k, g, reference=reference, proposal=proposal, ess_threshold=threshold,
                            resample="multinomial", use_prefix=use_prefix, on_extinction="return")
            cell = cells.setdefault((name, k, method), {"lower": [], "upper": [], "ess": [], "ancestors": []})
            cell["lower"].append(lower.log_z)
            cell["upper"].append(upper.log_z)
            cell["ess"].append(lower.ess[-1] if lower.ess else math.nan)
            cell["ancestors"].append(distinct_ancestors(lower))
            if method == "sis" and k == ks[-1]:
                elbo[name].extend(lower.log_weights)  # log sigma~/q of samples from q
            if method == "sis" and k == ks[0]:
                eubo[name].append(upper.log_weights[0])  # log sigma~/q of the exact sample
            bar.update()
    bar.close()
    rows = []
    for (name, k, method), c in cells.items():
        lo, lo_ci = t_interval(c["lower"])
        up, up_ci = t_interval(c["upper"])
        gaps = [u - lo_i for u, lo_i in zip(c["upper"], c["lower"])]
        _, gap_ci = t_interval(gaps)  # paired: the same target and exact sample per seed
        rows.append({"sampler": name, "n_particles": k, "method": method, "lower": lo, "lower_ci": lo_ci,
                     "upper": up, "upper_ci": up_ci, "gap": up - lo, "gap_ci": gap_ci, "gaps": gaps,
                     "ess_final": statistics.fmean(c["ess"]),
                     "distinct_ancestors": statistics.fmean(c["ancestors"]), "seeds": len(c["lower"])})
    finite = [r for r in rows if r["n_particles"] == ks[-1] and math.isfinite(r["gap"])]
    best = min(finite, key=lambda r: r["gap"]) if finite else None
    log_z_mid = (best["lower"] + best["upper"]) / 2 if best else math.nan
    for r in rows:
        f_q = statistics.fmean(elbo[r["sampler"]]) if elbo[r["sampler"]] else math.nan
        g_q = statistics.fmean(eubo[r["sampler"]]) if eubo[r["sampler"]] else math.nan
        lo, up = (best["lower"], best["upper"]) if best else (math.nan, math.nan)
        r.update({"log_z_mid": log_z_mid, "elbo": f_q, "eubo": g_q,
                  "kl_q_sigma": log_z_mid - f_q, "kl_q_sigma_interval": [lo - f_q, up - f_q],
                  "kl_sigma_q": g_q - log_z_mid, "kl_sigma_q_interval": [g_q - up, g_q - lo]})
    rows.sort(key=lambda r: (list(samplers).index(r["sampler"]), r["method"], r["n_particles"]))
    log_z_exact = exact.log_z(target, max_sequences=AUTO_ENUMERATION) if exact_samples == "enumerate" else None
    for r in rows:
        r["dtype"], r["device"] = target.model.dtype_name, str(target.model.device)
    return BoundsReport(rows, log_z_exact, {"seeds": seeds, "exact_samples": exact_samples, "methods": list(methods)})
