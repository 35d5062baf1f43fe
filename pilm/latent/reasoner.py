"""Reasoning as a latent variable: amortised posteriors over rationales, the posterior
predictive, and variational EM (Hu et al. ICLR 2024, §4.3).

With the latent model of ``pilm.latent.model`` (prior p(Z | X), likelihood p(Y | X, Z)):

* **E-step** ``e_step``: fine-tune the LM into q(Z | X) ≈ p(Z | X, Y) ∝ p(Z | X) p(Y | X, Z)
  on the labelled pairs with ``pilm.finetune`` (SubTB by default: q stays a distribution,
  not a mode seeker); reward log p(Z | X) + log p(Y | X, Z), policy conditioned on X only,
  so one q serves every X, labelled or not.
* **M-step** ``m_step``: a LoRA on the likelihood maximises
  E_{(X, Y)} E_{Z ~ q(.|X)} log p(Y | X, Z) (label-normalised); the prior stays the base.
* **EM** ``em``: alternate; each E-step re-fits q under the current likelihood. The ELBO
  E_q[log p(Z | X) + log p(Y | X, Z) - log q(Z | X)] <= log p(Y | X) is recorded per round.
* **Posterior predictive** ``predict``: p(Y | X) ≈ sum_Z q(Z | X) p(Y | X, Z) from k
  rationales per X: ``vote="soft"`` averages p(Y | X, Z) over them (the Monte Carlo
  estimate of the sum), ``"hard"`` takes the majority of each rationale's argmax (the
  authors' evaluation). Every test X is sampled and scored in shared batches.
* **Baselines** on the same model: ``direct`` (zero-shot, or few-shot with labelled
  demonstrations in the prompt), ``fit_direct`` (supervised LoRA on the labels alone), and
  chain-of-thought prompting with a vote (``predict`` with q = the prior).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm

from ..config import LatentConfig
from ..inference.smc import run_smc
from ..learning import Trained, finetune, fit
from ..learning.rollout import sample_many
from ..models.adapter import LoRAPolicy
from ..models.base import LanguageModel, Trainable
from ..models.device import seeded_generator
from ..models.hf import HFModel
from ..models.tabular import TabularLM, TabularPolicy
from ..proposals import ModelProposal
from .model import Example, LatentModel, all_bodies, label_logprobs, label_logprobs_grad
from .prediction import Prediction, make_prediction, vote_for

C = LatentConfig  # em's defaults


@dataclass
class EMResult:
    """The posterior q and likelihood after the last round, and one record per E or M step:
    its round, which step, the ELBO and IWAE bound on the training labels, test accuracy
    (hard and soft vote; when a test set was given) and seconds; ``prediction``: the last
    step's test prediction (hard vote; ``revote("soft")`` for the other), or None."""

    posterior: LanguageModel | None  # None only after zero rounds
    likelihood: LanguageModel
    history: list[dict] = field(default_factory=list)
    prediction: Prediction | None = None


