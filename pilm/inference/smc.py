"""Sequential Monte Carlo over token sequences, all particles batched.

Target sigma(s) ∝ p0(s | x) phi(s). With a prefix-aware potential, step t targets
pi_t(s_{1:t}) ∝ p0(s_{1:t}) psi_t(s_{1:t}) (psi_0 = 1, and phi at a particle's last
token). Proposals come from the base model, so the incremental weight of a particle that
draws s_t is

    alpha_t = psi_t(s_{1:t}) / psi_{t-1}(s_{1:t-1})        (continuing)
    alpha_t = phi(s_{1:t})   / psi_{t-1}(s_{1:t-1})        (s_t = EOS or t = T: finished)

and finished particles keep their weight. When the ESS falls below
``ess_threshold * N`` the particles are resampled, the log-mean weight is added to log Z-hat
and the weights reset; at the end log Z-hat += log mean_k w_k. Z-hat is unbiased for Z
(SPECS A.2; adaptive resampling keeps this). ``ess_threshold=0`` never resamples
(sequential importance sampling); ``1.0`` resamples at every step.

One model forward per step for all active particles; after resampling the KV cache is
reindexed (rows copied), never recomputed; finished particles leave the batch.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ImpossibleTargetError
from ..target import Target
from .resampling import Scheme, ess, get_scheme
from .result import SMCResult


def smc(
    target: Target,
    n_particles: int,
    *,
    resample: str | Scheme = "systematic",
    ess_threshold: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    on_extinction: Literal["raise", "return"] = "raise",
) -> SMCResult:
    """Run SMC on ``target`` with ``n_particles`` particles (see the module docstring).

    Randomness comes only from a ``torch.Generator`` seeded with ``seed``: equal seeds give
    identical runs. If every particle reaches weight 0, ``on_extinction="raise"`` raises
    ``ImpossibleTargetError`` naming the step; ``"return"`` returns the run with
    log_z = -inf (Z-hat = 0, which is what keeps Z-hat unbiased when that can happen by
    chance, e.g. when estimating bounds).
    """
    generator = torch.Generator().manual_seed(seed)
    return run_smc(
        target, n_particles, generator, resample=resample, ess_threshold=ess_threshold,
        use_prefix=True, progress=progress, on_extinction=on_extinction, info={"seed": seed},
    )


def importance_sample(
    target: Target, n: int, *, seed: int = 0, progress: bool = False,
    on_extinction: Literal["raise", "return"] = "raise",
) -> SMCResult:
    """Sequential importance sampling with the base model as proposal.

    s^k ~ p0(. | x) i.i.d., log w^k = log phi(s^k), log Z-hat = log (1/n) sum_k w^k
    (unbiased in Z; the IWAE bound in log space). Prefix scores of the potential are not
    used. ``on_extinction`` as in ``smc``.
    """
    generator = torch.Generator().manual_seed(seed)
    return run_smc(
        target, n, generator, ess_threshold=0.0, use_prefix=False, progress=progress,
        on_extinction=on_extinction, info={"seed": seed},
    )


def run_smc(
    target: Target,
    n: int,
    generator: torch.Generator,
    *,
    resample: str | Scheme = "systematic",
    ess_threshold: float = 0.5,
    use_prefix: bool = True,
    progress: bool = False,
    on_extinction: Literal["raise", "return"] = "raise",
    info: dict | None = None,
) -> SMCResult:
    """The SMC loop behind ``smc`` and ``importance_sample``, with an explicit generator."""
    if n < 1:
        raise ValueError(f"need at least one particle, got {n}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    if on_extinction not in ("raise", "return"):
        raise ValueError(f"on_extinction must be 'raise' or 'return', got {on_extinction!r}")
    scheme = get_scheme(resample)
    extinct_at = None
    model, horizon, eos = target.model, target.max_new_tokens, target.model.eos_token_id
    prefix = use_prefix and target.has_prefix_potential
    started = time.perf_counter()

    tokens = torch.full((n, horizon), -1, dtype=torch.long)
    length = torch.zeros(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    log_w = torch.zeros(n, dtype=torch.float64)
    log_psi = torch.zeros(n, dtype=torch.float64)  # log psi_{t-1} of each particle's prefix
    log_z = 0.0
    ess_trace: list[float] = []
    resampled_at: list[int] = []
    ancestry: list[list[int]] = []

    state = model.start(target.prompt_ids, n)
    rows = torch.arange(n)  # particles that own the model's rows, in row order
    for t in tqdm(range(1, horizon + 1), desc="smc", unit="tok", disable=not progress, leave=False):
        drawn = torch.multinomial(state.logprobs.exp(), 1, generator=generator).squeeze(1)
        tokens[rows, t - 1] = drawn
        length[rows] = t
        finished = (drawn == eos) if eos is not None else torch.zeros_like(drawn, dtype=torch.bool)
        if t == horizon:
            finished[:] = True
        log_w[rows] += _incremental_log_weights(target, tokens[rows, :t], rows, finished, log_psi, prefix)
        done[rows[finished]] = True
        if torch.isneginf(log_w).all():
            if on_extinction == "return":
                log_z, extinct_at = -math.inf, t
                break
            raise ImpossibleTargetError(
                f"step {t}: all {n} particles have zero weight under potential {target.potential}: "
                f"nothing the model proposed can satisfy it. Check that the constraint is satisfiable "
                f"within max_new_tokens={horizon}, or use more particles."
            )
        ess_trace.append(ess(log_w))
        parents = torch.arange(n)
        if not done.all() and ess_trace[-1] < ess_threshold * n:
            log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
            parents = scheme(log_w, n, generator)
            tokens, length, done, log_psi = tokens[parents], length[parents], done[parents], log_psi[parents]
            log_w = torch.zeros(n, dtype=torch.float64)
            resampled_at.append(t)
        ancestry.append(parents.tolist())
        if done.all():
            break
        # Rows for the particles still running, taken from their parents' rows (cache reused).
        row_of = torch.full((n,), -1, dtype=torch.long)
        row_of[rows] = torch.arange(len(rows))
        rows = (~done).nonzero().squeeze(1)
        state = model.reindex(state, row_of[parents[rows]])
        state = model.advance(state, tokens[rows, t - 1])

    log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
    toks = [tokens[k, : length[k]].tolist() for k in range(n)]
    return SMCResult(
        samples=target.sequences(toks).texts,
        tokens=toks,
        log_weights=log_w.tolist(),
        log_z=log_z,
        ess=ess_trace,
        resampled_at=resampled_at,
        ancestry=ancestry,
        method="smc" if ess_threshold > 0 else "is",
        info={
            **(info or {}),
            "n_particles": n,
            "resample": getattr(scheme, "__name__", str(resample)),
            "ess_threshold": ess_threshold,
            "max_new_tokens": horizon,
            "potential": str(target.potential),
            "model": model.name,
            "seconds": time.perf_counter() - started,
            "extinct_at": extinct_at,
        },
    )


def _incremental_log_weights(
    target: Target, prefixes: Tensor, rows: Tensor, finished: Tensor, log_psi: Tensor, prefix: bool
) -> Tensor:
    """log alpha_t for the particles in ``rows``, whose tokens so far are ``prefixes`` (module docstring).

    Updates ``log_psi`` of continuing particles in place. A particle already at weight 0
    (psi_{t-1} = 0) stays at 0 rather than becoming NaN.
    """
    incr = torch.zeros(len(rows), dtype=torch.float64)
    for mask, final in ((finished, True), (~finished, False)):
        if not mask.any() or not (final or prefix):
            continue
        who = rows[mask]
        new = (target.log_potential if final else target.log_prefix_potential)(prefixes[mask].tolist()).double()
        old = log_psi[who]
        incr[mask] = torch.where(torch.isneginf(old), 0.0, new - old)
        if not final:
            log_psi[who] = new
    return incr
