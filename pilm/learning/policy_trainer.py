"""Fine-tune the language model itself into a sampler of sigma (``pilm.finetune``).

The policy q_theta is the base model plus a LoRA adapter (``LoRAPolicy``; on a tabular base,
a ``TabularPolicy``). The reward of a trajectory is R(z⊤) = sigma~(z) = p0(z | x) phi(z),
tempered as R^{1/tau} (tau annealed linearly from ``reward_temperature[0]`` to ``[-1]``);
with tau = 1 every objective's optimum is q = sigma. One step, per micro-batch:

1. **draw** ``batch_size`` trajectories from the behaviour policy (``behaviour``: on-policy,
   tempered or replayed; a ``tool`` appends its tokens where it says, scored by sigma, not
   in log q; a ``policy_prompt`` conditions the policy on more than the target's prompt);
2. **score** them: log R of every prefix (``rewards``: one teacher-forced forward of p0, the
   same weights with the adapter off, plus one batched call of the potential), and log q of
   every token and stop action from one teacher-forced forward of the policy with
   gradients; the objective's loss; backward;
3. **update**: AdamW with linear warm-up, gradient accumulation over ``grad_accum``
   micro-batches and gradient-norm clipping.

Under ``accelerate launch`` each process samples its own micro-batches (seed + process
index) and gradients are averaged across processes before each update; only the main
process logs and checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..config import FinetuneConfig, takes_config
from ..models.adapter import LoRAPolicy
from ..models.base import LanguageModel, Trainable
from ..models.device import check_device, seeded_generator
from ..models.hf import HFModel
from ..models.tabular import TabularLM, TabularPolicy
from ..target import Target
from .behaviour import MODES, demonstration_data, exploration, remember
from .checkpoint import code_digest, run_key
from .fit import Checkpointing, Trained, fit
from .log_z import LogZ
from .objectives import FinetuneObjective, get_finetune_objective
from .policy_step import PolicyRun, summary
from .replay import ReplayBuffer
from .rewards import prefix_log_rewards, scored_batch, scored_demonstrations, split_likelihood
from .rollout import policy_batch, sample_trajectories, step_logprobs, trajectory_lengths
from .tools import Tool

__all__ = ["MODES", "LogZ", "finetune", "make_policy", "policy_batch", "prefix_log_rewards", "sample_trajectories",
           "scored_batch", "split_likelihood", "step_logprobs", "trajectory_lengths"]

C = FinetuneConfig  # every default below is FinetuneConfig's


def make_policy(targets: Sequence[Target], *, rank: int, alpha: int, dropout: float, target_modules,
                prompts: Sequence[Sequence[int]] | None = None) -> LanguageModel:
    """A fresh trainable policy on the targets' (shared) model: a LoRA adapter, or free logits
    on every prefix of every policy prompt (default: the targets' prompts) for a tabular model."""
    model = targets[0].model
    if isinstance(model, HFModel):
        return LoRAPolicy(model, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
    if isinstance(model, TabularLM):
        return TabularPolicy(model, prompts or [t.prompt_ids for t in targets], max(t.max_new_tokens for t in targets),
                             stop=targets[0].stop_token_id)
    raise TypeError(f"cannot fine-tune a {type(model).__name__}: give policy= (a trainable LanguageModel)")


@takes_config(FinetuneConfig)
def finetune(
    target: Target | Sequence[Target],
    objective: str = C.objective,
    *,
    steps: int = C.steps,
    batch_size: int = C.batch_size,
    grad_accum: int = C.grad_accum,
    lr: float = C.lr,
    log_z_lr: float = C.log_z_lr,
    warmup: int = C.warmup,
    weight_decay: float = C.weight_decay,
    grad_clip: float = C.grad_clip,
    seed: int = C.seed,
    policy: LanguageModel | None = None,
    lora_rank: int = C.lora_rank,
    lora_alpha: int = C.lora_alpha,
    lora_dropout: float = C.lora_dropout,
    target_modules: Sequence[str] = C.target_modules,
    explore: tuple[float, float, float] | None = C.explore,
    temperature_range: tuple[float, float] = C.temperature_range,
    replay_size: int = C.replay_size,
    replay_tolerance: float = C.replay_tolerance,
    reward_temperature: float | Sequence[float] = C.reward_temperature,
    anneal_steps: int | None = C.anneal_steps,
    min_log_reward: float = C.min_log_reward,
    data: Sequence[Sequence[int]] | Mapping[int, Sequence[Sequence[int]]] | None = None,
    tool: Tool | None = None,
    policy_prompt: Callable[[Target], str | Sequence[int]] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = C.checkpoint_every,
    overwrite: bool = False,
    log_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
) -> Trained:
    """Fine-tune a policy towards sigma ∝ p0 phi with ``objective`` (subtb | tb | reinforce |
    rws | sft); see the module docstring for one step, and ``FinetuneConfig`` for every
    setting's default.

    ``target`` may be several targets sharing one model (e.g. many prompts): step i trains on
    ``target[i % len]``; trajectory balance then learns log Z as a head on the prompt state.
    The policy is a new LoRA adapter on the target's model (rank ``lora_rank``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``; defaults from Hu et al. 2024), or ``policy``.

    ``explore`` = probabilities of (on-policy, tempered, replay) draws per micro-batch:
    default (1/4, 1/2, 1/4) for off-policy-valid objectives (the paper's mix), on-policy only
    for reinforce and rws (which need samples from q). ``data``: token sequences of
    demonstrations for the first target, or {target index: sequences}; they seed the replay
    buffers (``sft`` trains on them alone, drawn uniformly, cycling over the targets that
    have some). ``tool``: a function of the completion so far returning tokens to append
    (``pilm.learning.tools``): they are scored by sigma but are not the policy's choices.
    ``policy_prompt``: what the policy is conditioned on for each target, if not the
    target's prompt (text or ids; e.g. the beginning *and* the ending, for one policy that
    infills many endings). ``reward_temperature`` tau, or (tau_start, tau_end) annealed
    linearly over ``anneal_steps`` (default: all steps).

    The floor: write phi = p0(z | x)^power · phi_rest, with p0's own likelihood among phi's
    factors (``ModelLikelihood``, e.g. the tempering of continuation) split out. At a
    trajectory's end log phi_rest (not log R) is floored at ``min_log_reward`` = log eps, so
    R = p0^(1+power) · max(phi_rest, eps) there: phi_rest = 0 is a large finite penalty, not
    an infinite residual. The objectives then target sigma_eps ∝ p0^(1+power) max(phi_rest,
    eps), within total variation eps / (Z + eps) of sigma when power = 0. (Flooring log R
    instead gives each of the V^T strings of length T reward eps. At T = 30 they outweigh any
    Z by e^{200} or more, and the optimum becomes garbage: SubTB on the arithmetic task
    collapsed so.) A prefix with phi = 0 that the trajectory went past is left out of SubTB
    (see ``subtb``). Objectives that learn log Z start it at the first batch's IS estimate.

    With ``checkpoint_dir``, a checkpoint (adapter, log Z, optimizer, RNG, replay buffers,
    history) is written every ``checkpoint_every`` steps and at the end, and resumed from:
    the run then continues bit-identically. A checkpoint of another target, model or setting
    raises `ResumeMismatchError` (``overwrite=True`` deletes it and starts afresh). Returns a
    ``Trained``: the policy as ``.model``, its ``.history`` (one dict per step: loss, mean log
    R (untempered), diversity, completion tokens, behaviour modes, tau, lr, seconds) and, for
    objectives that learn it, ``.extras["log_z"]`` (a ``LogZ``). The loop is ``pilm.learning.fit``.

    ``config=`` a ``FinetuneConfig`` gives every setting at once; an argument also given overrides it.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    spec: FinetuneObjective = get_finetune_objective(objective)
    targets = _check_targets(target, spec, objective)
    demo_data = demonstration_data(data, objective, len(targets))
    explore = exploration(spec, objective, explore)
    taus = (float(reward_temperature),) * 2 if isinstance(reward_temperature, (int, float)) \
        else (float(reward_temperature[0]), float(reward_temperature[-1]))
    device = targets[0].model.device
    # Launched, gradients are reduced where the model is (NCCL on GPUs, gloo on CPUs); alone, the
    # default state: accelerate keeps one per process and refuses a second with other settings.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=device.type == "cpu") if launched else Accelerator()
    prompts = [t.prompt_ids if policy_prompt is None else t.model.encode_prompt(policy_prompt(t)) for t in targets]
    given_policy = policy
    if policy is not None:
        check_device("the policy", policy.device, device)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            policy = make_policy(targets, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                 target_modules=target_modules, prompts=prompts)
    hidden = targets[0].model.start(targets[0].prompt_ids, 1).hidden.shape[-1]
    log_z = LogZ(hidden, amortised=len(targets) > 1).to(device)
    groups = [{"params": list(cast(Trainable, policy).trainable.parameters()), "lr": lr}]
    if spec.learns_log_z:
        groups.append({"params": list(log_z.parameters()), "lr": log_z_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    generator = seeded_generator(seed + accelerator.process_index, device)  # draws rollouts
    buffers = [ReplayBuffer(replay_size, replay_tolerance) for _ in targets]
    key = run_key(targets, {"objective": objective, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                            "log_z_lr": log_z_lr, "warmup": warmup, "weight_decay": weight_decay,
                            "grad_clip": grad_clip, "seed": seed, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                            "lora_dropout": lora_dropout, "target_modules": list(target_modules), "explore": explore,
                            "temperature_range": temperature_range, "replay_size": replay_size,
                            "replay_tolerance": replay_tolerance, "reward_temperature": reward_temperature,
                            "anneal_steps": anneal_steps, "min_log_reward": min_log_reward,
                            "processes": accelerator.num_processes, "replay_per_process": True,
                            "data": code_digest({k: [[int(t) for t in seq] for seq in rows] for k, rows in demo_data.items()}),
                            "tool": None if tool is None else code_digest(tool),
                            "policy_prompts": None if policy_prompt is None else code_digest([list(p) for p in prompts]),
                            "policy": None if given_policy is None else type(given_policy).__qualname__})
    demos = {k: scored_demonstrations(targets[k], rows, tool, spec.prefix_rewards, min_log_reward)
             for k, rows in demo_data.items() if rows}  # target index -> (tokens, log R, tool mask)

    def save() -> dict:  # every rank's replay buffers, so each resumes its own
        return {"buffers": gather_object([[b.state() for b in buffers]])}

    def load(state: dict) -> None:
        mine = state["buffers"][accelerator.process_index]  # one list per rank
        buffers[:] = [ReplayBuffer.from_state(s, replay_size, replay_tolerance) for s in mine]

    checkpoint = Checkpointing(checkpoint_dir, key, checkpoint_every, overwrite, save=save, load=load)
    run = PolicyRun(objective, spec, policy, log_z, targets, prompts, buffers, demos, generator, explore, batch_size,
                    tool, temperature_range, min_log_reward, seed, accelerator.process_index)

    if objective != "sft":  # demonstrations seed the replay buffers (a resumed run loads its own instead)
        for k, (tokens, log_r, _) in demos.items():
            remember(buffers[k], tokens, log_r, targets[k].stop_token_id)

    def step(i: int, update) -> dict:
        k = sorted(demos)[i % len(demos)] if objective == "sft" else i % len(targets)
        tau = taus[0] + (taus[1] - taus[0]) * min(1.0, i / max((anneal_steps or steps) - 1, 1))
        micro = [run.score(run.draw(k, tau), k, tau, i, m, grad_accum) for m in range(grad_accum)]
        update()
        record = {**summary(micro), "reward_temperature": tau, "lr": optimizer.param_groups[0]["lr"]}
        if spec.learns_log_z:
            record["log_z"] = float(log_z(targets[k], prompts[k]).detach())
        return record

    history = fit(nn.ModuleDict({"policy": cast(Trainable, policy).trainable, "log_z": log_z}), optimizer, step, steps=steps,
                  name=f"finetune {objective}", grad_clip=grad_clip, generator=generator, warmup=warmup,
                  checkpoint=checkpoint, log_path=log_path, log_tag={"objective": objective}, plot_path=plot_path,
                  title=f"{objective} on {targets[0].model.name}", metrics=("loss", "log_r", "diversity"),
                  accelerator=accelerator, progress=progress, show=("loss", "log_r"))
    return Trained(policy, history, {"log_z": log_z} if spec.learns_log_z else {})


def _check_targets(target, spec: FinetuneObjective, objective: str) -> list[Target]:
    targets = [target] if isinstance(target, Target) else list(target)
    if not targets or any(t.model is not targets[0].model for t in targets):
        raise ValueError("finetune needs one target, or several sharing one model")
    if spec.prefix_rewards and targets[0].stop_token_id is None:
        raise ValueError(f"{objective} makes every prefix terminable with the stop token, and {targets[0].model.name} "
                         "has no EOS token: give the target a stop token (Target(..., stop=...)) or use objective='tb'")
    return targets
