"""Facts of this machine that pilm decides once and keeps: where its cache is, and which
matmul dtype the CPU runs faster.

bfloat16 is 2-4x faster than float32 on CPUs with AMX and ~3-5x slower on AVX2-only ones,
so it is measured, never assumed. Timing under load can flip a close call, and the same
seed must give the same samples on the same machine, so the decision is made once per CPU
(keyed by its capability string and model name) and stored in ``$PILM_CACHE/dtype.json``
beside the converted models; later processes read it. ``PILM_DTYPE=float32|bfloat16``
overrides it. This is the CPU's answer only: ``device.resolve_dtype`` decides for other devices.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

_DTYPE_FILE = "dtype.json"


def cache_dir() -> Path:
    """Root of pilm's cache: ``$PILM_CACHE``, else ``$XDG_CACHE_HOME/pilm``, else ``~/.cache/pilm``."""
    if os.environ.get("PILM_CACHE"):
        return Path(os.environ["PILM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "pilm"


@functools.cache
def default_dtype() -> torch.dtype:
    """The matmul dtype pilm loads models in on this machine's CPU (see the module docstring)."""
    forced = os.environ.get("PILM_DTYPE", "auto")
    if forced != "auto":
        return getattr(torch, forced)
    path, key = cache_dir() / _DTYPE_FILE, cpu_key()
    with locked(path):  # two processes probing at once must not decide differently
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if key not in known:
            known[key] = "bfloat16" if _bf16_faster_on_cpu() else "float32"
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    return getattr(torch, known[key])


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` + ".lock" (POSIX; no lock elsewhere) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu_key() -> str:
    """This CPU's capability string (as PyTorch dispatches on it) and model name."""
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {name}".strip()


def _bf16_faster_on_cpu() -> bool:
    """A model-shaped matmul (64 x 576 @ 576 x 1536) timed in both dtypes, best of 5."""
    generator = torch.Generator(device="cpu").manual_seed(0)  # the CPU probe; leaves the global RNG alone

    def best_time(dtype: torch.dtype) -> float:
        a = torch.randn(64, 576, generator=generator).to(dtype)
        b = torch.randn(576, 1536, generator=generator).to(dtype)
        a @ b  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    # 0.8: only switch when bfloat16 is clearly faster; ties keep float32's precision.
    return best_time(torch.bfloat16) < 0.8 * best_time(torch.float32)
