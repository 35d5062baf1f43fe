"""Base language models p0: the protocol, a transformers backend, tabular toys, the registry."""

from .adapter import LoRAPolicy
from .base import LanguageModel, ModelState, decode_step
from .device import resolve_device, resolve_dtype
from .hf import HFModel
from .machine import default_dtype
from .prompt_cache import PromptCache
from .registry import DEFAULT_MODEL, cache_dir, load_model
from .tabular import TabularLM

__all__ = [
    "DEFAULT_MODEL", "HFModel", "LanguageModel", "LoRAPolicy", "ModelState", "PromptCache", "TabularLM", "cache_dir",
    "decode_step", "default_dtype", "load_model", "resolve_device", "resolve_dtype"
]
