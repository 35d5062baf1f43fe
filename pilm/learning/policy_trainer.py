"""Fine-tune the language model itself into a sampler of sigma (``pilm.finetune``).

The policy q_theta is the base model plus a LoRA adapter (``LoRAPolicy``; on a tabular base,
a ``TabularPolicy``). The reward of a trajectory is R(z⊤) = sigma~(z) = p0(z | x) phi(z),
tempered as R^{1/tau} (tau annealed linearly from ``reward_temperature[0]`` to ``[1]``);
with tau = 1 every objective's optimum is q = sigma. One step, per micro-batch:

1. draw ``batch_size`` trajectories under no_grad with the KV cache, from the behaviour
   policy: on-policy, on-policy at a temperature ~ U[temperature_range], or replay (a
   reward-prioritised, deduplicated buffer). Off-policy draws are only used by objectives
   that are valid on them (subtb, tb, sft). A ``tool`` appends its tokens where it says
   (scored by sigma, not in log q); a ``policy_prompt`` conditions the policy on more than
   the target's prompt (e.g. the ending to infill);
2. log R of every prefix (or only the final one) from one teacher-forced forward of p0
   (the same weights, adapter off) plus one batched call of the potential;
3. log q of every token and of the stop action (EOS) at every prefix from one
   teacher-forced forward of the policy with gradients; the objective's loss; backward.

AdamW with linear warm-up, gradient accumulation over ``grad_accum`` micro-batches and
gradient-norm clipping. Under ``accelerate launch`` each process samples its own
micro-batches (seed + process index) and gradients are averaged across processes before
each update; only the main process logs and checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models.adapter import DEFAULT_TARGET_MODULES, LoRAPolicy
from ..models.base import LanguageModel
from ..models.hf import HFModel
from ..models.tabular import TabularLM, TabularPolicy
from ..potentials import ModelLikelihood
from ..potentials.base import Potential, Product, evaluate
from ..target import Target
from .checkpoint import resume, save_checkpoint
from .objectives import FinetuneObjective, PolicyBatch, get_finetune_objective
from .replay import ReplayBuffer, Trajectory, pad, replay_tensors
from .tools import Tool, forced_mask, tool_output

MODES = ("on-policy", "tempered", "replay")


def sample_trajectories(policy: LanguageModel, target: Target, n: int, generator: torch.Generator,
                        temperature: float = 1.0, tool: Tool | None = None,
                        prompt_ids: Sequence[int] | None = None) -> Tensor:
    """n completions of ``target``'s prompt from ``policy`` at ``temperature`` (0: greedy),
    under no_grad with one batched forward per token and the KV cache (finished rows leave
    the batch), as a (n, T) tensor right-padded with -1. Each ends at the target's stop
    token (EOS by default) or at the horizon T. With a ``tool``, a row takes the tokens the
    tool appends before drawing again (see ``pilm.learning.tools``). ``prompt_ids``: the
    policy's own prompt, if not the target's (an amortised policy told what to condition on)."""
    horizon, eos = target.max_new_tokens, target.stop_token_id
    tokens = torch.full((n, horizon), -1, dtype=torch.long)
    rows = torch.arange(n)
    pending: list[list[int]] = [[] for _ in range(n)]
    with torch.no_grad():
        state = policy.start(target.prompt_ids if prompt_ids is None else prompt_ids, n)
        for t in range(horizon):
            if temperature == 0:
                drawn = state.logprobs.argmax(-1)
            else:
                probs = torch.softmax(state.logprobs / temperature, -1)
                drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            if tool is not None:
                for j, r in enumerate(rows.tolist()):
                    if pending[r]:
                        drawn[j] = pending[r].pop(0)
                    elif int(drawn[j]) != eos:
                        pending[r] = tool_output(tool, tokens[r, :t].tolist() + [int(drawn[j])], eos)
            tokens[rows, t] = drawn
            going = drawn != eos if eos is not None else torch.ones_like(drawn, dtype=torch.bool)
            if t + 1 == horizon or not going.any():
                break
            keep = going.nonzero().squeeze(1)
            rows = rows[keep]
            state = policy.advance(policy.reindex(state, keep), drawn[keep])
    return tokens


def trajectory_lengths(tokens: Tensor, eos: int | None) -> Tensor:
    """n = number of tokens before the stop action: before the EOS, or all of them."""
    real = tokens >= 0
    stop = (tokens == eos) if eos is not None else torch.zeros_like(real)
    return real.sum(1) - stop.sum(1)


def step_logprobs(lp: Tensor, tokens: Tensor, lengths: Tensor, stop_id: int | None) -> tuple[Tensor, Tensor]:
    """From log p(. | x, z_{1:i}), (B, T+1, V): log p of each drawn token before the stop,
    (B, T), and of the stop token at each state i <= n, (B, T+1); 0 elsewhere and at i = T
    (the horizon stops with probability 1)."""
    horizon = tokens.shape[1]
    steps = torch.arange(horizon)[None, :] < lengths[:, None]
    tok = lp[:, :horizon].gather(2, tokens.clamp(min=0)[..., None]).squeeze(2).masked_fill(~steps, 0.0)
    stop = torch.zeros_like(lp[..., 0])
    if stop_id is not None:
        stop = torch.cat([lp[:, :horizon, stop_id], torch.zeros_like(lp[:, :1, 0])], 1)
    states = torch.arange(horizon + 1)[None, :] <= lengths[:, None]
    return tok, stop.masked_fill(~states, 0.0)


def split_likelihood(target: Target) -> tuple[float, Potential | None]:
    """phi = p0(s | x)^power · rest: the power of the target model's own likelihood among
    phi's factors (``ModelLikelihood``), which the teacher-forced forward giving p0 already
    scores, and the remaining factors (None if none)."""
    pot = target.potential
    parts = () if pot is None else pot.parts if isinstance(pot, Product) else (pot,)
    own = [p for p in parts if isinstance(p, ModelLikelihood) and p.model is target.model]
    rest = [p for p in parts if p not in own]
    return sum(p.power for p in own), (None if not rest else rest[0] if len(rest) == 1 else Product(*rest))


def prefix_log_rewards(target: Target, tokens: Tensor, *, every_prefix: bool, forced: Tensor | None = None,
                       floor: float = -math.inf) -> Tensor:
    """log R(z_{1:i}⊤) = log p0(z_{1:i} ⊤ | x) + log phi(z_{1:i} ⊤), (B, T+1), where ⊤ is the
    EOS token for i < T and nothing at i = T (the horizon). p0, and any power of it among
    phi's factors (tempering, or cancelling it as in the random-number task), comes from one
    teacher-forced forward; the other factors of phi from one batched call on every prefix
    (or only on each final sequence, other entries -inf, when ``every_prefix`` is False).
    A state followed by a tool's token (``forced``, (B, T)) is not terminable: -inf.

    At each trajectory's final state the other factors' log phi is floored at ``floor``
    (log p0 is not): R = p0 · max(phi, e^floor) there, a proper target (see ``finetune``)."""
    model, eos, horizon = target.model, target.stop_token_id, target.max_new_tokens
    b = len(tokens)
    n = trajectory_lengths(tokens, eos)
    with torch.no_grad():
        tok, stop = step_logprobs(model.prefix_logprobs(target.prompt_ids, tokens), tokens, n, eos)
    cum = torch.cat([torch.zeros(b, 1), torch.cumsum(tok, 1)], 1).double()  # log p0(z_{1:i})
    stop = stop.double()
    out = torch.full((b, horizon + 1), -math.inf, dtype=torch.float64)
    rows, lengths = tokens.tolist(), n.tolist()
    which = [(k, i) for k in range(b) for i in (range(lengths[k] + 1) if every_prefix else [lengths[k]])]
    if eos is None and every_prefix:
        which = [(k, i) for k, i in which if i == horizon]  # without EOS only the horizon stops
    if forced is not None:
        tool_next = forced.tolist()
        which = [(k, i) for k, i in which if i == lengths[k] or not tool_next[k][i]]
    seqs = [rows[k][:i] + ([eos] if i < horizon else []) for k, i in which]
    power, rest = split_likelihood(target)
    unique = list(dict.fromkeys(map(tuple, seqs)))  # trajectories share prefixes: score each once
    log_rest = dict.fromkeys(unique, 0.0)
    if rest is not None and unique:
        log_rest = dict(zip(unique, evaluate(rest, target.sequences(unique), final=True).double().tolist()))
    for (k, i), s in zip(which, seqs, strict=True):
        rest_k = max(log_rest[tuple(s)], floor) if i == lengths[k] else log_rest[tuple(s)]
        out[k, i] = (1.0 + power) * (cum[k, i] + stop[k, i]) + rest_k
    return out


def policy_batch(policy: LanguageModel, target: Target, tokens: Tensor, log_r: Tensor,
                 log_z: Tensor | None = None, forced: Tensor | None = None,
                 prompt_ids: Sequence[int] | None = None) -> PolicyBatch:
    """Assemble the objectives' tensors: log q of the policy given ``prompt_ids`` (default:
    the target's prompt), with gradients, from one forward; tokens a tool appended
    (``forced``, (B, T)) are not the policy's and count 0 in log q."""
    eos, horizon = target.stop_token_id, target.max_new_tokens
    n = trajectory_lengths(tokens, eos)
    prompt = target.prompt_ids if prompt_ids is None else prompt_ids
    log_q, log_stop = step_logprobs(policy.prefix_logprobs(prompt, tokens), tokens, n, eos)
    if forced is not None:
        log_q = log_q.masked_fill(forced, 0.0)
    states = torch.arange(horizon + 1)[None, :] <= n[:, None]
    return PolicyBatch(log_q, log_stop, log_r.float().masked_fill(~states, 0.0), states, log_z)


