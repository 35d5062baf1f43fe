"""One thin trainer for every twist objective (``pilm.train_twist``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import torch
from torch import Tensor, nn

from ..config import TwistTrainingConfig, takes_config
from ..inference.resampling import ess
from ..inference.smc import run_smc
from ..inference.trace import Trace
from ..models.device import seeded_generator
from ..models.hf import HFModel
from ..proposals.weights import log_mean_exp
from ..target import Target
from ..twists.base import TwistFunction
from ..twists.head import Twist, condition_ids
from ..twists.lora import LoRATwist
from ..twists.residual import ResidualTwist
from .checkpoint import code_digest, run_key
from .contrast import negative_term, replay_pool, smc_populations, teacher_forced
from .fit import Checkpointing, Trained, fit
from .objectives import TwistBatch, get_objective
from .objectives.ctl import uniform_term

C = TwistTrainingConfig  # every default below is TwistTrainingConfig's


def sample_batch(target: Target, twist: TwistFunction | None, trainee, n: int, generator: torch.Generator,
                 *, keep_logprobs: bool, proposal_beta: float = 1.0) -> tuple[TwistBatch, list[float]]:
    """n sequences from the twist-induced proposal (base model if ``twist`` is None), no
    resampling, as a ``TwistBatch`` whose ``log_psi_all`` comes from ``trainee`` with
    gradients (the sampling itself runs without). Also returns the final SIS log weights."""
    drawn, log_w = draw(target, twist, n, generator, keep_logprobs=keep_logprobs, proposal_beta=proposal_beta)
    return twist_batch(target, drawn, trainee), log_w


def draw(target: Target, twist: TwistFunction | None, n: int, generator: torch.Generator, *, keep_logprobs: bool,
         proposal_beta: float = 1.0) -> tuple[dict[str, Tensor], list[float]]:
    """n sequences from the twist-induced proposal, no resampling: the per-step tensors of
    ``Trace.stacked`` (tokens, hidden states, log p0, log q, log phi, mask) and the SIS log weights."""
    trace = Trace(keep_logprobs=keep_logprobs)
    res = run_smc(target, n, generator, twist=twist, proposal_beta=proposal_beta, ess_threshold=0.0,
                  use_prefix=False, on_extinction="return", trace=trace)
    return trace.stacked(n), res.log_weights


def twist_batch(target: Target, drawn: dict[str, Tensor], trainee, *, all_tokens: bool = True) -> TwistBatch:
    """The ``TwistBatch`` of drawn sequences with psi from ``trainee``, with gradients: a head
    reads the recorded hidden states (no LM forward, so the same draw can serve many
    updates); a twist with its own body runs it teacher-forced. ``all_tokens=False`` scores
    a head only at the drawn tokens (``log_psi_drawn``), enough for ctl, sixo and fudge. A
    ``ResidualTwist``'s look-ahead at the drawn prefixes is the batch's ``log_psi_offset``
    (``drawn["offset"]`` where ``look_ahead`` put it once for many updates)."""
    t, mask = drawn, drawn["mask"]
    all_psi = drawn_psi = None
    if hasattr(trainee, "log_psi_teacher_forced"):  # its own body: one forward with gradients
        all_psi = trainee.log_psi_teacher_forced(target, t["tokens"], mask).masked_fill(~mask[..., None], 0.0)
    else:  # a head on the frozen model's recorded hidden states: no LM forward at all
        prefixes = None
        if trainee.needs_prefixes:
            toks = t["tokens"].tolist()
            prefixes = [tuple(toks[k][:j]) for k, j in mask.nonzero().tolist()]
        condition = trainee.condition_for(target)
        if all_tokens:
            values = trainee.log_psi(prefixes, t["hidden"][mask], condition)
            all_psi = values.new_zeros(*mask.shape, values.shape[-1]).masked_scatter(mask[..., None], values)
        else:
            values = trainee.log_psi_at(prefixes, t["hidden"][mask], t["tokens"][mask], condition)
            drawn_psi = values.new_zeros(mask.shape).masked_scatter(mask, values)
    offset = t.get("offset")
    if offset is None and isinstance(trainee, ResidualTwist):
        offset = look_ahead(target, t, trainee)
    return TwistBatch(t["tokens"], mask, t["log_p0"], t["log_q"], t["log_phi"], all_psi, t.get("log_p0_all"),
                      drawn_psi, offset)


def look_ahead(target: Target, drawn: dict[str, Tensor], residual: ResidualTwist) -> Tensor:
    """a_t log L(s_{1:t}) of a residual twist at every drawn token, (K, T): no parameter in it,
    so it is computed once per draw however many updates read it."""
    mask, toks = drawn["mask"], drawn["tokens"].tolist()
    values = residual.look_ahead(target, [toks[k][: j + 1] for k, j in mask.nonzero().tolist()])
    return torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, values.float().to(mask.device))


@takes_config(TwistTrainingConfig)
def train_twist(
    target: Target | Sequence[Target],
    objective: str = C.objective,
    *,
    steps: int = C.steps,
    batch_size: int = C.batch_size,
    lr: float = C.lr,
    seed: int = C.seed,
    twist: TwistFunction | None = None,
    head: Literal["mlp", "linear", "tied"] = C.head,
    layers: int = C.layers,
    init: Literal["xavier", "base"] = C.init,
    reuse: int = C.reuse,
    body: str = C.body,
    lora_rank: int = C.lora_rank,
    conditional: bool | None = None,
    proposal_beta: float = C.proposal_beta,
    weight_decay: float = C.weight_decay,
    grad_clip: float = C.grad_clip,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = C.checkpoint_every,
    overwrite: bool = False,
    log_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
    positives: Sequence[Sequence[int]] | None = None,
    residual: float | None = C.residual,
    pool: int = C.pool,
    negatives: Literal["sis", "smc"] = C.negatives,
) -> Trained:
    """Learn a twist for ``target`` with ``objective`` (ctl | rl | sixo | fudge | dpg).

    ``target`` may be a sequence of targets sharing one model (e.g. infilling targets with
    suffixes sampled from the joint): step i trains on ``target[i % len]``, so a conditional
    twist learns across conditions (amortised).

    Each step draws ``batch_size`` sequences from the current twist-induced proposal
    (q ∝ p0 psi^proposal_beta, no resampling; plus as many base-model samples for sixo and
    fudge), evaluates the objective on them and takes ``reuse`` AdamW steps with gradient-norm
    clipping on that draw: a head on the frozen LM re-reads the recorded hidden states, so
    every update after the first costs no LM forward (the objectives weight by p0 phi / q with
    the q that drew the samples, so they stay valid as psi moves away from it). Without
    ``twist`` a fresh head on the frozen LM's hidden state is made (``head`` linear|mlp|tied,
    seeded by ``seed``; ``init="base"`` zeroes its output layer, so psi starts constant and
    training starts at bootstrap SMC; conditioned on the suffix when the target has one);
    ``body="lora"`` puts the head on a LoRA-adapted copy of the body
    (rank ``lora_rank``, see ``LoRATwist``). With ``checkpoint_dir`` a checkpoint is written every
    ``checkpoint_every`` steps and at the end, and an existing one is resumed from: the run
    then continues bit-identically. A checkpoint of another target, model or setting raises
    `ResumeMismatchError` (``overwrite=True`` deletes it and starts afresh). Returns a
    ``Trained``: the twist as ``.model``, and its ``.history`` (one dict a step: loss (of its
    last update), ESS and log Z-hat of the step's SIS batch, updates and LM tokens drawn so
    far, seconds); ``log_path`` appends it as JSONL, ``plot_path`` draws the curves. The loop
    is ``pilm.learning.fit``.

    ``positives`` (ctl, one target): samples of sigma drawn elsewhere, e.g. a replay pool of
    the resampled particles of a large SMC run; each step contrasts ``batch_size`` of them,
    drawn uniformly, with the step's draw as negatives (``ctl``'s ``positives``), so the
    positive term no longer rests on the draw's few effective samples of a rare sigma.
    ``pool=P`` draws such a pool here: P particles resampled from SMC runs of 256 on the
    target (its prefix score resampling them), seeded by ``seed``. A ``ResidualTwist`` (given,
    or made with ``residual=a`` around the head made here: ``init="base"`` starts it at the
    look-ahead alone) trains its head on top of its look-ahead: the objective reads
    a_t log L + head at the drawn tokens. ``negatives="smc"`` (ctl with positives) takes the
    negative term from a twisted SMC run of ``batch_size`` particles instead of the SIS draw:
    its population after each step's resampling, which approximates pi_t itself
    (``pilm.learning.contrast``).

    ``config=`` a ``TwistTrainingConfig`` gives every setting at once; an argument also given overrides it.
    """
    spec = get_objective(objective)
    targets = [target] if isinstance(target, Target) else list(target)
    if not targets or any(t.model is not targets[0].model for t in targets):
        raise ValueError("train_twist needs one target, or several sharing one model")
    target = targets[0]
    if pool and positives is not None:
        raise ValueError("give positives or pool (which draws them), not both")
    if residual is not None and twist is not None:
        raise ValueError("residual= wraps the head train_twist makes; to train a twist of your own as a residual, "
                         "pass ResidualTwist(head, a) as twist")
    if (pool or positives is not None) and (objective != "ctl" or len(targets) > 1):
        raise ValueError("positives (samples of sigma, or a pool of them) serve the ctl objective on one target; got "
                         f"objective {objective!r} and {len(targets)} targets")
    if negatives not in ("sis", "smc"):
        raise ValueError(f"negatives must be 'sis' or 'smc', got {negatives!r}")
    if negatives == "smc" and not (pool or positives is not None):
        raise ValueError("negatives='smc' contrasts SMC populations with samples of sigma: give positives or pool")
    if positives is not None and not len(positives):
        raise ValueError("positives is empty: give samples of sigma (or pool=P to draw them)")
    if (residual is not None or isinstance(twist, ResidualTwist)) and spec.needs_logprobs:
        raise ValueError(f"{objective} reads psi at every next token; a residual twist trains on its drawn tokens: "
                         "use ctl or sixo")
    if twist is None:
        conditional = condition_ids(target) is not None if conditional is None else conditional
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if body == "lora":
                twist = LoRATwist(cast(HFModel, target.model), rank=lora_rank, kind=head, layers=layers, output=spec.twist_output,
                                  init=init, conditional=conditional)
            elif body == "frozen":
                twist = Twist.for_model(target.model, kind=head, layers=layers, output=spec.twist_output,
                                        conditional=conditional, init=init)
            else:
                raise ValueError(f"body must be 'frozen' or 'lora', got {body!r}")
        if residual is not None:
            twist = ResidualTwist(twist, residual)
    elif twist.output != spec.twist_output:
        raise ValueError(f"objective {objective!r} needs a twist with output {spec.twist_output!r}, not {twist.output!r}")
    if isinstance(twist, ResidualTwist):
        twist.check(targets)
    if pool:
        positives = replay_pool(target, pool, seed)
    generator = seeded_generator(seed, targets[0].model.device)  # draws the batches on the model's device
    module = cast(nn.Module, twist)  # a trainable twist is a torch module
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    key = run_key(targets, {"objective": objective, "batch_size": batch_size, "lr": lr, "seed": seed,
                            "head": head, "layers": layers, "init": init, "reuse": reuse, "body": body,
                            "lora_rank": lora_rank, "conditional": conditional, "proposal_beta": proposal_beta,
                            "weight_decay": weight_decay, "grad_clip": grad_clip}
                  | ({} if positives is None else {"positives": code_digest([list(map(int, p)) for p in positives])})
                  | ({"residual": [list(twist.powers), twist.propose]} if isinstance(twist, ResidualTwist) else {})
                  | ({"negatives": negatives} if negatives != "sis" else {}))
    lm_tokens = 0  # LM tokens drawn so far (a resumed run continues the count)
    every = spec.needs_logprobs  # rl and dpg read psi at every token, the others only at the drawn ones
    sigma_batch = None if positives is None else teacher_forced(target, positives)
    if sigma_batch is not None and isinstance(twist, ResidualTwist):
        sigma_batch["offset"] = look_ahead(target, sigma_batch, twist)

    def pick() -> dict[str, Tensor]:
        """``batch_size`` of the positives, drawn uniformly with the run's generator."""
        assert sigma_batch is not None  # only called with positives
        rows = torch.randint(len(sigma_batch["mask"]), (batch_size,), generator=generator, device=generator.device)
        return {k: v[rows.to(v.device)] for k, v in sigma_batch.items()}

    def smc_step(i: int, update) -> dict:
        nonlocal lm_tokens
        populations, run = smc_populations(target, twist, batch_size, generator, proposal_beta=proposal_beta)
        lm_tokens += int(run.compute["tokens"])
        picked = pick()  # negatives="smc" needs positives
        loss = torch.tensor(float("nan"))  # stays NaN (no update) if no step has both terms
        for _ in range(reuse):
            positive, steps = uniform_term(twist_batch(target, picked, twist, all_tokens=False))
            negative = negative_term(target, twist, populations)
            width = min(len(positive), len(negative))
            steps = steps[:width] & torch.isfinite(negative[:width]).to(steps.device)
            if not steps.any():
                break
            loss = -(positive[:width] - negative[:width].to(positive.device))[steps].mean()
            update(loss)
        return {"loss": loss.item(), "ess": float(run.steps[-1].ess[0]),
                "log_z": float(run.particles.log_z[0] + log_mean_exp(run.particles.log_w.double())),
                "updates": (i + 1) * reuse, "lm_tokens": lm_tokens}

    def step(i: int, update) -> dict:
        nonlocal lm_tokens
        step_target = targets[i % len(targets)]
        drawn, log_w = draw(step_target, twist, batch_size, generator, keep_logprobs=spec.needs_logprobs,
                            proposal_beta=proposal_beta)
        base = None
        if spec.needs_base_samples:
            base, _ = draw(step_target, None, batch_size, generator, keep_logprobs=False)
        lm_tokens += int(drawn["mask"].sum()) + (int(base["mask"].sum()) if base is not None else 0)
        if isinstance(twist, ResidualTwist):
            for d in (drawn, base):
                if d is not None:
                    d["offset"] = look_ahead(step_target, d, twist)
        picked = None if sigma_batch is None else pick()
        for _ in range(reuse):
            extra = {} if picked is None else {"positives": twist_batch(step_target, picked, twist, all_tokens=every)}
            loss = spec.loss(twist_batch(step_target, drawn, twist, all_tokens=every),
                             None if base is None else twist_batch(step_target, base, twist, all_tokens=every), **extra)
            update(loss)
        lw = torch.tensor(log_w)
        return {"loss": loss.item(), "ess": ess(lw) if torch.isfinite(lw).any() else 0.0,
                "log_z": float(log_mean_exp(lw)), "updates": (i + 1) * reuse, "lm_tokens": lm_tokens}

    def load(state: dict) -> None:
        nonlocal lm_tokens
        lm_tokens = state["history"][-1].get("lm_tokens", 0) if state["history"] else 0

    history = fit(module, optimizer, smc_step if negatives == "smc" else step, steps=steps,
                  name=f"train-twist {objective}", grad_clip=grad_clip,
                  generator=generator, checkpoint=Checkpointing(checkpoint_dir, key, checkpoint_every, overwrite,
                                                                load=load),
                  log_path=log_path, log_tag={"objective": objective}, plot_path=plot_path,
                  title=f"{objective} on {target.model.name}", metrics=("loss", "ess"), progress=progress)
    twist.trained_for = targets[0].describe() if len(targets) == 1 else None
    return Trained(twist, history)

