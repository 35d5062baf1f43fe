"""Sequential Monte Carlo over token sequences, all particles batched.

Target sigma(s) ∝ p0(s | x) phi(s). Step t targets pi_t(s_{1:t}) ∝ p0(s_{1:t}) psi_t(s_{1:t})
with psi_t the twist if one is given, else the potential's prefix score (1 if it has none),
psi_0 = 1, and psi = phi at a particle's last token (s_t = EOS or t = T). A twist replaces
the prefix score rather than multiplying it: the optimal twist E[phi | s_{1:t}] already
accounts for everything the prefix says, and only then are the weights constant. A particle drawing
s_t from the proposal q gets the incremental weight (``incremental_log_weight``)

    alpha_t = p0(s_t | s_{<t}) psi_t(s_{1:t}) / ( psi_{t-1}(s_{<t}) q(s_t | s_{<t}) )

and finished particles keep their weight. Proposals: the base model (q = p0, so
alpha_t = psi_t / psi_{t-1}), or the twist-induced q(v) ∝ p0(v) psi_t(s_{<t}, v)^beta
computed for all V tokens from the same forward pass; with beta = 1 its weight
sum_v p0(v) psi_t(s_{<t}, v) / psi_{t-1} does not depend on the drawn token (Zhao et al.
2024). At the last token the proposal still uses the learned psi_T; the weight uses phi. When the ESS falls below
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
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ImpossibleTargetError
from ..target import Target
from ..twists.base import TwistFunction
from ..models.base import LanguageModel
from .proposals import ModelProposal
from .resampling import Scheme, ess, get_scheme, multinomial
from .result import SMCResult
from .trace import Trace

Proposal = Literal["base", "twist"]


def incremental_log_weight(log_p0: Tensor, log_psi_new: Tensor, log_psi_prev: Tensor, log_q: Tensor) -> Tensor:
    """log alpha_t = log p0(s_t | s_{<t}) + log psi_t(s_{1:t}) - log psi_{t-1}(s_{<t}) - log q(s_t | s_{<t}).

    A particle already at weight 0 (psi_{t-1} = 0) stays at 0 instead of becoming NaN.
    """
    incr = log_p0.double() + log_psi_new.double() - log_psi_prev.double() - log_q.double()
    return torch.where(torch.isneginf(log_psi_prev), torch.zeros_like(incr), incr)


def proposal_log_probs(log_p0: Tensor, log_psi: Tensor | None, beta: float = 1.0) -> Tensor:
    """log q(v | s_{<t}) ∝ log p0(v | s_{<t}) + beta log psi_t(s_{<t}, v), normalised over v
    (rows where every token has psi = 0 fall back to p0: their weight is 0 anyway)."""
    if log_psi is None or beta == 0:
        return log_p0
    logits = log_p0 + beta * log_psi
    dead = torch.isneginf(logits).all(-1, keepdim=True)
    return torch.log_softmax(torch.where(dead, log_p0, logits), dim=-1)


def smc(
    target: Target,
    n_particles: int,
    *,
    twist: TwistFunction | None = None,
    proposal: Proposal | LanguageModel | ModelProposal | None = None,
    proposal_beta: float = 1.0,
    resample: str | Scheme = "systematic",
    ess_threshold: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    on_extinction: Literal["raise", "return"] = "raise",
    reference: Sequence[int] | None = None,
) -> SMCResult:
    """Run SMC on ``target`` with ``n_particles`` particles (see the module docstring).

    ``twist=None`` is plain (bootstrap) SMC. With a twist, ``proposal="twist"`` (default)
    proposes from q ∝ p0 psi^proposal_beta (twisted SMC; ``proposal_beta`` < 1 tempers
    towards p0 for exploration), ``proposal="base"`` from p0 with twisted weights. A
    ``LanguageModel`` (or ``ModelProposal``) as ``proposal`` samples from that model instead
    (e.g. a fine-tuned policy), weighted by p0 phi / q.

    ``reference`` (token ids of a complete sequence) runs *conditional* SMC: particle 0 is
    forced to it and always survives resampling (its ancestors are kept; the other N-1
    draw theirs multinomially from all N). With an exact sample of sigma as reference,
    E[log Z-hat] >= log Z: the IWAE upper bound without resampling, the CSMC upper bound
    with it (SPECS A.7).

    Randomness comes only from a ``torch.Generator`` seeded with ``seed``: equal seeds give
    identical runs. If every particle reaches weight 0, ``on_extinction="raise"`` raises
    ``ImpossibleTargetError`` naming the step; ``"return"`` returns the run with
    log_z = -inf (Z-hat = 0, which is what keeps Z-hat unbiased when that can happen by
    chance, e.g. when estimating bounds).
    """
    generator = torch.Generator().manual_seed(seed)
    return run_smc(
        target, n_particles, generator, twist=twist, proposal=proposal, proposal_beta=proposal_beta,
        resample=resample, ess_threshold=ess_threshold, use_prefix=True, progress=progress,
        on_extinction=on_extinction, reference=reference, info={"seed": seed},
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
    twist: TwistFunction | None = None,
    proposal: Proposal | LanguageModel | ModelProposal | None = None,
    proposal_beta: float = 1.0,
    resample: str | Scheme = "systematic",
    ess_threshold: float = 0.5,
    use_prefix: bool = True,
    progress: bool = False,
    on_extinction: Literal["raise", "return"] = "raise",
    trace: Trace | None = None,
    reference: Sequence[int] | None = None,
    info: dict | None = None,
) -> SMCResult:
    """The SMC loop behind ``smc`` and ``importance_sample``, with an explicit generator.

    ``trace`` (only without resampling) records per-step tensors for twist training.
    """
    if isinstance(proposal, LanguageModel):
        proposal = ModelProposal(proposal)
    proposal = proposal or ("twist" if twist is not None else "base")
    model_proposal = proposal if isinstance(proposal, ModelProposal) else None
    if model_proposal is not None and twist is not None:
        raise ValueError("give either a twist or a model proposal, not both")
    if model_proposal is None and proposal not in ("base", "twist"):
        raise ValueError(f"proposal must be 'base', 'twist' or a LanguageModel, got {proposal!r}")
    if proposal == "twist" and twist is None:
        raise ValueError("proposal='twist' needs a twist")
    if reference is not None:
        reference = [int(v) for v in reference]
        if not reference or len(reference) > target.max_new_tokens or not target.is_complete(reference):
            raise ValueError(
                f"the reference must be a complete sequence (ending at EOS or with exactly "
                f"max_new_tokens={target.max_new_tokens} tokens), got {len(reference)} tokens"
            )
        if resample not in ("multinomial", "systematic"):
            raise ValueError("conditional SMC resamples the free particles multinomially; leave resample at its default")
    if trace is not None and ess_threshold > 0:
        raise ValueError("a trace needs ess_threshold=0 (no resampling)")
    if n < 1:
        raise ValueError(f"need at least one particle, got {n}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    if on_extinction not in ("raise", "return"):
        raise ValueError(f"on_extinction must be 'raise' or 'return', got {on_extinction!r}")
    scheme = get_scheme(resample)
    extinct_at = None
    model, horizon, eos = target.model, target.max_new_tokens, target.stop_token_id
    prefix = use_prefix and target.has_prefix_potential and twist is None
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

    condition = twist.condition_for(target) if twist is not None else None
    state = model.start(target.prompt_ids, n)
    followers = [f for f in (twist, model_proposal) if f is not None and f.stateful]  # step with the model
    for f in followers:
        f.begin(target, n)
    rows = torch.arange(n)  # particles that own the model's rows, in row order
    for t in tqdm(range(1, horizon + 1), desc="smc", unit="tok", disable=not progress, leave=False):
        log_twist = None
        if twist is not None:
            prefixes = [tuple(p) for p in tokens[rows, : t - 1].tolist()] if twist.needs_prefixes else None
            with torch.no_grad():
                log_twist = twist.log_psi(prefixes, state.hidden, condition).float()
        if model_proposal is not None:
            log_q = model_proposal.log_q()
        else:
            log_q = proposal_log_probs(state.logprobs, log_twist, proposal_beta if proposal == "twist" else 0.0)
        drawn = torch.multinomial(log_q.exp(), 1, generator=generator).squeeze(1)
        if reference is not None and rows[0] == 0:  # the reference particle is still running
            drawn[0] = reference[t - 1]
        tokens[rows, t - 1] = drawn
        length[rows] = t
        finished = (drawn == eos) if eos is not None else torch.zeros_like(drawn, dtype=torch.bool)
        if t == horizon:
            finished[:] = True
        pick = drawn.unsqueeze(1)
        log_p0_drawn, log_q_drawn = state.logprobs.gather(1, pick).squeeze(1), log_q.gather(1, pick).squeeze(1)
        twist_drawn = log_twist.gather(1, pick).squeeze(1) if log_twist is not None else None
        new_psi = _log_psi_now(target, tokens[rows, :t], finished, twist_drawn, prefix)
        log_w[rows] += incremental_log_weight(log_p0_drawn, new_psi, log_psi[rows], log_q_drawn)
        log_psi[rows] = new_psi.double()
        if trace is not None:
            trace.record(rows, state, drawn, log_p0_drawn, log_q_drawn, finished, new_psi)
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
            if reference is None:
                parents = scheme(log_w, n, generator)
            else:
                parents = torch.cat([torch.zeros(1, dtype=torch.long), multinomial(log_w, n - 1, generator)])
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
        for f in followers:
            f.reindex(row_of[parents[rows]])
            f.advance(tokens[rows, t - 1])

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
            "proposal": proposal if isinstance(proposal, str) else proposal.name,
            "reference": reference is not None,
            "seconds": time.perf_counter() - started,
            "extinct_at": extinct_at,
        },
    )


def _log_psi_now(
    target: Target, prefixes: Tensor, finished: Tensor, twist_drawn: Tensor | None, use_prefix: bool
) -> Tensor:
    """log psi_t(s_{1:t}) of the rows that just drew s_t: log phi where finished, else the
    twist at the drawn token (if any) or the potential's prefix score (if used)."""
    out = torch.zeros(len(prefixes), dtype=torch.float64)
    if twist_drawn is not None:
        out += twist_drawn.double()
    if finished.any():
        out[finished] = target.log_potential(prefixes[finished].tolist()).double()
    if use_prefix and (~finished).any():
        out[~finished] += target.log_prefix_potential(prefixes[~finished].tolist()).double()
    return out
