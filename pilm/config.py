"""The configs of pilm's jobs: one source of defaults for the library and the command line.

Each field's default is the default of the function's argument of the same name
(``smc``, ``train_twist``, ``finetune``, ``bounds`` read theirs from here), and the CLI's
flags are generated from these dataclasses (``pilm.commands.cli``): ``--n-particles`` is
``SMCConfig.n_particles``, with its help text from the field's ``help`` metadata.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal, TypeVar

from .errors import ConfigError


def arg(default, help: str, *, low: float | None = None, high: float | None = None, strict: bool = False,
        **metadata):
    """A config field: its default, its help text, and the range its values must lie in
    (``low`` <= value <= ``high``; ``strict``: low < value; for tuples, every item)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "strict": strict, **metadata})


F = TypeVar("F", bound=Callable)


def takes_config(kind: type) -> Callable[[F], F]:
    """Let a function take its config dataclass as ``config=``: every field of ``config`` is
    the argument of the same name, unless that argument is also given (a keyword override).
    ``train_twist(target, config=TwistTrainingConfig(steps=50), lr=1e-2)`` trains 50 steps at
    lr 1e-2 with the config's other settings."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)
        names = [f.name for f in fields(kind) if f.name in signature.parameters]

        @functools.wraps(fn)
        def call(*args, config=None, **kwargs):
            if config is not None:
                if not isinstance(config, kind):
                    raise TypeError(f"{fn.__name__}: config must be a {kind.__name__}, got {type(config).__name__}")
                given = signature.bind_partial(*args, **kwargs).arguments
                kwargs.update({n: getattr(config, n) for n in names if n not in given})
            return fn(*args, **kwargs)

        extra = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=f"{kind.__name__} | None")
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        call.__signature__ = signature.replace(parameters=params[:at] + [extra] + params[at:])  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap


class Config:
    """Checks every field against its range when the config is made."""

    def __post_init__(self):
        for f in fields(self):
            value, low, high = getattr(self, f.name), f.metadata.get("low"), f.metadata.get("high")
            for v in value if isinstance(value, tuple) else (value,):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or (low is None and high is None):
                    continue
                bad = math.isnan(v) or (low is not None and (v <= low if f.metadata["strict"] else v < low)) or (
                    high is not None and v > high)
                if bad:
                    want = (f"in [{low:g}, {high:g}]" if low is not None and high is not None
                            else f"> {low:g}" if f.metadata["strict"] else f">= {low:g}" if low is not None
                            else f"<= {high:g}")
                    raise ConfigError(f.name, f"must be {want}, got {v:g}")


@dataclass(frozen=True)
class TargetConfig(Config):
    """What to sample: sigma(s | prompt) ∝ p0(s | prompt) phi(s)."""

    model: str | None = arg(None, "embedded name (smollm2-135m, the default), hub id or local folder")
    prompt: str = arg("", "the text every completion continues")
    chat: bool = arg(False, "wrap the prompt in the model's chat template")
    potential: tuple[str, ...] = arg((), "a potential spec (repeat to multiply them)", repeat=True)
    max_new_tokens: int = arg(32, "horizon T: a completion ends at EOS or after T tokens", low=1)
    lookahead: float = arg(0.0, "alpha > 0: a look-ahead prefix score, alpha log p(suffix | prompt, prefix) for "
                                "suffix:, alpha log P(label | prefix) for sentiment: and toxicity: (0: each kind's "
                                "default)", low=0)
    rollouts: int = arg(0, "R > 0: the potential's prefix score is the mean phi of R model rollouts of each prefix to "
                           "the horizon, an estimate of the optimal twist (0: none)", low=0)


@dataclass(frozen=True)
class DeviceConfig(Config):
    """Where the models run (every command)."""

    device: str = arg("auto", "auto (this process's GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "model weights' dtype; auto: bfloat16 on a GPU that has it, float16 on one without, the faster on a CPU")


@dataclass(frozen=True)
class SMCConfig(Config):
    """How ``pilm.smc`` samples."""

    n_particles: int = arg(32, "particles per target", low=1)
    resample: Literal["multinomial", "systematic", "stratified", "residual"] = arg(
        "systematic", "resampling scheme")
    ess_threshold: float = arg(0.5, "resample when ESS < this x N (1: at every step, 0: never)", low=0, high=1)
    proposal_beta: float = arg(1.0, "with a twist, propose from p0 psi^beta (0: p0 with twisted weights)", low=0)
    mask: bool = arg(False, "draw only tokens that keep the potential's hard constraints (regex, json, grammar) "
                            "satisfiable, weighted by their mass (the masked proposal)")
    exact_last: int = arg(0, "score phi for the M likeliest last tokens and draw each particle's last token from "
                             "p0 phi there (the exact-last-step proposal; 0: off)", low=0)
    on_extinction: Literal["warn", "raise", "return"] = arg(
        "warn", "when every particle dies: warn and return Z-hat = 0 unless shown impossible, raise, or return")
    seed: int = arg(0, "random seed (same seed, same run on the same machine)")


@dataclass(frozen=True)
class SkipTrainingConfig(Config):
    """How ``pilm.train_skip_model`` learns infilling's twist p0(ending | prompt, prefix) from joint draws."""

    suffix_tokens: int = arg(4, "tokens of the endings it learns to score", low=1)
    steps: int = arg(400, "optimiser steps, each on fresh joint draws", low=0)
    batch_size: int = arg(16, "joint draws (middle, ending) per step", low=1)
    lr: float = arg(1e-3, "AdamW learning rate", low=0, strict=True)
    rank: int = arg(8, "LoRA rank of the skip model", low=1)
    filler: str = arg(" _", "text whose last token stands for each token still to come")
    seed: int = arg(0, "random seed")


