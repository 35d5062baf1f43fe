"""Resampling schemes, one signature: ``scheme(log_weights, n, generator) -> indices``.

Each returns ``n`` ancestor indices whose offspring counts have expectation
``n * normalised weights`` (the unbiasedness SMC's Z-hat needs). Multinomial draws them
i.i.d.; stratified and systematic invert the CDF at one uniform per stratum / one shared
uniform (lower variance; systematic is the usual default); residual keeps floor(n w)
copies deterministically and draws the rest multinomially. *Whether* to resample is
decided elsewhere (``ess``). Weights and indices live on the CPU; the random numbers come
from ``generator`` on whatever device it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Scheme = Callable[[Tensor, int, torch.Generator], Tensor]


def normalized(log_weights: Tensor) -> Tensor:
    """Normalised weights in float64 (all -inf is the caller's error to report)."""
    return torch.softmax(log_weights.double(), dim=0)


def ess(log_weights: Tensor) -> float:
    """Effective sample size 1 / sum_k wbar_k^2 of the normalised weights."""
    lw = log_weights.double()
    return math.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))


def _invert_cdf(w: Tensor, u: Tensor) -> Tensor:
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0  # float rounding can leave the total just below 1
    # smallest i with cdf[i] > u: zero-weight particles are never picked
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(w) - 1)


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu()


def _categorical(w: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return torch.multinomial(w.to(generator.device), n, replacement=True, generator=generator).cpu()


def multinomial(log_weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return _categorical(normalized(log_weights), n, generator)


def stratified(log_weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    u = (torch.arange(n, dtype=torch.float64) + _uniform(n, generator)) / n
    return _invert_cdf(normalized(log_weights), u)


def systematic(log_weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    u = (torch.arange(n, dtype=torch.float64) + _uniform(1, generator)) / n
    return _invert_cdf(normalized(log_weights), u)


def residual(log_weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    w = normalized(log_weights)
    counts = torch.floor(n * w).long()
    kept = torch.repeat_interleave(torch.arange(len(w)), counts)
    rest = n - len(kept)
    if rest == 0:
        return kept
    leftover = n * w - counts
    drawn = _categorical(leftover / leftover.sum(), rest, generator)
    return torch.cat([kept, drawn])


SCHEMES: dict[str, Scheme] = {
    "multinomial": multinomial,
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
}


def get_scheme(name: str | Scheme) -> Scheme:
    if callable(name):
        return name
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown resampling scheme {name!r}; known: {', '.join(SCHEMES)}") from None