class LatentReasoner:
    """The verbs of latent-rationale inference on one model and template (see the module
    docstring). ``model`` is the base LM: the prior, and the likelihood until an M-step.
    ``separator`` follows each labelled demonstration of the few-shot baseline."""

    def __init__(self, model: LanguageModel, *, template: str | None = None, labels: Sequence[str],
                 rationale_tokens: tuple[int, int] = (1, 5), separator: str = "\n", prompt: str | None = None):
        template = template if template is not None else prompt  # ``prompt=``: the same template
        if template is None:
            raise ValueError("give the template (with {x}, {z} and {y} slots) as template= (or prompt=)")
        self.model, self.separator = model, separator
        self.latent = LatentModel(model, template, labels, rationale_tokens=rationale_tokens)

    # -- learning ------------------------------------------------------------------------
    def e_step(self, train: Sequence[Example], *, likelihood: LanguageModel | None = None,
               objective: str = "subtb", steps: int = C.e_steps, policy: LanguageModel | None = None,
               **finetune_kwargs) -> Trained:
        """q(Z | X) ≈ p(Z | X, Y) for every labelled pair, by ``pilm.finetune`` (step i trains
        on pair i mod n); ``policy`` continues a previous q. Returns ``finetune``'s ``Trained``
        (the policy is its ``.model``). Other keywords go to ``finetune``."""
        targets = [self.latent.posterior(ex, likelihood) for ex in self.latent.checked(train)]
        return finetune(targets, objective, steps=steps, policy=policy, **finetune_kwargs)

    def m_step(self, train: Sequence[Example], posterior: LanguageModel | None, *, steps: int = C.m_steps,
               samples: int = C.m_samples, batch_size: int = 8, lr: float = 1e-4, likelihood: LanguageModel | None = None,
               seed: int = 0, lora_rank: int = 64, lora_alpha: int = 16, progress: bool = True) -> Trained:
        """A likelihood fitted to (X, Z, Y) with Z ~ q(. | X) (``samples`` per pair, drawn once
        in one batched decode; ``posterior=None``: the prior): ``steps`` AdamW steps on
        -log p(Y | X, Z) over mini-batches of ``batch_size``. ``likelihood`` continues a
        previous one; otherwise a fresh LoRA on the base (free label logits on a table). Returns a
        ``Trained`` (the likelihood is its ``.model``)."""
        train = self.latent.checked(train)
        g = seeded_generator(seed, self.model.device)  # draws rationales on the model's device
        zs = self.rationales(posterior, [ex.x for ex in train], samples, g)
        pairs = [(self.latent.context(self.latent.prefix_ids(ex.x), z), self.latent.index(ex.y))
                 for ex, rows in zip(train, zs, strict=True) for z in rows]
        if likelihood is None:  # a table gets a free logit vector on every context a rationale can make
            contexts = [c for c, _ in pairs] if not isinstance(self.model, TabularLM) else [
                self.latent.context(self.latent.prefix_ids(ex.x), z) for ex in train
                for z in all_bodies(self.model.vocab_size, self.latent.stop_id, self.latent.max_tokens)]
            likelihood = self._new_likelihood(contexts, seed, lora_rank, lora_alpha)
        return self._fit(likelihood, pairs, steps, batch_size, lr, g, "m_step", progress)

    def fit_direct(self, train: Sequence[Example], *, steps: int = 100, batch_size: int = 8, lr: float = 1e-4,
                   seed: int = 0, shots: Sequence[Example] = (), lora_rank: int = 64,
                   lora_alpha: int = 16, progress: bool = True) -> Trained:
        """Supervised fine-tuning on the labels alone (the direct form, no rationale): a
        fresh LoRA maximising log p(Y | X). Returns a ``Trained`` (the likelihood is its ``.model``)."""
        train = self.latent.checked(train)
        pairs = [(self._direct_context(ex.x, shots), self.latent.index(ex.y)) for ex in train]
        lik = self._new_likelihood([c for c, _ in pairs], seed, lora_rank, lora_alpha)
        return self._fit(lik, pairs, steps, batch_size, lr, seeded_generator(seed, self.model.device), "sft", progress)

    def em(self, train: Sequence[Example], *, rounds: int = C.rounds, e_steps: int = C.e_steps,
           m_steps: int = C.m_steps, m_samples: int = C.m_samples, test: Sequence[Example] | None = None,
           samples: int = C.samples, seed: int = C.seed,
           e_kwargs: dict | None = None, m_kwargs: dict | None = None, progress: bool = True) -> EMResult:
        """Variational EM: ``rounds`` times an E-step (q continues from the last round, under
        the current likelihood) then an M-step (the likelihood continues too). After each
        step the ELBO and IWAE bound on the training labels (``samples`` rationales per
        pair) and, with ``test``, the posterior-predictive accuracy are recorded."""
        train = self.latent.checked(train)
        q: LanguageModel | None = None
        lik: LanguageModel | None = None
        history: list[dict] = []
        pred = None
        for r in range(1, rounds + 1):
            for step in ("E", "M"):
                t0 = time.perf_counter()
                if step == "E":
                    q = self.e_step(train, likelihood=lik, steps=e_steps, policy=q, seed=seed + r,
                                    progress=progress, **(e_kwargs or {})).model
                else:
                    lik = self.m_step(train, q, steps=m_steps, samples=m_samples, likelihood=lik, seed=seed + r,
                                      progress=progress, **(m_kwargs or {})).model
                record = {"round": r, "step": step, "train_seconds": time.perf_counter() - t0,
                          **self.elbo(train, q, lik, samples=samples, seed=seed)}
                if test is not None:
                    pred = self.predict(test, q, lik, samples=samples, vote="hard", seed=seed, progress=progress)
                    record.update(accuracy_hard=pred.accuracy, accuracy_soft=pred.revote("soft").accuracy)
                history.append(record)
        return EMResult(q, lik if lik is not None else self.model, history, pred)

    # -- measuring -----------------------------------------------------------------------
    def elbo(self, data: Sequence[Example], posterior: LanguageModel | None, likelihood: LanguageModel | None = None,
             *, samples: int = 10, seed: int = 0) -> dict:
        """Mean over the pairs of the ELBO E_q[log p(Z|X) p(Y|X,Z) / q(Z|X)] and of the
        IWAE bound log (1/k) sum_k p(Z_k|X) p(Y|X,Z_k) / q(Z_k|X), both <= log p(Y | X):
        importance sampling with q as the proposal, all pairs in one batched run. A rationale
        shorter than ``min_tokens`` has likelihood 0, which makes the true ELBO -inf whenever q
        puts mass there: ``elbo`` averages the others, and ``short`` is their fraction."""
        data = self.latent.checked(data)
        targets = [self.latent.posterior(ex, likelihood) for ex in data]
        g = seeded_generator(seed, self.model.device)
        proposal = None if posterior is None else ModelProposal(posterior)
        results = run_smc(targets, samples, g, proposal=proposal, ess_threshold=0.0, on_extinction="return")
        w = torch.tensor([r.log_weights for r in results], dtype=torch.float64)
        ok = torch.isfinite(w)
        return {"elbo": float(w[ok].mean()) if ok.any() else -math.inf,
                "iwae": float(torch.logsumexp(w, 1).sub(math.log(samples)).mean()),
                "short": float(1 - ok.double().mean())}

    def predict(self, test: Sequence[Example] | Sequence[str], posterior: LanguageModel | None = None,
                likelihood: LanguageModel | None = None, *, samples: int = 10, vote: str = "soft", seed: int = 0,
                rows: int = 256, progress: bool = True) -> Prediction:
        """The posterior predictive with ``samples`` rationales per item from ``posterior``
        (None: the prior, i.e. chain-of-thought prompting), scored by ``likelihood`` (None:
        the base); ``vote`` soft or hard (module docstring). ``test``: examples, or bare
        texts (no accuracy). Items are sampled ``rows // samples`` at a time in one batch."""
        vote_for(torch.zeros(1, 1), torch.zeros(1, 1), vote)  # checked before any work
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        t0 = time.perf_counter()
        items = self.latent.items(test)
        lat, lik = self.latent, likelihood or self.model
        g = seeded_generator(seed, self.model.device)
        probs, votes, shown, each = [], [], [], []
        per = max(1, rows // samples)
        for lo in tqdm(range(0, len(items), per), desc="latent predict", unit="block", disable=not progress,
                       leave=False):
            block = items[lo:lo + per]
            prefixes = [lat.prefix_ids(ex.x) for ex in block]
            zs = self.rationales(posterior, [ex.x for ex in block], samples, g)
            contexts = [lat.context(p, z) for p, rows_ in zip(prefixes, zs, strict=True) for z in rows_]
            scored: dict[tuple[int, ...], torch.Tensor] = {}
            for i in range(len(block)):  # one X's rationales share its prefix: scored in one call
                unique = list(dict.fromkeys(map(tuple, contexts[i * samples:(i + 1) * samples])))
                scored.update(zip(unique, label_logprobs(lik, unique, lat.label_ids).exp()))
            p = torch.stack([scored[tuple(c)] for c in contexts]).view(len(block), samples, -1)
            short = torch.tensor([[len(lat.body(z)) < lat.min_tokens for z in r] for r in zs])
            p = p.masked_fill(short[..., None], 0.0)  # a too-short rationale has likelihood 0
            probs.append(p.sum(1) / samples)
            each.append(p)
            votes.append(torch.nn.functional.one_hot(p.argmax(-1), len(lat.labels)).masked_fill(
                short[..., None], 0).sum(1))
            shown += [lat.model.decode(lat.body(r[0])) for r in zs]
        probs_t, votes_t = torch.cat(probs), torch.cat(votes)
        pred = make_prediction(lat, items, vote_for(probs_t, votes_t, vote), probs_t, votes_t.tolist(), shown, t0)
        pred.per_rationale = torch.cat(each).tolist()
        return pred

    def direct(self, test: Sequence[Example] | Sequence[str], likelihood: LanguageModel | None = None, *,
               shots: Sequence[Example] = ()) -> Prediction:
        """The direct form, no rationale: zero-shot, or few-shot with ``shots`` (labelled
        examples written by the template before the item), scored by ``likelihood``."""
        t0 = time.perf_counter()
        items = self.latent.items(test)
        shots = self.latent.checked(shots) if shots else ()
        contexts = [self._direct_context(ex.x, shots) for ex in items]
        probs = label_logprobs(likelihood or self.model, contexts, self.latent.label_ids).exp()
        return make_prediction(self.latent, items, probs.argmax(-1), probs, [], [""] * len(items), t0)

    def rationales(self, posterior: LanguageModel | None, xs: Sequence[str], k: int,
                   generator: torch.Generator) -> list[list[list[int]]]:
        """k rationales Z ~ q(. | X) per X (``posterior=None``: the prior), in one batched
        decode: a list per X of token lists (the stop token kept where Z reached it)."""
        lat = self.latent
        drawn = sample_many(posterior or self.model, [lat.prefix_ids(x) for x in xs], k, generator,
                            horizon=lat.max_tokens, stop=lat.stop_id)
        rows = [[t for t in r if t >= 0] for r in drawn.tolist()]
        return [rows[i * k:(i + 1) * k] for i in range(len(xs))]

    # -- saving --------------------------------------------------------------------------
    def save(self, directory: str | Path, posterior: LanguageModel | None = None,
             likelihood: LanguageModel | None = None) -> Path:
        """The run in ``directory``: ``latent.json`` (template, labels, rationale length,
        model) and the adapters in peft format (``posterior/``, ``likelihood/``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lat = self.latent
        (directory / "latent.json").write_text(json.dumps(
            {"template": lat.template, "labels": list(lat.labels), "rationale_tokens": [lat.min_tokens, lat.max_tokens],
             "model": self.model.name}, indent=1))
        for name, m in (("posterior", posterior), ("likelihood", likelihood)):
            if m is not None and m is not self.model:
                cast(Trainable, m).save_pretrained(directory / name)
        return directory

    @classmethod
    def load(cls, model: HFModel, directory: str | Path) -> tuple[LatentReasoner, LanguageModel | None,
                                                                 LanguageModel | None]:
        """A saved run on ``model``: the reasoner, its posterior and its likelihood (None
        where the run kept the base)."""
        directory = Path(directory)
        if not (directory / "latent.json").exists():
            raise FileNotFoundError(f"{directory} holds no saved latent run (latent.json is missing)")
        cfg = json.loads((directory / "latent.json").read_text())
        reasoner = cls(model, template=cfg["template"], labels=cfg["labels"],
                       rationale_tokens=tuple(cfg["rationale_tokens"]))
        parts = [LoRAPolicy.from_pretrained(model, directory / name, adapter_name=f"{name}{id(reasoner)}")
                 if (directory / name).exists() else None for name in ("posterior", "likelihood")]
        return reasoner, parts[0], parts[1]

    # -- internals -----------------------------------------------------------------------
    def _direct_context(self, x: str, shots: Sequence[Example]) -> list[int]:
        lat = self.latent
        if not shots:
            return lat.prefix_ids(x)
        head = lat.template.split("{z}")[0]
        tail = lat.template.split("{y}")[1]
        space = lat.template.split("{y}")[0].split("{z}")[1]
        space = space[len(space.rstrip()):]
        demos = "".join(head.replace("{x}", s.x) + space + s.y + tail + self.separator for s in shots)
        return self.model.encode_prompt(demos + head.replace("{x}", x))

    def _new_likelihood(self, contexts: Sequence[Sequence[int]], seed: int, rank: int, alpha: int) -> LanguageModel:
        model = self.model
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if isinstance(model, HFModel):
                return LoRAPolicy(model, rank=rank, alpha=alpha, dropout=0.0, adapter_name=None)
        if isinstance(model, TabularLM):
            width = max(map(len, self.latent.label_ids))
            return TabularPolicy(model, [tuple(c) for c in contexts], width, stop=-1)
        raise TypeError(f"cannot fit a likelihood on a {type(model).__name__}")

    def _fit(self, lik: LanguageModel, pairs: list[tuple[list[int], int]], steps: int, batch_size: int, lr: float,
             g: torch.Generator, name: str, progress: bool) -> Trained:
        label_ids = self.latent.label_ids

        def step(_: int, update) -> dict:
            pick = torch.randint(len(pairs), (min(batch_size, len(pairs)),), generator=g, device=g.device).tolist()
            loss = -torch.stack([label_logprobs_grad(lik, pairs[i][0], label_ids)[pairs[i][1]] for i in pick]).mean()
            update(loss)
            return {"loss": loss.item()}

        trainable = cast(Trainable, lik)  # a LoRA or tabular likelihood
        trainable.train(True)
        optimizer = torch.optim.AdamW(list(trainable.trainable.parameters()), lr=lr, weight_decay=0.0)
        history = fit(trainable.trainable, optimizer, step, steps=steps, name=f"latent {name}", grad_clip=1.0,
                      progress=progress)
        trainable.train(False)
        return Trained(lik, history)