@dataclass(frozen=True)
class TwistTrainingConfig(Config):
    """How ``pilm.train_twist`` learns a twist."""

    objective: Literal["ctl", "rl", "sixo", "fudge", "dpg"] = arg("ctl", "twist objective")
    steps: int = arg(300, "optimiser steps", low=1)
    batch_size: int = arg(32, "sequences drawn per step", low=1)
    lr: float = arg(1e-3, "AdamW learning rate", low=0, strict=True)
    head: Literal["mlp", "linear", "tied"] = arg("mlp", "twist head on the LM's last hidden state")
    layers: int = arg(3, "layers of an mlp or tied head", low=2)
    init: Literal["xavier", "base"] = arg("xavier", "head init: xavier, or base (psi = const: start at bootstrap SMC)")
    reuse: int = arg(1, "head updates per drawn batch (a frozen body re-reads its hidden states)", low=1)
    body: Literal["frozen", "lora"] = arg("frozen", "the head reads the frozen LM, or a LoRA-adapted copy")
    lora_rank: int = arg(4, "LoRA rank of a lora body", low=1)
    proposal_beta: float = arg(1.0, "train on samples from p0 psi^beta", low=0)
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    grad_clip: float = arg(1.0, "gradient-norm clipping", low=0, strict=True)
    checkpoint_every: int = arg(50, "steps between checkpoints (when checkpointing)", low=1)
    seed: int = arg(0, "random seed")
    residual: float | None = arg(None, "a: learn a residual on the potential's prefix score L (a look-ahead, "
                                       "--lookahead), log psi = a log L + a head starting at 0 (ctl, sixo)", low=0)
    pool: int = arg(0, "ctl: positives from a replay pool of this many samples of sigma, resampled from SMC runs "
                       "of 256 particles on the target (0: each draw's own weighted samples)", low=0)
    negatives: Literal["sis", "smc"] = arg("sis", "ctl's negatives: each draw's SIS weights, or (with --pool) the "
                                                  "population of a twisted SMC run after each step's resampling")


