"""One token per row of a categorical distribution, drawn by inversion.

Row i's index is the first v whose cumulative probability, summed in float64, exceeds u_i
times the row's total:

    v_i = min { v : sum_{w <= v} p_i(w) > u_i * sum_w p_i(w) },    u_i ~ U[0, 1),

so P(v_i = v) = p_i(v) / sum_w p_i(w) up to float64 rounding of the sums. On the CPU, whose
cumulative sum runs in order, an index of zero probability is never drawn (its sum equals its
predecessor's); an accelerator's parallel scan may give it a step of one rounding error
(probability about 2^-52). It is the law ``torch.multinomial(p, 1)`` draws from, at one
uniform per row instead of V exponentials: on a 2-core CPU at 64 rows x 49,152 tokens, about
5 ms against multinomial's 70 ms, which was a quarter of a decode step of the embedded model
(``pilm bench``). The numbers drawn differ from multinomial's for the same seed.

A row without positive finite mass (every log-probability -inf, or NaN) draws an index in
range whose log-probability is -inf or NaN: the caller, which reads it anyway, reports it
(the engine does, after the one transfer to the host it makes per step), so an accelerator
never waits for the host here and is never left with a failed device-side assertion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .device import check_device


def uniforms(counts: Sequence[int], generators: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """float64 U[0, 1) numbers on ``device``: ``counts[i]`` of them from ``generators[i]``, in order."""
    parts = [torch.rand(k, generator=_on(g, device), device=device, dtype=torch.float64)
             for k, g in zip(counts, generators, strict=True)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


def categorical(log_p: Tensor, u: Tensor) -> Tensor:
    """Row i's index drawn from exp(log_p[i]) (log-probabilities, normalised or off by a
    modest constant) with the uniform ``u[i]`` (module docstring), a block of rows at a time
    so that the float64 sums of many rows never sit in memory at once."""
    if u.shape != log_p.shape[:1]:
        raise ValueError(f"one uniform per row: {tuple(u.shape)} uniforms for {len(log_p)} rows")
    rows = max(1, _block(log_p.device) // max(log_p.shape[-1], 1))
    if len(log_p) <= rows:
        return _invert(log_p, u)
    return torch.cat([_invert(log_p[i:i + rows], u[i:i + rows]) for i in range(0, len(log_p), rows)])


def _block(device: torch.device) -> int:
    """Elements of the float64 cumulative sums made at once. On the CPU 2^19 (4 MiB, 10 rows of a
    49k vocabulary): 64 rows took 4.7 ms in such blocks against 7.0 ms in one, the blocks staying
    in cache. On an accelerator 2^26 (512 MiB): a few blocks, since each costs kernel launches."""
    return 2**19 if device.type == "cpu" else 2**26


def _invert(log_p: Tensor, u: Tensor) -> Tensor:
    cumulative = log_p.exp().cumsum(-1, dtype=torch.float64)
    total = cumulative[:, -1:].contiguous()
    picked = torch.searchsorted(cumulative, u.unsqueeze(1) * total, right=True)
    last = torch.searchsorted(cumulative, total)  # the last index of positive mass, should u * total round up to it
    return torch.minimum(picked, last).clamp_(max=log_p.shape[-1] - 1).squeeze(1)


def _on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator, if it lives on ``device`` (torch's own error does not say which)."""
    if generator.device != device:  # cheap test first: this runs for every draw
        check_device("the generator", generator.device, device)
    return generator
