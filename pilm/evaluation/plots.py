"""Pictures of runs (matplotlib, written to files; no display needed)."""

from __future__ import annotations

from pathlib import Path

from ..inference.result import SMCResult


def plot_ess(result: SMCResult, path: str | Path, *, title: str | None = None) -> Path:
    """ESS after each step's reweighting, with the steps where resampling happened marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def plot_training(histories: list[dict] | dict[str, list[dict]], path: str | Path, *, title: str = "training") -> Path:
    """Loss (symlog: objectives differ in scale) and the ESS of each step's SIS batch over
    training steps; ``histories`` is one run's history or several, by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = histories if isinstance(histories, dict) else {"": histories}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, history in runs.items():
        steps = [h["step"] for h in history]
        a.plot(steps, [h["loss"] for h in history], lw=1, label=name or None)
        b.plot(steps, [h["ess"] for h in history], lw=1, label=name or None)
    a.set(xlabel="step", ylabel="loss", title=f"{title}: loss", yscale="symlog")
    b.set(xlabel="step", ylabel="ESS of the training batch (SIS)", title=f"{title}: proposal quality")
    if len(runs) > 1:
        b.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