class LogZ(nn.Module):
    """Learned log Z (trajectory balance; the root flow of SubTB): a scalar for one prompt, or a linear head on
    the base model's last hidden state of the policy's prompt for many (amortised over prompts)."""

    def __init__(self, hidden_size: int, amortised: bool):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1) if amortised else None
        if self.head is not None:  # start at the scalar (the first batch's IS estimate), not a random offset
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.value = nn.Parameter(torch.zeros(()))
        self._hidden: dict[tuple[int, ...], Tensor] = {}  # the frozen base's prompt states, computed once

    def forward(self, target: Target, prompt_ids: Sequence[int] | None = None) -> Tensor:
        if self.head is None:
            return self.value
        key = tuple(target.prompt_ids if prompt_ids is None else prompt_ids)
        if key not in self._hidden:
            with torch.no_grad():
                self._hidden[key] = target.model.start(key, 1).hidden.float()
        return self.head(self._hidden[key]).squeeze() + self.value

    def start_at_estimate(self, batch: PolicyBatch, target: Target, prompt_ids: Sequence[int] | None = None) -> Tensor:
        """Shift log Z to the batch's importance-sampling estimate log (1/B) sum_b R(z_b)/q(z_b)
        (not a random offset of many nats); returns the new value, with gradients."""
        with torch.no_grad():
            estimate = torch.logsumexp(batch.log_r_final - batch.log_q_total, 0) - math.log(len(batch.log_q))
            self.value += estimate - self(target, prompt_ids)
        return self(target, prompt_ids)


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


