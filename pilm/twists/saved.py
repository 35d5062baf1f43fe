"""Any twist saved by ``save_pretrained``, loaded by what its folder holds (``load_twist``)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from ..models.base import LanguageModel
from .base import TwistFunction
from .head import CONFIG_NAME as HEAD_CONFIG
from .head import Twist
from .lora import CONFIG_NAME as LORA_CONFIG
from .lora import LoRATwist
from .residual import CONFIG_NAME as RESIDUAL_CONFIG
from .residual import ResidualTwist


def load_twist(directory: str | Path, model: LanguageModel) -> TwistFunction:
    """The twist saved in ``directory``, on ``model``: a ``ResidualTwist`` (residual_config.json),
    a ``LoRATwist`` (lora_twist_config.json) or a ``Twist`` head (twist_config.json)."""
    directory = Path(directory)
    if (directory / RESIDUAL_CONFIG).exists():
        return ResidualTwist.from_pretrained(directory, model)
    if (directory / LORA_CONFIG).exists():
        from ..models.hf import HFModel

        if not isinstance(model, HFModel):
            raise TypeError(f"{directory} holds a LoRA twist, which adapts a transformers model, not {model.name}")
        return LoRATwist.from_pretrained(directory, cast(HFModel, model))
    if (directory / HEAD_CONFIG).exists():
        return Twist.from_pretrained(directory, model)
    raise FileNotFoundError(f"{directory} holds no saved twist ({HEAD_CONFIG} is missing)")
