"""FUDGE: future discriminators (Yang & Klein 2021; a twist-learning baseline in Zhao et al. 2024)."""

from torch import Tensor

from .batch import TwistBatch, log1mexp


def fudge(batch: TwistBatch, base: TwistBatch | None = None) -> Tensor:
    """Binary cross-entropy at every prefix of base-model samples s ~ p0, with the final
    sequence's phi(s) in [0, 1] as a soft label:
    L = -mean_j mean_t [ phi(s^j) log psi_t(s^j_{1:t}) + (1 - phi(s^j)) log(1 - psi_t(s^j_{1:t})) ].
    The minimiser is psi_t = E_{p0}[phi | s_{1:t}] = psi*_t. Needs a twist with a
    log-sigmoid output (psi in (0, 1)) and 0 <= phi <= 1."""
    if base is None:
        raise ValueError("the fudge objective needs base-model samples (base)")
    if (base.log_phi > 1e-6).any():
        raise ValueError("fudge needs 0 <= phi <= 1 (phi is used as a probability label)")
    label = base.log_phi.exp().clamp(0, 1)[:, None]
    log_psi = base.log_psi.clamp(max=0)
    bce = -(label * log_psi + (1 - label) * log1mexp(log_psi))
    return ((bce * base.mask).sum(1) / base.mask.sum(1).clamp(min=1)).mean()
