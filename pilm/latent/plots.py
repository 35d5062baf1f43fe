"""The curves of variational EM: bounds on log p(Y | X) and test accuracy per E / M step."""

from __future__ import annotations

from pathlib import Path

from ..extras import pyplot


def plot_em(history: list[dict], path: str | Path) -> Path:
    """ELBO and IWAE bound (left) and test accuracy by hard and soft vote (right) after each
    E-step and M-step of ``LatentReasoner.em``'s history."""
    plt = pyplot()

    ticks = [f"{h['step']}{h['round']}" for h in history]
    x = range(len(history))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, name in (("elbo", "ELBO"), ("iwae", "IWAE bound")):
        left.plot(x, [h[key] for h in history], marker="o", label=name)
    left.set(ylabel="nats per labelled pair", title="bounds on log p(Y | X), training labels")
    for key in ("accuracy_hard", "accuracy_soft"):
        if all(key in h for h in history):
            right.plot(x, [100 * h[key] for h in history], marker="o", label=key.split("_")[1] + " vote")
    right.set(ylabel="test accuracy (%)", title="posterior predictive")
    for ax in (left, right):
        ax.set_xticks(list(x), ticks)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
