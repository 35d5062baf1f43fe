"""A fine-tunable policy: the base model plus a peft LoRA adapter, sharing its weights.

q_theta(s_t | s_{<t}) is the base transformers model with LoRA adapters (rank r, scale
alpha / r) injected into its linear layers; p0 is the *same* weights with the adapters
switched off. One copy of the weights sits in memory: before every forward, the model
object that runs it (the base ``HFModel`` or a ``LoRAPolicy``) selects its adapter, so the
base keeps computing p0 exactly while a policy trains. Several policies can share one base
(each is a named adapter). Adapters save in peft's own format (``adapter_config.json`` and
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained`` reads them too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .hf import HFModel

# Hu et al. 2024 (reference code GFNOrg/gfn-lm-tuning): r = 64, alpha 16, dropout 0.1 on the attention projections.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."  # key prefix of a PeftModel's state dict


class AdapterSwitch:
    """Selects which injected LoRA adapter the shared layers apply (``None``: none)."""

    def __init__(self, hf: nn.Module):
        self.hf = hf
        self.current: str | None = None
        self.layers: list = []

    def refresh(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in self.hf.modules() if isinstance(m, BaseTunerLayer)]
        self.params = [p for k, p in self.hf.named_parameters() if "lora_" in k]
        self.current = "?"  # force the next ``use`` to set every layer

    def use(self, name: str | None) -> None:
        if name == self.current:
            return
        trainable = [p.requires_grad for p in self.params]  # peft's switches also flip these: keep them
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)
        for p, flag in zip(self.params, trainable, strict=True):
            p.requires_grad_(flag)
        self.current = name


class LoRAPolicy(HFModel):
    """q_theta = ``base`` + a LoRA adapter named ``adapter_name`` (a ``LanguageModel``, so it
    samples, scores and serves as an SMC proposal like any other). ``trainable`` holds its
    adapter's parameters; ``base`` still computes p0 with the adapter off."""

    def __init__(self, base: HFModel, *, rank: int = 64, alpha: int = 16, dropout: float = 0.1,
                 target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGET_MODULES, adapter_name: str | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        if isinstance(base, LoRAPolicy):
            raise ValueError("give the base model, not another policy, as the base of a LoRAPolicy")
        super().__init__(base.hf, base.tokenizer, name=f"{base.name}+lora")
        self.kv_cache = base.kv_cache
        if base.adapters is None:
            base.hf.requires_grad_(False)  # p0 is never trained
            base.adapters = AdapterSwitch(base.hf)
        existing = {n for layer in base.adapters.layers for n in layer.lora_A}
        self.adapter = adapter_name or f"policy{len(existing)}"
        if self.adapter in existing:
            raise ValueError(f"the base model already has an adapter named {self.adapter!r}")
        self.base, self.adapters = base, base.adapters
        self.config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                                 task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(self.config, base.hf, adapter_name=self.adapter)
        base.hf.eval()  # new adapter layers start in training mode (dropout on)
        self.adapters.refresh()
        marker = f".{self.adapter}."
        # Keyed without the adapter's name, so a checkpoint loads into any policy of this shape.
        self.trainable = nn.ParameterDict({
            key.replace(marker, ".").replace(".", "__"): p
            for key, p in base.hf.named_parameters() if "lora_" in key and marker in key})
        for p in self.trainable.values():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> LoRAPolicy:
        """Dropout on (training) or off (sampling, scoring): the adapter layers follow ``hf``."""
        self.hf.train(mode)
        return self

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter's weights under peft's key names (adapter name removed)."""
        marker = f".{self.adapter}."
        return {_PEFT_PREFIX + k.replace(marker, "."): p.detach().contiguous()
                for k, p in self.hf.named_parameters() if "lora_" in k and marker in k}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(), directory / WEIGHTS_NAME)
        config = self.config.to_dict()
        config.update(base_model_name_or_path=self.base.name, target_modules=sorted(config["target_modules"]))
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1, default=str))
        return directory

    @classmethod
    def from_pretrained(cls, base: HFModel, directory: str | Path, *, adapter_name: str | None = None) -> LoRAPolicy:
        """The adapter saved in ``directory`` on ``base`` (peft format)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory} holds no adapter ({CONFIG_NAME} is missing)")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        policy = cls(base, rank=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                     target_modules=cfg["target_modules"], adapter_name=adapter_name)
        saved = load_file(directory / WEIGHTS_NAME)
        mine = policy.adapter_state_dict()
        if set(saved) != set(mine) or any(saved[k].shape != mine[k].shape for k in mine):
            raise ValueError(f"the adapter in {directory} does not fit {base.name} (its LoRA weights differ in names or shapes)")
        marker = f".{policy.adapter}."
        params = dict(base.hf.named_parameters())
        with torch.no_grad():
            for key, value in saved.items():
                name = key[len(_PEFT_PREFIX):]
                name = name.replace(".lora_A.", f".lora_A{marker}").replace(".lora_B.", f".lora_B{marker}")
                params[name].copy_(value)
        policy.name = f"{base.name}+{directory.name}"
        return policy
