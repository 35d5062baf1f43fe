"""Where a model runs and in what dtype, the generators that draw there, and the one check
that the parts of a run (model, twist, policy, generators) share a device.

``device="auto"`` is this process's accelerator when there is one (CUDA device
``LOCAL_RANK`` under ``accelerate launch``/``torchrun``, so each process of a launch takes
its own GPU), else the CPU. ``dtype="auto"`` is bfloat16 on a CUDA device that supports it,
float16 on one that does not, the measured faster matmul dtype on a CPU
(``machine.default_dtype``), and float32 elsewhere. ``PILM_DEVICE`` and ``PILM_DTYPE``
override "auto" (the CLI's ``--device``/``--dtype`` set them for the command and any process
it starts).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import cast

import torch

from ..errors import DeviceError
from .machine import default_dtype

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device ``device`` names (see the module docstring); a CUDA device this machine
    does not have is refused with a ``DeviceError`` before anything loads."""
    if device is None or device == "auto":
        if os.environ.get("PILM_DEVICE", "auto") != "auto":
            return resolve_device(os.environ["PILM_DEVICE"])
        return _this_process_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"unknown device {device!r} ({err}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if device.index is None and torch.cuda.is_available():
            return _this_process_gpu()  # under a launcher each process takes its own
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device} asked for, but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s): cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def _this_process_gpu() -> torch.device:
    """cuda:LOCAL_RANK (0 outside a launcher); a rank without a GPU of its own is refused."""
    rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if rank >= count:
        raise DeviceError(f"process LOCAL_RANK={rank} but this machine has {count} CUDA device(s): launch at most "
                          f"{count} processes per machine, or name a device for each")
    return torch.device("cuda", rank)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype ``dtype`` names on ``device`` (see the module docstring); one the device
    cannot run is refused with a ``DeviceError`` that says which it can."""
    if dtype is None or dtype == "auto":
        if os.environ.get("PILM_DTYPE", "auto") != "auto":
            return resolve_dtype(os.environ["PILM_DTYPE"], device)
        if device.type == "cuda":
            return torch.bfloat16 if _native_bf16(device) else torch.float16
        return default_dtype() if device.type == "cpu" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DeviceError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = cast(torch.dtype, getattr(torch, dtype))
    if dtype == torch.bfloat16 and device.type == "cuda" and not _native_bf16(device):
        raise DeviceError(f"{device} ({torch.cuda.get_device_name(device)}) cannot run bfloat16; "
                          "use float16 or float32")
    return dtype


def _native_bf16(device: torch.device) -> bool:
    """bfloat16 in hardware: compute capability 8 (Ampere) and later. (torch.cuda.is_bf16_supported
    also says yes where it is emulated, slowly, and asks the current device, not this one.)"""
    return torch.cuda.get_device_capability(device)[0] >= 8


def derived_seed(seed: int, i: int | tuple) -> int:
    """The i-th seed derived from ``seed``: ``seed`` itself for i = 0, else a hash of (seed, i)
    (``i`` may be a tuple, e.g. a prompt and prefix of token ids)."""
    digest = hashlib.blake2b(repr((seed, i)).encode(), digest_size=8).digest()
    return seed if i == 0 else int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(seed: int, device: str | torch.device) -> torch.Generator:
    """A generator seeded with ``seed`` on ``device``: draws on a device need one there."""
    return torch.Generator(device=device).manual_seed(seed)


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device (an unset index is the first)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def module_device(part: object) -> torch.device | None:
    """The device of a module's first parameter (``None``: not a module, or no parameters)."""
    params = part.parameters() if isinstance(part, torch.nn.Module) else iter(())
    first = next(params, None)
    return None if first is None else first.device


def check_device(what: str, device: torch.device | None, model_device: torch.device) -> None:
    """Refuse ``what`` (a generator, twist, policy) on another device than the model's, naming
    both (``device=None``: a part with no tensors of its own, which is anywhere)."""
    if device is not None and not same_device(device, model_device):
        raise DeviceError(f"{what} is on {device} but the model is on {model_device}: put them on one device "
                          f"(e.g. .to(model.device), or torch.Generator(model.device))")


@contextlib.contextmanager
def placed(device: str = "auto", dtype: str = "auto") -> Iterator[torch.device]:
    """Within the block (and in processes it starts), "auto" means ``device`` and ``dtype``
    (given as "auto" themselves, they leave ``PILM_DEVICE``/``PILM_DTYPE`` as they are); both
    are checked first, so a machine without the device fails before a model loads."""
    where = resolve_device(device)
    resolve_dtype(dtype, where)
    with environment({k: v for k, v in (("PILM_DEVICE", device), ("PILM_DTYPE", dtype)) if v != "auto"},
                     keep=("PILM_DEVICE", "PILM_DTYPE")):
        yield where


@contextlib.contextmanager
def environment(values: Mapping[str, str], keep: Iterable[str] = ()) -> Iterator[None]:
    """``values`` in ``os.environ`` within the block (processes started there inherit them);
    afterwards those variables, and the ones named in ``keep``, as they were before it."""
    before = {k: os.environ.get(k) for k in {*values, *keep}}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