@dataclass(frozen=True)
class FinetuneConfig(Config):
    """How ``pilm.finetune`` fine-tunes a LoRA policy into a sampler of sigma."""

    objective: Literal["subtb", "tb", "reinforce", "rws", "sft"] = arg("subtb", "fine-tuning objective")
    steps: int = arg(500, "optimiser steps", low=1)
    batch_size: int = arg(8, "trajectories per micro-batch", low=1)
    grad_accum: int = arg(1, "micro-batches per step", low=1)
    lr: float = arg(1e-4, "AdamW learning rate of the adapter", low=0, strict=True)
    log_z_lr: float = arg(1e-2, "learning rate of log Z (tb, subtb)", low=0, strict=True)
    warmup: int = arg(20, "linear learning-rate warm-up steps", low=0)
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    grad_clip: float = arg(1.0, "gradient-norm clipping", low=0, strict=True)
    lora_rank: int = arg(64, "LoRA rank", low=1)
    lora_alpha: int = arg(16, "LoRA alpha", low=1)
    lora_dropout: float = arg(0.1, "LoRA dropout", low=0, high=1)
    target_modules: tuple[str, ...] = arg(("q_proj", "k_proj", "v_proj", "o_proj"), "modules LoRA adapts")
    explore: tuple[float, float, float] | None = arg(
        None, "probabilities of on-policy, tempered and replayed draws (default per objective)", low=0, high=1)
    temperature_range: tuple[float, float] = arg((0.5, 2.0), "temperatures of tempered draws, U[lo, hi]", low=0, strict=True)
    replay_size: int = arg(50, "replay buffer capacity", low=1)
    replay_tolerance: float = arg(0.25, "edit distance (x length) under which trajectories are duplicates", low=0)
    reward_temperature: tuple[float, ...] = arg((1.0,), "tau, or tau_start tau_end annealed linearly", low=0, strict=True)
    anneal_steps: int | None = arg(None, "steps over which tau anneals (default: all)")
    min_log_reward: float = arg(-100.0, "log eps: phi = 0 at a trajectory's end counts as eps (R = p0 max(phi, eps))")
    checkpoint_every: int = arg(50, "steps between checkpoints (when checkpointing)", low=1)
    seed: int = arg(0, "random seed")


@dataclass(frozen=True)
class LatentConfig(Config):
    """How ``LatentReasoner.em`` learns a posterior over rationales and a likelihood."""

    rounds: int = arg(1, "EM rounds (an E-step then an M-step each; Hu et al. ran one)", low=1)
    e_steps: int = arg(200, "fine-tuning steps of each E-step (SubTB)", low=1)
    m_steps: int = arg(100, "optimiser steps of each M-step", low=1)
    m_samples: int = arg(8, "rationales drawn from q per labelled pair for the M-step", low=1)
    samples: int = arg(10, "rationales per item for the ELBO and the posterior predictive", low=1)
    seed: int = arg(0, "random seed")


@dataclass(frozen=True)
class BoundsConfig(Config):
    """How ``pilm.bounds`` measures samplers."""

    n_particles: tuple[int, ...] = arg((1, 4, 16, 64), "particle counts K", low=1)
    seeds: int = arg(10, "independent runs (and exact samples) per cell", low=1)
    methods: tuple[Literal["sis", "smc"], ...] = arg(("sis", "smc"), "sis: no resampling; smc: at every step")
    exact_samples: Literal["auto", "enumerate", "rejection", "joint"] = arg(
        "auto", "where the exact samples of sigma for the upper bounds come from")
    max_draws: int = arg(100_000, "budget of rejection sampling for exact samples", low=1)
    seed: int = arg(0, "random seed")


