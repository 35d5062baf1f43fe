"""A twist on its own LoRA-adapted copy of the LM body (peft).

The ``--separate_hface_twist_model --use_lora`` option of Zhao et al. (2024)'s reference code
(Silent-Zebra/twisted-smc-lm): the twist head reads the hidden state of a LoRA-adapted body
instead of the frozen one, so the features themselves adapt to the potential. It costs one
more LM forward per step (the adapted body has its own KV cache, stepped and reindexed in
lock-step with the model's), and training back-propagates through the adapters with one
teacher-forced forward per batch. Use it when a head on frozen features is not expressive
enough.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..models.base import ModelState
from ..models.hf import HFModel
from .base import Prefixes, TwistFunction
from .head import Twist, TwistConfig

CONFIG_NAME = "lora_twist_config.json"


class LoRATwist(nn.Module, TwistFunction):
    """log psi_t(s_{<t}, .) = head(h'(s_{<t})) with h' the last hidden state of the
    LoRA-adapted body (rank ``rank`` on ``target_modules``; the base weights stay frozen).
    ``conditional``: the head also reads the target's condition (the frozen model's last state
    of its suffix, as a conditional ``Twist`` does), so one twist serves every ending."""

    stateful = True

    def __init__(self, model: HFModel, *, rank: int = 4, alpha: int | None = None, dropout: float = 0.0,
                 target_modules: list[str] | None = None, kind: Literal["linear", "mlp", "tied"] = "mlp", layers: int = 3,
                 output: Literal["log", "log_sigmoid"] = "log", init: Literal["xavier", "base"] = "xavier",
                 conditional: bool = False):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        self.lora: dict[str, Any] = {"rank": rank, "alpha": alpha or 2 * rank, "dropout": dropout,
                                     "target_modules": target_modules or ["q_proj", "v_proj"]}
        body = get_peft_model(copy.deepcopy(model.hf), LoraConfig(
            r=rank, lora_alpha=self.lora["alpha"], lora_dropout=dropout, target_modules=self.lora["target_modules"]))
        self.adapted = body  # registered as a submodule, so the adapters are parameters of the twist
        self.body = HFModel(body, model.tokenizer, name=f"{model.name}+lora-twist")
        self.body.kv_cache = getattr(model, "kv_cache", "auto")
        hidden = model.hf.config.hidden_size
        self.head = Twist(TwistConfig(hidden, model.vocab_size, kind=kind, layers=layers, output=output,
                                      init=init, model_name=model.name, conditional=conditional))
        self.head.attach(model)  # a tied head scores against the (frozen) output embeddings
        self.output = output
        self._state: ModelState | None = None

    # -- stepping in lock-step with the model ------------------------------------------
    def begin(self, targets, n: int) -> None:
        self._state = self.body.start_many([t.prompt_ids for t in targets], n)

    def advance(self, tokens: Tensor, hold: Tensor | None = None) -> None:
        assert self._state is not None  # begin() came first
        self._state = self.body.advance(self._state, tokens, hold=hold)

    def reindex(self, idx: Tensor) -> None:
        assert self._state is not None  # begin() came first
        self._state = self.body.reindex(self._state, idx)

    def log_psi(self, prefixes: Prefixes | None, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        assert self._state is not None  # begin() came first
        return self.head(self._state.hidden, condition)

    def condition_for(self, target) -> Tensor | None:
        return self.head.condition_for(target)

    def log_psi_teacher_forced(self, target, tokens: Tensor, mask: Tensor) -> Tensor:
        """log psi at every step of the sampled sequences, with gradients through the
        adapters: one forward of [prompt, tokens] (right-padded), shape (K, T, V)."""
        ctx, device = self.body.context(list(target.prompt_ids)), self.body.device
        ids = torch.cat([torch.tensor(ctx, device=device).expand(len(tokens), -1), tokens.to(device).clamp(min=0)], 1)
        out = self.body.hf(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1][:, len(ctx) - 1 : len(ctx) - 1 + tokens.shape[1]]
        return self.head(h.float(), self.condition_for(target))

    # -- persistence -------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Tensor]:
        return {k: p.detach().contiguous() for k, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), directory / "lora_twist.safetensors")
        cfg = {"lora": self.lora, "head": {"kind": self.head.config.kind, "layers": self.head.config.layers,
                                           "output": self.output, "conditional": self.head.config.conditional},
               "model_name": self.head.config.model_name,
               "trained_for": self.trained_for}
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: HFModel) -> LoRATwist:
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        lora = cfg["lora"]
        twist = cls(model, rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"],
                    target_modules=lora["target_modules"], **cfg["head"])
        missing = set(twist.trainable_state()) - set(saved := load_file(directory / "lora_twist.safetensors"))
        if missing:
            raise ValueError(f"{directory} does not fit this model: missing {sorted(missing)[:3]}")
        twist.load_state_dict(saved, strict=False)
        twist.trained_for = cfg.get("trained_for")
        return twist
