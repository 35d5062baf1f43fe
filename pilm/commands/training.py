"""The commands that train (train-twist, train-skip, finetune, train-prm, latent, red-team), and the target
every command builds from its flags."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ..config import (
    FinetuneConfig,
    LatentConfig,
    PRMTrainingConfig,
    ScaleConfig,
    SkipTrainingConfig,
    TargetConfig,
    TwistTrainingConfig,
)
from .cli_messages import RESUMABLE, note
from .jobs import FinetuneJob, LatentJob, PRMJob, RedTeamJob, SkipJob, TwistOutput

if TYPE_CHECKING:
    from ..target import Target


def target_from_flags(tc: TargetConfig):
    from .. import load_model
    from ..potentials import RolloutLookahead
    from ..potentials.spec import parse_potential
    from ..target import Target

    model = load_model(tc.model)
    if not tc.prompt:
        note("no --prompt: completions start from the model's BOS token alone")
    if not tc.potential:
        note("no --potential: phi = 1, so this is plain sampling from the model (Z = 1)")
    potential = None
    for p in (parse_potential(spec, model, lookahead=tc.lookahead) for spec in tc.potential):
        potential = p if potential is None else potential * p
    if tc.rollouts and potential is not None:
        potential = RolloutLookahead(potential, tc.max_new_tokens, tc.rollouts)
    return Target(model, tc.prompt, potential, max_new_tokens=tc.max_new_tokens, chat=tc.chat)


def run_train_skip(cfg: SkipTrainingConfig, job: SkipJob) -> int:
    from dataclasses import asdict

    from .. import load_model, train_skip_model

    model = load_model(job.model)
    folder = Path(job.out)
    trained = train_skip_model(model, job.prompt, max_new_tokens=job.max_new_tokens, config=cfg,  # type: ignore[call-arg]
                               checkpoint_dir=folder / "checkpoint", overwrite=job.overwrite,
                               log_path=folder / "train.jsonl", progress=True)
    trained.model.save_pretrained(folder)
    if not job.keep_checkpoint:
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    last = trained.history[-1] if trained.history else None
    (folder / "training.json").write_text(json.dumps({**asdict(cfg), "max_new_tokens": job.max_new_tokens,
                                                      "final_loss": last["loss"] if last else None}, indent=1))
    print(f"trained a skip model for {cfg.steps} steps of {cfg.batch_size} joint draws"
          + (f": final loss {last['loss']:.4g} nats per ending token" if last else " (untrained: it scores as p0 does)"))
    print(f"wrote {folder} ({size_of(folder)}); use: pilm sample --prompt {shlex.quote(job.prompt)} --max-new-tokens "
          f"{job.max_new_tokens} --potential suffix:ENDING --skip {shlex.quote(str(folder))}")
    return 0


def run_train_twist(tc: TargetConfig, cfg: TwistTrainingConfig, out: TwistOutput) -> int:
    from .. import train_twist

    target = target_from_flags(tc)
    folder = Path(out.out)
    trained = train_twist(target, config=cfg, **_outputs(folder, out.overwrite))  # type: ignore[call-arg]  # @takes_config
    last = _save(trained, folder, out.keep_checkpoint)
    kind = f"{cfg.head} twist" if cfg.residual is None else f"residual {cfg.head} twist on the look-ahead"
    print(f"trained a {kind} with {cfg.objective} for {cfg.steps} steps: "
          f"final loss {last['loss']:.4g}, batch ESS {last['ess']:.1f}/{cfg.batch_size}")
    same = "" if cfg.residual is None else " (with the same --potential and --lookahead: it adds to their prefix score)"
    print(f"wrote {folder} ({size_of(folder)}: twist, train.jsonl, training.png"
          f"{', checkpoint' if out.keep_checkpoint else ''}); use: pilm sample ... --twist {folder}{same}")
    return 0


def _outputs(folder: Path, overwrite: bool) -> dict:
    """Where a trainer keeps its resumable checkpoint, its JSONL log and its curves."""
    return {"checkpoint_dir": folder / "checkpoint", "overwrite": overwrite, "log_path": folder / "train.jsonl",
            "plot_path": folder / "training.png"}


def _save(trained, folder: Path, keep_checkpoint: bool) -> dict:
    """Save what was trained (a ``Trained``'s model) in ``folder``, drop its checkpoint unless
    kept; its last history row."""
    trained.model.save_pretrained(folder)
    if not keep_checkpoint:
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return trained.history[-1]


def run_finetune(tc: TargetConfig, cfg: FinetuneConfig, job: FinetuneJob) -> int:
    from .. import finetune, load_model
    from ..tasks import arithmetic, random_number

    data = tool = None
    target: Target | list[Target]
    if job.task == "random-number":
        target = random_number(load_model(tc.model), max_new_tokens=None)
    elif job.task == "arithmetic":  # 10 worked questions (SFT's data, SubTB's replay) and 40 with answers only
        target, data, tool = arithmetic.training_set(load_model(tc.model), seed=cfg.seed)
    else:
        target = target_from_flags(tc)
    folder = Path(job.out)
    # config= comes from @takes_config (pilm.config), which finetune's own signature does not show
    trained = finetune(target, config=cfg, **_outputs(folder, job.overwrite), data=data, tool=tool)  # type: ignore[call-arg]
    last = _save(trained, folder, job.keep_checkpoint)
    print(f"fine-tuned a rank-{cfg.lora_rank} LoRA policy with {cfg.objective} for {cfg.steps} steps: "
          f"final loss {last['loss']:.4g}, mean log R {last['log_r']:.3g}")
    print(f"wrote {folder} ({size_of(folder)}); load with pilm.load_model(..., adapter={str(folder)!r}) "
          f"or: pilm bounds ... --sampler NAME=adapter:{folder}")
    return 0


HELD_OUT = 1_000
"""train-prm leaves out pilm scale's first ``HELD_OUT`` problems of seed 0 with the same operands
(fewer where there are not that many more than it trains on), and records the questions it
trained on, which pilm scale refuses to evaluate on."""

COLLECTION = RESUMABLE["train-prm"]
"""Where train-prm keeps its chains and Monte Carlo labels while it collects them (removed once
the head is saved): an interrupted run, rerun with the same settings, resumes them."""


def run_train_prm(cfg: PRMTrainingConfig, job: PRMJob) -> int:
    import json
    from dataclasses import asdict

    from .. import load_model, train_prm
    from ..learning.prm_trainer import discard_collection
    from ..tasks import arithmetic_chain as task

    operands = (job.operands[0], job.operands[1])
    held = max(0, min(HELD_OUT, task.distinct(operands) - job.problems))  # chains of few operands are few
    test = {p["question"] for p in task.problems(held, operands, seed=ScaleConfig.seed)}
    train = [p for p in task.problems(job.problems + len(test), operands, seed=job.problem_seed)
             if p["question"] not in test][: job.problems]
    model = load_model(job.model)
    claim_out(job, model, {**asdict(cfg), **{k: getattr(job, k) for k in PRMJob.TRAINING}})
    targets = [task.target(model, p["question"], chat=job.chat) for p in train]
    collection = Path(job.out, COLLECTION)  # the chains and rollouts so far: a rerun resumes them (--overwrite
    # too, where only the head's settings changed: the collection does not depend on them)
    prm = train_prm(targets, verifier=task.answer_checker(), config=cfg,  # type: ignore[call-arg]  # @takes_config
                    checkpoint=collection, overwrite=job.overwrite)
    folder = prm.model.save_pretrained(job.out)
    report = {**prm.extras, "problems": len(train), "steps": cfg.steps, "final_loss": prm.history[-1]["loss"],
              "task": job.task, "operands": list(operands), "chat": job.chat, "questions": [p["question"] for p in train]}
    (folder / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    discard_collection(collection)  # the head and its report are saved: what it was fitted to is not kept
    print(f"learned a {cfg.head} value head from {report['step_ends']} step ends (mean label "
          f"{report['mean_label']:.3f}; rollouts {report['data_seconds']:.0f} s, fit {report['fit_seconds']:.0f} s)")
    print(f"wrote {folder} ({size_of(folder)}); use: pilm scale --prm learned --prm-path {folder}")
    return 0


def run_latent(cfg: LatentConfig, job: LatentJob) -> int:
    from dataclasses import asdict

    from .. import load_model
    from ..latent import LatentReasoner
    from ..latent.plots import plot_em
    from ..tasks import subjectivity

    out = Path(job.out)
    if job.run is not None:  # evaluate a saved run
        if not Path(job.run, "latent.json").exists():
            raise ValueError(f"--run: {job.run} holds no saved latent run (latent.json is missing); "
                             f"make one with: pilm latent --out {job.run}")
        labels = json.loads(Path(job.run, "latent.json").read_text())["labels"]
        test = subjectivity.load_test(job.test or job.data, labels)
        reasoner, q, lik = LatentReasoner.load(load_model(job.model), job.run)
        history, pred = [], None
    else:
        data = subjectivity.load(job.data, job.labels, test=job.test)
        test = data.test
        model = load_model(job.model)
        claim_out(job, model, {**asdict(cfg), **{k: getattr(job, k) for k in LatentJob.TRAINING}})
        reasoner = subjectivity.reasoner(model)
        result = reasoner.em(data.train, **asdict(cfg), test=test[:job.test_limit] if job.test_limit else test,
                             e_kwargs={"batch_size": job.e_batch_size, "lr": job.e_lr, "reward_temperature": (1.2, 1.0)},
                             m_kwargs={"lr": job.m_lr})
        q, lik, history, pred = result.posterior, result.likelihood, result.history, result.prediction
        reasoner.save(out, q, lik)
        with open(out / "history.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        plot_em(history, out / "em.png")
    test = test[:job.test_limit] if job.test_limit else test
    # the last EM step already predicted the test items with this q and likelihood: re-vote, not re-sample
    pred = pred.revote(job.vote) if pred is not None else reasoner.predict(test, q, lik, samples=cfg.samples,
                                                                            vote=job.vote, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for ex, label, probs, z in zip(test, pred.labels, pred.probs, pred.rationales, strict=True):
            f.write(json.dumps({"text": ex.x, "label_text": ex.y, "predicted": label, "probs": probs,
                                "rationale": z}) + "\n")
    for h in history:
        print(f"round {h['round']} {h['step']}-step: ELBO {h['elbo']:.3f}, IWAE {h['iwae']:.3f}, test accuracy "
              f"{100 * h['accuracy_hard']:.1f}% (hard) / {100 * h['accuracy_soft']:.1f}% (soft), "
              f"{h['train_seconds']:.0f} s")
    lo, hi = cast("tuple[float, float]", pred.ci)  # the test items are labelled
    print(f"test accuracy ({job.vote} vote, {cfg.samples} rationales) on {len(test)} items: "
          f"{100 * cast(float, pred.accuracy):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
    print(f"wrote {out} (predictions.jsonl{'' if job.run else ', history.jsonl, em.png, posterior/, likelihood/'}); "
          f"evaluate on other sentences: pilm latent --run {job.run or out} --test FILE.jsonl --out DIR")
    return 0


def run_red_team(job: RedTeamJob) -> int:
    from dataclasses import asdict

    from .. import load_model
    from ..tasks.redteam import red_teaming, train_attacker

    attacker = load_model(job.attacker)
    rt = red_teaming(attacker, load_model(job.victim), classifier=job.classifier, victim_samples=job.victim_samples,
                     beta=job.beta, gamma=job.gamma, seed=job.seed)
    out = Path(job.out)
    if job.overwrite:
        shutil.rmtree(out / "stage1", ignore_errors=True)
    claim_out(job, attacker, {k: getattr(job, k) for k in RedTeamJob.STAGE1} | {"victim_model": rt.victim.name})
    trained = train_attacker(rt, job.method, steps=job.steps, batch_size=job.batch_size, lr=job.lr, seed=job.seed,
                            mle_steps=job.mle_steps, mle_n=job.mle_n, threshold=job.threshold,
                            stage1_dir=out / "stage1" if job.method == "gfn+mle" else None)
    policy = None if trained is None else trained.model
    if policy is not None:
        policy.save_pretrained(out)
    report = rt.evaluate(policy, job.n, seed=job.seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": job.method, "rate": report.rate, "diversity": report.diversity, "distinct": report.distinct,
               "n": len(report.attacks), "settings": asdict(job)}
    (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    tox = report.toxicity[rt.victim.name]
    with open(out / "attacks.jsonl", "w") as f:
        f.writelines(json.dumps({"attack": x, "toxicity": c, "log_p_ref": lp}) + "\n"
                     for x, c, lp in zip(report.attacks, tox, report.log_p_ref, strict=True))
    print(f"{job.method}: toxicity rate {100 * report.rate[rt.victim.name]:.1f}% against {rt.victim.name}, "
          f"diversity (mean MiniLM cosine) {report.diversity:.3f}, {report.distinct} distinct of {len(report.attacks)}")
    print(f"wrote {out} (report.json, attacks.jsonl{', adapter' if policy is not None else ''})")
    return 0


def claim_out(job, model, settings: dict) -> None:
    """Key ``job.out`` to these settings and the model (``pilm.learning.checkpoint.claim``):
    another run's folder is refused unless ``--overwrite``."""
    from ..learning.checkpoint import RUN, claim

    if job.overwrite:
        Path(job.out, RUN).unlink(missing_ok=True)
    claim(job.out, json.loads(json.dumps({**settings, "model": model.name, "dtype": model.dtype_name})))


def size_of(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{total / 2**20:.1f} MB"