@dataclass(frozen=True)
class ScaleConfig(Config):
    """What ``pilm scale`` compares: accuracy against inference compute on a reasoning task."""

    task: Literal["arithmetic-chain", "gsm8k"] = arg("arithmetic-chain", "reasoning task (gsm8k: for a larger --model)")
    model: str | None = arg(None, "policy model: embedded name (smollm2-135m, the default), hub id or folder")
    backend: Literal["hf", "vllm"] = arg("hf", "what runs the policy: transformers, or a vLLM engine (a learned PRM "
                                         "then reads its hidden states with a transformers copy of the model)")
    methods: tuple[Literal["greedy", "sc", "bon", "wbon", "beam", "beam-all", "dvts", "pf", "pf-twisted", "pg"], ...] = arg(
        ("greedy", "sc", "bon", "wbon", "beam", "dvts", "pf", "pf-twisted", "pg"),
        "methods to run (beam-all: beam search without its duplicate filter, an ablation outside the default)")
    n: tuple[int, ...] = arg((1, 4, 16, 64), "budgets N (chains per problem)", low=1)
    prm: Literal["verifier", "judge", "learned"] = arg("verifier", "process reward: exact step verifier, LM judge, "
                                                      "or a learned value head (--prm-path)")
    problems: int = arg(100, "problems", low=1)
    operands: tuple[int, int] = arg((3, 5), "fewest and most operands of an arithmetic chain", low=2)
    temperature: float = arg(0.8, "policy temperature (the paper's 0.8)", low=0)
    chat: bool = arg(False, "prompt with the model's chat template (the worked examples as earlier turns), for an "
                            "instruct model")
    width: int = arg(4, "beam width of beam search and DVTS (M)", low=1)
    iterations: int = arg(2, "particle Gibbs sweeps (each with N / iterations particles)", low=1)
    tau: float = arg(1.0, "softmax temperature of the paper's weights", low=0, strict=True)
    aggregation: Literal["last", "min", "prod", "mean"] = arg("last", "how a chain's step scores combine")
    max_rows: int = arg(512, "chains advanced in one batch (problems x N)", low=1)
    seed: int = arg(0, "random seed of problems and samplers")
    engine: tuple[str, ...] = arg((), "a vLLM engine argument KEY=VALUE, VALUE read as JSON where it is JSON (e.g. "
                                  "tensor_parallel_size=2), for --backend vllm", repeat=True)

    def __post_init__(self):
        super().__post_init__()
        if self.engine_args and self.backend != "vllm":  # a malformed item is refused by engine_args
            raise ConfigError("engine", f"gives vLLM engine arguments, but the backend is {self.backend!r}: add "
                              "--backend vllm")

    @property
    def engine_args(self) -> dict:
        """``engine`` as keyword arguments of ``vllm.LLM``: each VALUE read as JSON (numbers,
        true/false, lists) where it is JSON, else as a string."""
        out = {}
        for item in self.engine:
            key, eq, value = item.partition("=")
            if not eq or not key.isidentifier():
                raise ConfigError("engine", f"takes KEY=VALUE items such as tensor_parallel_size=2, got {item!r}")
            if key in ("model", "dtype", "device"):
                raise ConfigError("engine", f"{key} is set by pilm ({'--model' if key == 'model' else '--' + key}), "
                                  f"not an engine argument")
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
        return out


@dataclass(frozen=True)
class PRMTrainingConfig(Config):
    """How ``pilm.train_prm`` learns a process reward (a value head) from Monte Carlo rollouts."""

    rollouts: int = arg(8, "rollouts from each step end (Math-Shepherd's k)", low=1)
    chains: int = arg(1, "chains sampled per training problem", low=1)
    steps: int = arg(300, "optimiser steps on the collected labels", low=1)
    batch_size: int = arg(64, "step ends per update", low=1)
    lr: float = arg(1e-3, "AdamW learning rate", low=0, strict=True)
    temperature: float = arg(1.0, "policy temperature the value is learned for", low=0)
    head: Literal["tied", "mlp", "linear"] = arg("tied", "value head on the policy's last hidden state")
    layers: int = arg(2, "layers of a tied or mlp head", low=2)
    seed: int = arg(0, "random seed")
