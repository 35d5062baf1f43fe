"""Learned twist heads on the frozen LM's last hidden state (Zhao et al. 2024; as in Silent-Zebra/twisted-smc-lm)."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..models.base import LanguageModel
from ..potentials.likelihood import suffix_of
from .base import Prefixes, TwistFunction

CONFIG_NAME = "twist_config.json"
WEIGHTS_NAME = "twist.safetensors"


@dataclass
class TwistConfig:
    """Shape of a twist head. ``kind``: "linear" (H -> V), "mlp" (``layers`` Linear layers
    with ReLU, hidden width H, then H -> V), or "tied": an MLP H -> H whose output is scored
    against the LM's own frozen output embeddings, log psi(v) = g(h) . e_v + b_v. The tied
    head generalises across tokens (a gradient on one sampled token moves every token with
    a similar embedding), so it learns from far fewer samples than a V-way output layer.
    ``output``: "log" (the head's output is log psi) or "log_sigmoid" (psi in (0, 1), as
    FUDGE needs). ``conditional``: the input is the hidden
    state concatenated with the last hidden state of a conditioning token sequence (the
    infilling suffix), so one head serves every suffix. ``init``: "xavier" (Xavier-normal
    weights, as the reference code), or "base": the output layer starts at zero, so psi is
    constant and the twisted proposal starts as p0 (training starts at bootstrap SMC)."""

    hidden_size: int
    vocab_size: int
    kind: Literal["linear", "mlp", "tied"] = "mlp"
    layers: int = 3
    output: Literal["log", "log_sigmoid"] = "log"
    conditional: bool = False
    init: Literal["xavier", "base"] = "xavier"
    model_name: str = ""


class Twist(nn.Module, TwistFunction):
    """A twist head: log psi_t(s_{<t}, .) = head([h(s_{<t}); c]) for every next token.

    Weights are Xavier-normal with zero bias, so log psi starts small and random (as in the
    reference code), or (``init="base"``) log psi starts at exactly 0. Save with ``save_pretrained(dir)``, load with
    ``Twist.from_pretrained(dir, model)``.
    """

    def __init__(self, config: TwistConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size * (2 if config.conditional else 1)
        if config.kind == "linear":
            layers: list[nn.Module] = [nn.Linear(width, config.vocab_size)]
        elif config.kind in ("mlp", "tied"):
            if config.layers < 2:
                raise ValueError("an MLP twist head needs at least 2 layers")
            layers = []
            for _ in range(config.layers - 1):
                layers += [nn.Linear(width, config.hidden_size), nn.ReLU()]
                width = config.hidden_size
            layers.append(nn.Linear(width, config.hidden_size if config.kind == "tied" else config.vocab_size))
        else:
            raise ValueError(f"twist head kind must be 'linear', 'mlp' or 'tied', got {config.kind!r}")
        self.net = nn.Sequential(*layers)
        if config.init not in ("xavier", "base"):
            raise ValueError(f"twist head init must be 'xavier' or 'base', got {config.init!r}")
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if config.init == "base":
            nn.init.zeros_(cast(nn.Linear, self.net[-1]).weight)
        if config.kind == "tied":
            self.token_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.output = config.output
        self._model: LanguageModel | None = None
        self._lm_embeddings: Tensor | None = None  # the LM's frozen output embeddings (tied heads; no copy)
        self._embeddings: Tensor | None = None  # the same in float32, made when a float32 pass first needs it
        self._compute_dtype = torch.float32  # the dtype sampling reads the head in (the model's)
        self._cast: tuple[tuple, dict[str, Tensor]] | None = None  # (parameter versions, cast copies)

    @classmethod
    def for_model(cls, model: LanguageModel, **config) -> Twist:
        """A fresh head sized for ``model`` (its hidden size and vocabulary)."""
        hidden = model.start(model.context([]) if model.bos_token_id is not None else [0], 1).hidden
        twist = cls(TwistConfig(hidden_size=hidden.shape[-1], vocab_size=model.vocab_size, model_name=model.name, **config))
        twist.attach(model)
        return twist

    def attach(self, model: LanguageModel) -> None:
        """Bind the twist to its model and move it to the model's device (a tied head reads the
        model's output embeddings). Without a gradient (sampling), the head then runs in the
        model's dtype, as the model does: see ``forward``."""
        self._model = model
        self.to(model.device)
        dtype = getattr(model, "dtype", torch.float32)
        self._compute_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        self._cast = None
        if self.config.kind == "tied":
            head = getattr(getattr(model, "hf", None), "get_output_embeddings", lambda: None)()
            if head is None:
                raise ValueError(f"a tied twist head needs a transformers model with output embeddings, not {model.name}")
            self._lm_embeddings, self._embeddings = head.weight.detach(), None

    def forward(self, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        """log psi of every next token, float32. Under ``torch.no_grad`` on a model of lower
        precision (bfloat16 or float16) the head runs in the model's dtype on a copy of its
        weights cast once (and again after an optimizer step changes them): sampling then pays
        for the head what the model pays for its own output layer. A twist is any positive
        function, so the rounded head is a twist as valid as the float32 one, and within one
        run every step reads the same one (Z-hat stays unbiased)."""
        x, low = self._input(hidden, condition), self._cast_weights()
        if low is None:
            out = self.net(x)
        else:
            net = {k.removeprefix("net."): v for k, v in low.items() if k.startswith("net.")}
            out = torch.func.functional_call(self.net, net, (x.to(self._compute_dtype),))
        if self.config.kind == "tied":
            embeddings, bias = (self._tied_embeddings(), self.token_bias) if low is None else \
                (low["embeddings"], low["token_bias"])
            out = out @ embeddings.T / self.config.hidden_size**0.5 + bias
        out = out.float()
        return nn.functional.logsigmoid(out) if self.config.output == "log_sigmoid" else out

    def _cast_weights(self) -> dict[str, Tensor] | None:
        """The parameters in the model's dtype for sampling, or None where the head computes in
        float32 (a gradient is being taken, or the model is float32). The copy is keyed by the
        parameters' version counters, which every in-place update (an optimizer step,
        ``load_state_dict``) advances; a write through ``.data`` does not: ``attach(model)``
        again after one."""
        dtype = self._compute_dtype
        if dtype == torch.float32 or torch.is_grad_enabled():
            return None
        params = dict(self.named_parameters())
        key = tuple((-1 if p.is_inference() else p._version, p.data_ptr()) for p in params.values())
        if self._cast is None or self._cast[0] != key:
            low = {k: p.detach().to(dtype) for k, p in params.items()}
            if self._lm_embeddings is not None:
                low["embeddings"] = self._lm_embeddings.to(dtype)
            self._cast = (key, low)
        return self._cast[1]

    def _input(self, hidden: Tensor, condition: Tensor | None) -> Tensor:
        x = hidden.float()
        if self.config.conditional:
            if condition is None:
                raise ValueError("this twist is conditional: it needs a condition (the target's suffix)")
            x = torch.cat([x, condition.float().expand(*x.shape[:-1], -1)], dim=-1)  # (H,) or one per row
        return x

    def _lm_output_embeddings(self) -> Tensor:
        if self._lm_embeddings is None:
            raise ValueError("a tied twist head must be attached to its model: Twist.from_pretrained(dir, model)")
        return self._lm_embeddings

    def _tied_embeddings(self) -> Tensor:
        """The output embeddings in float32: the model's own where it is float32, else a copy
        made once (on a bfloat16 model only full float32 passes read it; sampling reads the
        model's own, one-token passes the rows they need)."""
        if self._embeddings is None:
            self._embeddings = self._lm_output_embeddings().float()
        return self._embeddings

    def log_psi(self, prefixes: Prefixes | None, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        return self(hidden, condition)

    def log_psi_at(self, prefixes: Prefixes | None, hidden: Tensor, tokens: Tensor,
                   condition: Tensor | None = None) -> Tensor:
        """The head at one token per row: the output layer's row (or the tied embedding) of
        that token only, so training on drawn tokens costs O(H) per row instead of O(H V)."""
        tokens = tokens.long()
        if self._cast_weights() is not None:  # sampling reads the head in the model's dtype: so must this
            rows = max(1, 2**24 // self.config.vocab_size)  # (rows, V) at a time
            conditions = itertools.repeat(condition) if condition is None or condition.dim() == 1 else condition.split(rows)
            return torch.cat([self(h, c).gather(-1, v[:, None]).squeeze(-1)
                              for h, c, v in zip(hidden.split(rows), conditions, tokens.split(rows), strict=False)])
        x = self._input(hidden, condition)
        if self.config.kind == "tied":
            out = (self.net(x) * self._lm_output_embeddings()[tokens].float()).sum(-1) / self.config.hidden_size**0.5
            out = out + self.token_bias[tokens]
        else:
            last = cast(nn.Linear, self.net[-1])
            out = (self.net[:-1](x) * last.weight[tokens]).sum(-1) + last.bias[tokens]
        return nn.functional.logsigmoid(out) if self.config.output == "log_sigmoid" else out

    def condition_for(self, target) -> Tensor | None:
        """Last hidden state of the target's conditioning tokens (its suffix), if conditional."""
        if not self.config.conditional:
            return None
        ids = condition_ids(target)
        if ids is None:
            raise ValueError("a conditional twist needs a target whose potential has a suffix (SuffixLikelihood)")
        with torch.no_grad():
            return target.model.start(ids, 1).hidden[0]

    # -- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps({**asdict(self.config), "trained_for": self.trained_for},
                                                        indent=1))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: LanguageModel | None = None) -> Twist:
        """Load a saved twist; with ``model``, check it was trained for a compatible model."""
        directory = Path(directory)
        try:
            saved = json.loads((directory / CONFIG_NAME).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory} holds no saved twist ({CONFIG_NAME} missing)") from None
        trained_for = saved.pop("trained_for", None)
        twist = cls(TwistConfig(**saved))
        twist.trained_for = trained_for
        twist.load_state_dict(load_file(directory / WEIGHTS_NAME))
        if model is not None:
            check_compatible(twist, model)
            twist.attach(model)
        return twist


def check_compatible(twist: Twist, model: LanguageModel) -> None:
    """A twist is tied to its model's vocabulary and hidden size: refuse a mismatch clearly."""
    hidden = model.start([0] if model.bos_token_id is None else [model.bos_token_id], 1).hidden.shape[-1]
    if (twist.config.vocab_size, twist.config.hidden_size) != (model.vocab_size, hidden):
        raise ValueError(
            f"twist trained for {twist.config.model_name or 'another model'} (vocab {twist.config.vocab_size}, "
            f"hidden {twist.config.hidden_size}) does not fit {model.name} (vocab {model.vocab_size}, hidden {hidden}): "
            "a twist only works with the model (and tokenizer) it was trained on"
        )


def condition_ids(target) -> list[int] | None:
    """The suffix token ids of the target's ``SuffixLikelihood`` factor, if it has one."""
    suffix = suffix_of(target.potential)
    return None if suffix is None else list(suffix.suffix_ids)
