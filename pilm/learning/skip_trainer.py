"""Learning the infilling twist by maximum likelihood on the joint (``pilm.train_skip_model``).

For sigma(s | x, e) ∝ p0(s | x) p0(e | x, s) over middles s of T tokens, the optimal twist is
the ending's likelihood across the rest of the middle, psi*_t(s_{1:t}) = p0(e | x, s_{1:t})
(``pilm.potentials.SkipLookahead``). It is a distribution over endings, so it is learned as
one: pairs (s, e) ~ p0(s, e | x) drawn fresh at every step (``pilm.inference.joint``) give,
for every prefix length t, the example "e follows s_{1:t} and T - t filler tokens", and the
skip model q (a LoRA adapter on the model, ``pilm.models.LoRAPolicy``, starting at p0) minimises

    L(q) = - E_{(s, e) ~ p0} sum_{t=1}^{T-1} log q(e | x, s_{1:t}, f^{T-t}) / (tokens of the endings),

whose minimiser over all q is p0(e | x, s_{1:t}) = psi*_t: the expected KL from psi*_t(. ) to
q(. | s_{1:t}) over endings. Unlike contrastive twist learning, no example carries an
importance weight, and every joint draw is a positive for its own ending (Zhao et al. 2024
learn a twist conditioned on the ending from such pairs; here the twist is the ending's model
itself). A middle that ends at EOS gives its prefixes before the EOS. The empty prefix is left
out: SMC scores prefixes of 1 to T - 1 tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..config import SkipTrainingConfig, takes_config
from ..inference.joint import joint_samples
from ..models.adapter import LoRAPolicy
from ..models.device import derived_seed, seeded_generator
from ..models.hf import HFModel
from ..potentials import SkipLookahead, SuffixLikelihood
from ..target import Target
from .fit import Checkpointing, Trained, fit

CONFIG_NAME = "skip_config.json"
C = SkipTrainingConfig  # every default of train_skip_model is its config's


class SkipModel:
    """q(e | x, s_{1:t}, f^{T-t}): a LoRA adapter ``lm`` on the model (module docstring), trained
    for ``prompt_ids`` and middles of ``horizon`` tokens, with filler token id ``filler``."""

    def __init__(self, lm: LoRAPolicy, prompt_ids: Sequence[int], horizon: int, filler: int):
        self.lm, self.prompt_ids, self.horizon, self.filler = lm, tuple(prompt_ids), horizon, filler

    def lookahead(self, target: Target) -> Target:
        """The infilling ``target`` (a ``SuffixLikelihood`` potential, the prompt and horizon this
        model was trained for) with this model's prefix score: its potential becomes a
        ``SkipLookahead``; phi, hence Z and sigma, are unchanged."""
        suffix = target.potential
        if not isinstance(suffix, SuffixLikelihood):
            raise ValueError("the skip model looks ahead for an infilling target, whose potential is a "
                             f"SuffixLikelihood; got {suffix!r}")
        if target.max_new_tokens != self.horizon or tuple(target.prompt_ids) != self.prompt_ids:
            raise ValueError(f"the skip model was trained for middles of {self.horizon} tokens after its own prompt; "
                             f"this target has {target.max_new_tokens} tokens after "
                             f"{target.model.decode(list(target.prompt_ids))!r}")
        return dataclasses.replace(target, potential=SkipLookahead(suffix, self.lm, self.horizon, self.filler))

    def save_pretrained(self, directory: str | Path) -> Path:
        """The adapter (peft's format) and ``skip_config.json`` (prompt, horizon, filler) in ``directory``."""
        directory = self.lm.save_pretrained(directory)
        (directory / CONFIG_NAME).write_text(json.dumps({"prompt_ids": list(self.prompt_ids), "horizon": self.horizon,
                                                         "filler": self.filler, "model_name": self.lm.base.name}))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: HFModel) -> SkipModel:
        """A skip model saved by ``save_pretrained``, on ``model`` (the model it adapts)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory} holds no skip model ({CONFIG_NAME} is missing)")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        return cls(LoRAPolicy.from_pretrained(model, directory), cfg["prompt_ids"], cfg["horizon"], cfg["filler"])

    def log_likelihood(self, prompt_ids: Sequence[int], prefixes: Sequence[Sequence[int]],
                       endings: Sequence[Sequence[int]]) -> Tensor:
        """log q(e_i | x, prefix_i, f^{T - |prefix_i|}) per row, with gradients through the adapter:
        one teacher-forced forward (endings right-padded)."""
        if any(len(p) > self.horizon for p in prefixes):
            raise ValueError(f"a prefix is longer than the horizon of {self.horizon} tokens")
        length = max(map(len, endings))
        rows = [list(p) + [self.filler] * (self.horizon - len(p)) + list(e) + [-1] * (length - len(e))
                for p, e in zip(prefixes, endings, strict=True)]
        tokens = torch.tensor(rows, device=self.lm.device)
        ending = tokens[:, self.horizon:]
        logprobs = self.lm.prefix_logprobs(prompt_ids, tokens)[:, self.horizon: self.horizon + length]
        picked = logprobs.gather(2, ending.clamp(min=0)[:, :, None]).squeeze(2)
        return picked.masked_fill(ending < 0, 0.0).sum(1)


@takes_config(SkipTrainingConfig)
def train_skip_model(model: HFModel, prompt: str | Sequence[int], *, max_new_tokens: int,
                     suffix_tokens: int = C.suffix_tokens, steps: int = C.steps, batch_size: int = C.batch_size,
                     lr: float = C.lr, rank: int = C.rank, filler: str = C.filler, seed: int = C.seed,
                     grad_clip: float | None = 1.0, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 25,
                     overwrite: bool = False, log_path: str | Path | None = None, progress: bool = True) -> Trained:
    """Fit the skip model of infilling ``prompt`` (middles of ``max_new_tokens``, endings of
    ``suffix_tokens``) for ``steps`` steps of ``batch_size`` fresh joint draws each (module
    docstring); ``filler``'s last token stands for the tokens still to come. Resumable from
    ``checkpoint_dir`` (``overwrite``: start afresh over a checkpoint of other settings);
    ``config=`` a ``SkipTrainingConfig`` gives the settings at once. Returns ``Trained`` with
    ``model`` the ``SkipModel``; each record has
    the step's ``loss`` (nats per ending token) and ``log_q`` (mean log q of an ending; an
    ending cut short by EOS counts its tokens up to it)."""
    for name, value in (("max_new_tokens", max_new_tokens), ("suffix_tokens", suffix_tokens), ("steps", steps),
                        ("batch_size", batch_size), ("rank", rank)):
        least = {"steps": 0, "max_new_tokens": 2}.get(name, 1)  # a middle of 1 token has no prefix to look ahead from
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not isinstance(model, HFModel) or isinstance(model, LoRAPolicy):
        raise TypeError("train_skip_model adapts a transformers model (pilm.load_model's), not "
                        f"{type(model).__name__}")
    prompt_ids = list(model.encode_prompt(prompt))
    fill = model.encode(filler)
    if not fill:
        raise ValueError(f"filler {filler!r} encodes to no token")
    with torch.random.fork_rng(devices=[]):  # the adapter's random init follows ``seed``, not the global stream
        torch.manual_seed(seed)
        lm = LoRAPolicy(model, rank=rank, alpha=2 * rank, dropout=0.0)
    skip = SkipModel(lm, prompt_ids, max_new_tokens, fill[-1])
    optimizer = torch.optim.AdamW(list(skip.lm.trainable.values()), lr=lr)
    key = {"model": model.name, "dtype": model.dtype_name, "prompt": prompt_ids, "max_new_tokens": max_new_tokens,
           "suffix_tokens": suffix_tokens, "batch_size": batch_size, "lr": lr, "rank": rank, "filler": fill[-1],
           "seed": seed, "grad_clip": grad_clip}

    def step(i: int, update) -> dict:
        with torch.no_grad():
            pairs = joint_samples(model, prompt_ids, max_new_tokens=max_new_tokens, suffix_tokens=suffix_tokens,
                                  n=batch_size, seed=derived_seed(seed, i + 1))
        # t = 1 .. |m| - 1: the prefixes SMC scores (none is empty; none holds a middle's EOS, nor is whole)
        prefixes = [m[:t] for m, _ in pairs for t in range(1, len(m))]
        endings = [e for m, e in pairs for _ in range(1, len(m))]
        if not prefixes:  # every middle ended at its first token: nothing to learn from this draw
            return {"loss": float("nan"), "log_q": float("nan"), "examples": 0,
                    "lm_tokens": sum(len(m) + len(e) for m, e in pairs)}
        log_q = skip.log_likelihood(prompt_ids, prefixes, endings)  # no dropout anywhere: the model stays in eval mode
        loss = -log_q.sum() / sum(map(len, endings))
        update(loss)
        return {"loss": float(loss.detach()), "log_q": float(log_q.detach().mean()), "examples": len(prefixes),
                "lm_tokens": sum(len(m) + len(e) for m, e in pairs)}

    history = fit(skip.lm.trainable, optimizer, step, steps=steps, name="train-skip", grad_clip=grad_clip,
                  generator=seeded_generator(seed, "cpu"),
                  checkpoint=Checkpointing(checkpoint_dir, key, checkpoint_every, overwrite), log_path=log_path,
                  progress=progress, show=("loss",))
    return Trained(skip, history)

