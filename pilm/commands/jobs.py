"""The command line's own settings, beside the library's configs (``pilm.config``): what each
command writes and reads (its outputs, tasks and saved runs). Flags are generated from them as
from every config (``cli_args``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import Config, arg


@dataclass(frozen=True)
class SampleOutput(Config):
    """What sample prints and writes."""

    top: int = arg(5, "how many distinct samples to print", low=1)
    out: str | None = arg(None, "append the run to this JSONL file", path="file")
    plot: str | None = arg(None, "write the ESS-over-steps PNG here", path="file")
    twist: str | None = arg(None, "folder of a twist saved by train-twist (twisted SMC)", path="twist")
    adapter: str | None = arg(None, "folder of a LoRA policy saved by finetune: it proposes, the weights correct "
                              "its samples to sigma", path="adapter")
    skip: str | None = arg(None, "folder of a skip model saved by train-skip: infilling's learned look-ahead, "
                           "a prefix score SMC resamples on", path="skip")


@dataclass(frozen=True)
class TwistOutput(Config):
    """Where train-twist writes."""

    out: str = arg("twist", "folder for the twist, its training log and plot", path="folder")
    keep_checkpoint: bool = arg(False, "keep the resumable checkpoint (optimizer state, RNG) after training")
    overwrite: bool = arg(False, "start afresh when --out holds an interrupted run of other settings")


@dataclass(frozen=True)
class SkipJob(Config):
    """What train-skip learns for and where it writes."""

    model: str | None = arg(None, "embedded name (smollm2-135m, the default), hub id or local folder")
    prompt: str = arg("", "the text before every middle")
    max_new_tokens: int = arg(8, "tokens T of the middle between the prompt and an ending", low=2)
    out: str = arg("skip", "folder for the skip model and its training log", path="folder")
    keep_checkpoint: bool = arg(False, "keep the resumable checkpoint (optimizer state, RNG) after training")
    overwrite: bool = arg(False, "start afresh when --out holds an interrupted run of other settings")


@dataclass(frozen=True)
class FinetuneJob(Config):
    """What finetune trains on and where it writes."""

    task: Literal["random-number", "arithmetic"] | None = arg(None, "a ready-made target instead of --prompt/--potential")
    out: str = arg("policy", "folder for the adapter, its training log and plot", path="folder")
    keep_checkpoint: bool = arg(False, "keep the resumable checkpoint (optimizer state, RNG) after training")
    overwrite: bool = arg(False, "start afresh when --out holds an interrupted run of other settings")


@dataclass(frozen=True)
class BoundsJob(Config):
    """Which samplers bounds measures, and where it writes."""

    sampler: tuple[str, ...] = arg((), "NAME=TWIST_DIR, NAME=model:MODEL or NAME=adapter:DIR ('base' is always in)",
                                   repeat=True)
    out: str | None = arg(None, "write the table's rows to this JSONL file", path="file")
    plot: str | None = arg(None, "write the bounds-over-K PNG here", path="file")

    def samplers(self) -> list[tuple[str, str]]:
        out = []
        for spec in self.sampler:
            name, sep, where = spec.partition("=")
            if not sep or not name or not where:
                raise ValueError(f"--sampler takes NAME=TWIST_DIR, NAME=model:MODEL or NAME=adapter:DIR, got {spec!r}")
            out.append((name, where))
        return out


@dataclass(frozen=True)
class BenchConfig(Config):
    """What bench measures."""

    json: bool = arg(False, "print the report as JSON")
    n_particles: int = arg(64, "particles of the SMC-vs-generate legs", low=1)
    new_tokens: int = arg(32, "tokens drawn per particle in those legs", low=1)
    repeats: int = arg(2, "timed rounds of each leg (alternating)", low=1)



@dataclass(frozen=True)
class ScaleJob(Config):
    """Where scale writes, and the learned PRM it reads."""

    out: str = arg("scale", "folder for rows.jsonl (resumed if present), table.md and scale.png", path="folder")
    prm_path: str | None = arg(None, "folder of a learned PRM saved by pilm.train_prm (for --prm learned)",
                               path="twist")
    overwrite: bool = arg(False, "start afresh when --out holds rows of other settings")


@dataclass(frozen=True)
class PRMJob(Config):
    """What train-prm trains on and where it writes."""

    task: Literal["arithmetic-chain"] = arg("arithmetic-chain", "reasoning task whose answers check the rollouts")
    model: str | None = arg(None, "policy model: embedded name (smollm2-135m, the default), hub id or folder")
    problems: int = arg(60, "training problems (none of pilm scale's first 1,000 test problems)", low=1)
    problem_seed: int = arg(1, "seed of the training problems (pilm scale tests on seed 0)")
    operands: tuple[int, int] = arg((3, 5), "fewest and most operands of a training chain (as pilm scale's --operands)",
                                    low=2)
    chat: bool = arg(False, "prompt with the model's chat template, as pilm scale --chat: the PRM reads the hidden "
                            "states of the prompts it was trained on")
    out: str = arg("prm", "folder for the learned PRM (a twist folder: --prm-path of pilm scale)", path="folder")
    overwrite: bool = arg(False, "replace what --out holds when it was trained with other settings")

    TRAINING = ("task", "problems", "problem_seed", "operands", "chat")


@dataclass(frozen=True)
class LatentJob(Config):
    """What latent learns from, where it writes, and which saved run it evaluates."""

    task: Literal["subjectivity"] = arg("subjectivity", "latent-rationale task")
    data: str | None = arg(None, "folder of train.<labels>.jsonl and test.jsonl (default: the SUBJ data shipped "
                           "with pilm), or the hub id SetFit/subj with a network")
    labels: int = arg(10, "labelled training pairs (train.<labels>.jsonl)", low=1)
    model: str | None = arg(None, "model: embedded name (smollm2-135m, the default), hub id or folder")
    e_batch_size: int = arg(8, "rationales per E-step fine-tuning step", low=1)
    e_lr: float = arg(5e-4, "learning rate of the E-step's LoRA (Hu et al.)", low=0, strict=True)
    m_lr: float = arg(1e-4, "learning rate of the M-step's LoRA (Hu et al.)", low=0, strict=True)
    test: str | None = arg(None, "JSONL file to evaluate on (default: the data's test.jsonl)")
    test_limit: int | None = arg(None, "evaluate on the first N test items only")
    vote: Literal["soft", "hard"] = arg("soft", "posterior predictive: mean of p(Y|X,Z), or majority of argmaxes")
    run: str | None = arg(None, "evaluate this saved run (a folder written by pilm latent) instead of training")
    out: str = arg("latent", "folder for the run: adapters, history.jsonl, em.png, predictions.jsonl", path="folder")
    overwrite: bool = arg(False, "replace what --out holds when it was trained with other settings")

    TRAINING = ("task", "data", "labels", "e_batch_size", "e_lr", "m_lr", "test", "test_limit")
    """The settings a trained run depends on (its key; the vote is chosen at evaluation)."""


@dataclass(frozen=True)
class RedTeamJob(Config):
    """Who attacks whom, how the attacker is trained, and where the run is written."""

    method: Literal["gfn+mle", "gfn", "reinforce", "reinforce+novelty", "sft", "icl"] = arg(
        "gfn+mle", "attacker: GFlowNet (TB) then MLE smoothing, GFlowNet only, baselines")
    attacker: str | None = arg(None, "attacker model: embedded name (smollm2-135m, the default), hub id or folder")
    victim: str | None = arg(None, "victim model (default: a second copy of the embedded model)")
    classifier: Literal["profanity", "judge"] = arg("profanity", "C(x, y): alt-profanity-check, or the victim as judge")
    victim_samples: int = arg(5, "victim replies per attack in the reward (E-log over them)", low=1)
    beta: float = arg(0.1, "reward temperature of log C (1/beta)", low=0, strict=True)
    gamma: float = arg(1.0, "temperature of the fluency prior p_ref (1/gamma)", low=0, strict=True)
    steps: int = arg(100, "fine-tuning steps (stage 1, or the baseline's)", low=1)
    batch_size: int = arg(8, "attacks per step", low=1)
    lr: float = arg(5e-4, "learning rate of the attacker's LoRA", low=0, strict=True)
    mle_steps: int = arg(100, "MLE smoothing steps (gfn+mle)", low=1)
    mle_n: int = arg(256, "attacks drawn from stage 1 for the MLE data", low=1)
    threshold: float = arg(0.7, "toxicity an attack needs to enter the MLE data", low=0, high=1)
    n: int = arg(256, "attacks drawn for the evaluation", low=2)
    seed: int = arg(0, "random seed")
    out: str = arg("red-team", "folder for the adapter, report.json and attacks.jsonl (its stage1/ is resumed "
                   "when the stage-1 settings match)", path="folder")
    overwrite: bool = arg(False, "start afresh when --out holds a run of other settings")

    STAGE1 = ("method", "attacker", "classifier", "victim_samples", "beta", "gamma", "steps", "batch_size", "lr", "seed")
    """What the stage-1 attacker depends on, and the method (the folder's key: a rerun that
    changes only the MLE stage or the evaluation reuses stage 1)."""
