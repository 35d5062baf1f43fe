"""Pictures of runs (matplotlib, written to files; no display needed)."""

from __future__ import annotations

from pathlib import Path

from ..extras import pyplot
from ..inference.result import SMCResult


def plot_ess(result: SMCResult, path: str | Path, *, title: str | None = None) -> Path:
    """ESS after each step's reweighting, with the steps where resampling happened marked."""
    plt = pyplot()

    n = result.n_particles
    steps = range(1, len(result.ess) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, result.ess, marker="o", ms=3, lw=1.5, label="ESS")
    threshold = result.info.get("ess_threshold")
    if threshold:
        ax.axhline(threshold * n, color="grey", ls=":", lw=1, label=f"resampling threshold ({threshold:g}·N)")
    for i, t in enumerate(result.resampled_at):
        ax.axvline(t, color="tab:red", alpha=0.25, lw=1, label="resampled" if i == 0 else None)
    ax.set(xlabel="step (new token)", ylabel="effective sample size", ylim=(0, n * 1.05))
    ax.set_title(title or f"{result.method.upper()}: N={n}, log Ẑ={result.log_z:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