def finetune(
    target: Target | Sequence[Target],
    objective: str = "subtb",
    *,
    steps: int = 500,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-4,
    log_z_lr: float = 1e-2,
    warmup: int = 20,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    seed: int = 0,
    policy: LanguageModel | None = None,
    lora_rank: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    explore: tuple[float, float, float] | None = None,
    temperature_range: tuple[float, float] = (0.5, 2.0),
    replay_size: int = 50,
    replay_tolerance: float = 0.25,
    reward_temperature: float | tuple[float, float] = 1.0,
    anneal_steps: int | None = None,
    min_log_reward: float = -100.0,
    data: Sequence[Sequence[int]] | Mapping[int, Sequence[Sequence[int]]] | None = None,
    tool: Tool | None = None,
    policy_prompt: Callable[[Target], str | Sequence[int]] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    log_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
) -> LanguageModel:
    """Fine-tune a policy towards sigma ∝ p0 phi with ``objective`` (subtb | tb | reinforce |
    rws | sft); see the module docstring for one step.

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
    infills many endings). ``reward_temperature`` (tau_start, tau_end) anneals linearly over
    ``anneal_steps`` (default: all steps). At a trajectory's end log phi (not log R) is floored
    at ``min_log_reward`` = log eps, so phi = 0 there is a large finite penalty, not an
    infinite residual. The objectives then target sigma_eps ∝ p0 max(phi, eps), which is
    within total variation eps / (Z + eps) of sigma. (Flooring log R instead gives each of
    the V^T strings of length T reward eps. At T = 30 they outweigh any Z by e^{200} or
    more, and the optimum becomes garbage: SubTB on the arithmetic task collapsed so.) A
    prefix with phi = 0 that the trajectory went past is left out of SubTB (see ``subtb``).
    Objectives that learn log Z start it at the first batch's IS estimate.

    With ``checkpoint_dir``, a checkpoint (adapter, log Z, optimizer, RNG, replay buffers,
    history) is written every ``checkpoint_every`` steps and at the end, and resumed from:
    the run then continues bit-identically. Returns the policy with ``history`` (one dict
    per step: loss, mean log R (untempered), diversity, completion tokens, behaviour modes, tau, lr,
    seconds).
    """
    from accelerate import Accelerator

    spec: FinetuneObjective = get_finetune_objective(objective)
    targets = [target] if isinstance(target, Target) else list(target)
    if not targets or any(t.model is not targets[0].model for t in targets):
        raise ValueError("finetune needs one target, or several sharing one model")
    if spec.prefix_rewards and targets[0].stop_token_id is None:
        raise ValueError(f"{objective} makes every prefix terminable with the stop token, and {targets[0].model.name} "
                         "has no EOS token: give the target a stop token (Target(..., stop=...)) or use objective='tb'")
    demo_data = _demonstration_data(data, objective, len(targets))
    explore = _exploration(spec, objective, explore)
    t_start, t_end = (reward_temperature, reward_temperature) if isinstance(reward_temperature, (int, float)) \
        else reward_temperature
    anneal_steps = anneal_steps or steps
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    prompts = [t.prompt_ids if policy_prompt is None else t.model.encode_prompt(policy_prompt(t)) for t in targets]
    if policy is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            policy = make_policy(targets, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                 target_modules=target_modules, prompts=prompts)
    hidden = targets[0].model.start(targets[0].prompt_ids, 1).hidden.shape[-1]
    log_z = LogZ(hidden, amortised=len(targets) > 1)
    trainable = nn.ModuleDict({"policy": policy.trainable, "log_z": log_z})
    groups = [{"params": list(policy.trainable.parameters()), "lr": lr}]
    if spec.learns_log_z:
        groups.append({"params": list(log_z.parameters()), "lr": log_z_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    buffers = [ReplayBuffer(replay_size, replay_tolerance) for _ in targets]
    history: list[dict] = []
    start = 0
    saved = resume(checkpoint_dir, trainable, optimizer, generator, objective)
    if saved is not None:
        start, history = saved["step"], saved["history"]
        buffers = [ReplayBuffer.from_state(s, replay_size, replay_tolerance) for s in saved["buffers"]]
    demos = {k: _scored_demonstrations(targets[k], rows, tool, spec.prefix_rewards, min_log_reward)
             for k, rows in demo_data.items() if rows}  # target index -> (tokens, log R, tool mask)
    if start == 0 and objective != "sft":  # demonstrations seed the replay buffers
        for k, (tokens, log_r, _) in demos.items():
            remember(buffers[k], tokens, log_r, targets[k].stop_token_id)
    demo_targets = sorted(demos)
    main = accelerator.is_main_process
    for path in (log_path, plot_path):
        if path is not None and main:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    bar = tqdm(range(start, steps), desc=f"finetune {objective}", initial=start, total=steps,
               disable=not (progress and main))
    for step in bar:
        t0 = time.perf_counter()
        k = demo_targets[step % len(demo_targets)] if objective == "sft" else step % len(targets)
        step_target, buffer, prompt = targets[k], buffers[k], prompts[k]
        tau = t_start + (t_end - t_start) * min(1.0, step / max(anneal_steps - 1, 1))
        for g, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base_lr * min(1.0, (step + 1) / max(warmup, 1))
        optimizer.zero_grad()
        losses, rewards, distinct, modes, drawn = [], [], [], [], 0
        for micro in range(grad_accum):
            mode = "data" if objective == "sft" else _draw_mode(explore, generator, len(buffer) > 0)
            if mode == "data":  # supervised: demonstrations drawn uniformly
                pick = torch.randint(len(demos[k][0]), (batch_size,), generator=generator)
                tokens, log_r, forced = (x[pick] for x in demos[k])
            else:
                tokens, log_r, forced = behaviour_batch(
                    mode, policy, step_target, buffer, batch_size, generator, tau=tau, tool=tool, prompt_ids=prompt,
                    temperature_range=temperature_range, every_prefix=spec.prefix_rewards, min_log_reward=min_log_reward)
            policy.train(True)
            with torch.random.fork_rng():  # adapter dropout: seeded per micro-batch, so resume is exact
                torch.manual_seed(hash((seed, accelerator.process_index, step, micro)) % 2**62)
                z = log_z(step_target, prompt) if spec.learns_log_z else None
                batch = policy_batch(policy, step_target, tokens, log_r / tau, z, forced, prompt)
                if spec.learns_log_z and step == 0 and micro == 0:
                    batch.log_z = log_z.start_at_estimate(batch, step_target, prompt)
                loss = spec.loss(batch)
                (loss / grad_accum).backward()
            policy.train(False)
            losses.append(loss.item())
            rewards.append(float(batch.log_r_final.mean()) * tau)
            distinct.append(len({tuple(r) for r in tokens.tolist()}) / batch_size)
            modes.append(mode)
            drawn += int((tokens >= 0).sum())
        _update(optimizer, trainable, accelerator, grad_clip)
        record = {"step": step + 1, "loss": sum(losses) / grad_accum, "log_r": sum(rewards) / grad_accum,
                  "diversity": sum(distinct) / grad_accum, "tokens": drawn, "modes": modes, "reward_temperature": tau,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if spec.learns_log_z:
            record["log_z"] = float(log_z(step_target, prompt).detach())
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3g}", log_r=f"{record['log_r']:.3g}")
        if main and log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps({"objective": objective, **record}) + "\n")
        if main and checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(checkpoint_dir, trainable, optimizer, generator,
                            {"step": step + 1, "history": history, "objective": objective, "seed": seed,
                             "buffers": [b.state() for b in buffers]})
        accelerator.wait_for_everyone()
    policy.history = history
    policy.log_z = log_z if spec.learns_log_z else None
    if main and plot_path is not None:
        from ..evaluation.plots import plot_training

        plot_training(history, plot_path, title=f"{objective} on {targets[0].model.name}",
                      metrics=("loss", "log_r", "diversity"))
    return policy


def _demonstration_data(data, objective: str, n_targets: int) -> dict[int, Sequence[Sequence[int]]]:
    """``finetune(data=...)`` as {target index: token sequences}, checked."""
    demo_data = {} if not data else dict(data) if isinstance(data, Mapping) else {0: data}
    if objective == "sft" and not any(demo_data.values()):
        raise ValueError("objective='sft' trains on demonstrations: give data=[token sequences]")
    if any(not 0 <= k < n_targets for k in demo_data):
        raise ValueError(f"data keys are target indices in [0, {n_targets}), got {sorted(demo_data)}")
    return demo_data


def _scored_demonstrations(target: Target, rows: Sequence[Sequence[int]], tool: Tool | None, every_prefix: bool,
                           min_log_reward: float) -> tuple[Tensor, Tensor, Tensor]:
    """Demonstrations as padded tokens (cut at the horizon), their log R and tool mask."""
    tokens = pad([list(d)[: target.max_new_tokens] for d in rows], target.max_new_tokens)
    return (tokens, *scored_batch(target, tokens, tool, every_prefix, min_log_reward))


def _update(optimizer: torch.optim.Optimizer, trainable: nn.Module, accelerator, grad_clip: float) -> None:
    """Average gradients across processes (under ``accelerate launch``), clip their norm, step."""
    if accelerator.num_processes > 1:
        for p in trainable.parameters():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()


def behaviour_batch(mode: str, policy: LanguageModel, target: Target, buffer: ReplayBuffer, n: int,
                    generator: torch.Generator, *, tau: float, temperature_range: tuple[float, float],
                    every_prefix: bool, min_log_reward: float, tool: Tool | None = None,
                    prompt_ids: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens (n, T), untempered log R (n, T+1) and the tool's tokens (n, T; all False without
    a tool) of one micro-batch drawn by ``mode``:
    "replay" (reward-prioritised at temperature ``tau``), "tempered" (the policy at a
    temperature ~ U[temperature_range]) or "on-policy". Fresh draws also enter ``buffer``."""
    if mode == "replay":
        tokens, log_r = replay_tensors(buffer.sample(n, generator, temperature=tau), target.max_new_tokens)
        return tokens, log_r, forced_mask(tokens, tool, target.stop_token_id)
    temperature = 1.0
    if mode == "tempered":
        lo, hi = temperature_range
        temperature = lo + (hi - lo) * float(torch.rand((), generator=generator))
    policy.train(False)
    tokens = sample_trajectories(policy, target, n, generator, temperature, tool, prompt_ids)
    log_r, forced = scored_batch(target, tokens, tool, every_prefix, min_log_reward)
    remember(buffer, tokens, log_r, target.stop_token_id)
    return tokens, log_r, forced


def scored_batch(target: Target, tokens: Tensor, tool: Tool | None, every_prefix: bool,
                 min_log_reward: float) -> tuple[Tensor, Tensor]:
    """The untempered log R of ``tokens`` (B, T+1), log phi floored at each one's end, and
    which tokens the tool appended (B, T)."""
    forced = forced_mask(tokens, tool, target.stop_token_id)
    return prefix_log_rewards(target, tokens, every_prefix=every_prefix, forced=forced, floor=min_log_reward), forced


def remember(buffer: ReplayBuffer, tokens: Tensor, log_r: Tensor, stop: int | None) -> None:
    """Add each trajectory (tokens and the log R of its n+1 states) to ``buffer``."""
    for row, r, length in zip(tokens.tolist(), log_r.tolist(), trajectory_lengths(tokens, stop).tolist(), strict=True):
        buffer.add(Trajectory(tuple(t for t in row if t >= 0), r[: length + 1]))


def _exploration(spec: FinetuneObjective, objective: str, explore) -> tuple[float, float, float]:
    if explore is None:
        return (0.25, 0.5, 0.25) if spec.off_policy else (1.0, 0.0, 0.0)
    explore = tuple(float(x) for x in explore)
    if len(explore) != 3 or min(explore) < 0 or not math.isclose(sum(explore), 1.0):
        raise ValueError(f"explore = (on-policy, tempered, replay) probabilities summing to 1, got {explore}")
    if not spec.off_policy and explore[0] < 1.0:
        raise ValueError(f"{objective} needs samples from the policy itself: tempered or replayed trajectories would "
                         "bias it (use explore=(1, 0, 0), or subtb/tb, which are valid off-policy)")
    return explore


def _draw_mode(explore: tuple[float, float, float], generator: torch.Generator, can_replay: bool) -> str:
    probs = torch.tensor(explore if can_replay else (explore[0] + explore[2], explore[1], 0.0))
    return MODES[int(torch.multinomial(probs, 1, generator=generator))]
