"""Training curves of the learners (matplotlib, written to files; no display needed)."""

from __future__ import annotations

from pathlib import Path

from ..extras import pyplot

LABELS = {
    "loss": "loss",
    "ess": "ESS of the training batch (SIS)",
    "log_r": "mean log R of the batch",
    "diversity": "distinct sequences / batch",
}


def plot_training(histories: list[dict] | dict[str, list[dict]], path: str | Path, *, title: str = "training",
                  metrics: tuple[str, ...] = ("loss", "ess")) -> Path:
    """One panel per metric over training steps (loss on a symlog axis: objectives differ in
    scale); ``histories`` is one run's history or several, by name. Twist training logs
    loss and ess; fine-tuning logs loss, log_r and diversity."""
    plt = pyplot()

    runs = histories if isinstance(histories, dict) else {"": histories}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics, strict=True):
        for name, history in runs.items():
            ax.plot([h["step"] for h in history], [h[metric] for h in history], lw=1, label=name or None)
        ax.set(xlabel="step", ylabel=LABELS.get(metric, metric), title=f"{title}: {metric}")
        if metric == "loss":
            ax.set_yscale("symlog")
    if len(runs) > 1:
        axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
