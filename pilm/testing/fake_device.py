"""Run pilm as if on an accelerator, on a machine without one: the device check of ``make test``.

Inside ``fake_accelerator()``, ``"fakegpu"`` is a device that computes on the CPU but is not
the CPU: ``torch.zeros(3, device="fakegpu")``, ``tensor.to("fakegpu")``, ``module.to("fakegpu")``
and ``torch.Generator("fakegpu")`` give tensors, parameters and generators whose ``.device`` is
``fakegpu:0``, and every aten op is checked the way CUDA checks it, more strictly:

- an op that mixes a device tensor with a CPU tensor (other than a 0-dim scalar, which CUDA
  accepts) raises ``DeviceMixError`` naming the op; this includes indexing a device tensor
  with CPU indices, which CUDA accepts but pays for with a copy;
- a draw whose generator is on another device than its tensors raises ``DeviceMixError``;
- ``numpy()`` of a device tensor fails, as on CUDA;
- every transfer is counted (``FakeAccelerator.to_host``: ``.item()``, ``.tolist()``, ``.cpu()``;
  ``to_device``: host tensors copied over), so a test can bound the round trips per step.

Why this mechanism: FakeTensorMode and the meta device carry no values, so a sampler could not
branch on what it drew, and a ``TorchFunctionMode`` alone does not see the ops torch runs
inside C++. A ``TorchDispatchMode`` with a wrapper tensor subclass sees every aten op with
real values underneath; a ``TorchFunctionMode`` turns the calls that name the device
(factories, ``.to``) into CPU work on the wrapper, since torch stops them before dispatch;
PrivateUse1, renamed ``fakegpu`` with a Python device guard (torch's recipe for backends
written in Python), makes the device one torch accepts. It is not ``cuda``, so it also checks
that nothing assumes CUDA. It is slow (Python around every op): use tiny models. One thing CUDA runs is not supported:
indexing a device tensor with a Python list (``x[:, [1, 2]]``), whose index tensor torch makes
inside C++ on the device, past the modes; index with integers or a tensor instead.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections import Counter
from collections.abc import Iterator
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

NAME = "fakegpu"
DEVICE: torch.device  # fakegpu:0, once registered
_HOST = torch.device("cpu")
_aten = torch.ops.aten
_TRANSFERS = {_aten._to_copy.default, _aten.copy_.default, _aten._local_scalar_dense.default}


class DeviceMixError(AssertionError):
    """An op met tensors or a generator on two devices."""


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on the fake device (only meaningful inside the mode)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    # printing reads the values: a transfer to the host on a GPU
    def __repr__(self) -> str:  # type: ignore[override]  # Tensor.__repr__ also takes tensor_contents=
        return f"{self.elem!r} on {DEVICE}"

    def tolist(self):
        return self.cpu().tolist()

    def __format__(self, spec: str) -> str:
        return self.cpu().__format__(spec)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DeviceMixError(f"{func} ran on a fake-device tensor outside fake_accelerator()")


class _Generator(torch._C.Generator):
    """``torch.Generator`` inside the mode: a CPU generator that says ``fakegpu:0`` when made for it."""

    _fake: bool

    def __new__(cls, device: str | torch.device = "cpu"):
        self = super().__new__(cls, "cpu")  # type: ignore[call-arg]  # torch's stub omits Generator.__new__(device)
        self._fake = torch.device(device).type == DEVICE.type
        return self

    @property
    def device(self) -> torch.device:  # type: ignore[override]  # torch's stub declares device a plain attribute
        return DEVICE if self._fake else _HOST


def _device_of(x) -> torch.device:
    if isinstance(x, _Generator):
        return x.device
    if isinstance(x, torch.Generator):
        return x.device
    return DEVICE if isinstance(x, _OnDevice) else x.device


def _unwrap(x):
    return x.elem if isinstance(x, _OnDevice) else x


def _wrap(x):
    return _OnDevice(x) if isinstance(x, torch.Tensor) and not isinstance(x, _OnDevice) else x


class FakeAccelerator(TorchDispatchMode):
    """The dispatch mode behind ``fake_accelerator()``; holds the transfer counts."""

    def __init__(self) -> None:
        super().__init__()
        self.to_host = 0
        self.to_device = 0
        self.where: Counter[tuple[str, str]] = Counter()  # (direction, pilm file:line) -> transfers

    def count(self, direction: str) -> None:
        """One transfer ("to_host" or "to_device"), with the line of pilm that asked for it."""
        setattr(self, direction, getattr(self, direction) + 1)
        here = next((f for f in reversed(traceback.extract_stack()[:-2])
                     if f"{os.sep}pilm{os.sep}" in f.filename and f"{os.sep}testing{os.sep}" not in f.filename), None)
        where = "outside pilm" if here is None else f"{here.filename.split(os.sep + 'pilm' + os.sep)[-1]}:{here.lineno}"
        self.where[(direction, where)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        on_device = any(isinstance(x, _OnDevice) for x in tensors)
        wanted = kwargs.get("device")
        to_device = wanted is not None and torch.device(wanted).type == DEVICE.type
        if to_device:
            kwargs["device"] = _HOST
        if func in _TRANSFERS:
            return self._transfer(func, args, kwargs, on_device, to_device)
        if on_device:
            host = [x for x in tensors if not isinstance(x, _OnDevice) and x.dim() > 0]
            if host:
                raise DeviceMixError(f"{func} mixes {DEVICE} tensors with a CPU tensor of shape {tuple(host[0].shape)}")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(_wrap, out) if (on_device or to_device) else out

    def _transfer(self, func, args, kwargs, on_device: bool, to_device: bool):
        plain = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is _aten._local_scalar_dense.default:
            if on_device:
                self.count("to_host")
            return plain
        if func is _aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, _OnDevice) != isinstance(src, _OnDevice):
                self.count("to_device" if isinstance(dst, _OnDevice) else "to_host")
            return dst
        # _to_copy: stays where it is unless a device was asked for
        if to_device:
            if not on_device:
                self.count("to_device")
            return _wrap(plain)
        if "device" in kwargs and kwargs["device"] is not None:
            if on_device:
                self.count("to_host")
            return plain
        return _wrap(plain) if on_device else plain


def _asked_device(func, args, kwargs) -> torch.device | None:
    """The device a call moves to or creates on, if it names one."""
    asked = kwargs.get("device")
    if func is torch.Tensor.to:
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                asked = a
            elif isinstance(a, torch.Tensor):
                asked = _device_of(a)
    return None if asked is None else torch.device(asked)


def _check_generator(func, args, kwargs, asked: torch.device | None) -> None:
    """A draw's generator must be on the device it draws on (checked here: the dispatcher
    hands the mode a fresh generator object, without the fake device)."""
    generator = kwargs.get("generator")
    if generator is None:
        return
    tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    draws_on = _device_of(tensors[0]) if tensors else (asked or _HOST)
    if _device_of(generator) != draws_on:
        raise DeviceMixError(f"{getattr(func, '__name__', func)} draws on {draws_on} with a generator on "
                             f"{_device_of(generator)}")


class _Placement(TorchFunctionMode):
    """Calls that name the fake device (factories, ``.to``) run on the CPU and come back on it;
    torch would stop them in C++ before the dispatcher sees them."""

    def __init__(self, checks: FakeAccelerator) -> None:
        super().__init__()
        self.checks = checks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        asked = _asked_device(func, args, kwargs)
        _check_generator(func, args, kwargs, asked)
        if asked is None or asked.type != DEVICE.type:
            return func(*args, **kwargs)
        if func is torch.Tensor.to:  # the same call without the device, on the CPU tensor underneath
            source, first, *more = (*args, None)[:max(2, len(args))]
            if isinstance(first, torch.Tensor):
                kwargs.setdefault("dtype", first.dtype)
                kwargs.update(zip(("non_blocking", "copy"), more))
            else:
                more = more if isinstance(first, (str, torch.device)) or first is None else [first, *more]
                kwargs.update(zip(("dtype", "non_blocking", "copy"), more))
            kwargs = {k: v for k, v in kwargs.items() if k != "device" and v is not None}
            out = torch.Tensor.to(_unwrap(source), **kwargs)
            if isinstance(source, _OnDevice):
                return source if out is source.elem else _wrap(out)
            self.checks.count("to_device")
            return _wrap(out.clone() if out is source else out)  # a copy, as a real transfer makes
        kwargs["device"] = _HOST
        return tree_map(_wrap, func(*args, **kwargs))


class _Module:
    """``torch.fakegpu``: what torch asks of a device module (its random state is the CPU's,
    which the ops underneath draw from)."""

    def is_available(self) -> bool:
        return True

    is_initialized = is_available

    def _is_in_bad_fork(self) -> bool:
        return False

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def get_rng_state(self, device=None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device=None) -> None:
        torch.set_rng_state(state)

    def manual_seed_all(self, seed: int) -> None:
        torch.default_generator.manual_seed(seed)

    manual_seed = manual_seed_all


def register() -> None:
    """Make ``fakegpu`` a device torch knows (PrivateUse1 renamed, with a Python device guard:
    torch's own recipe for backends written in Python). Once per process, irreversibly, and
    before the process's first backward pass: autograd sizes its per-device queues then, and a
    device registered later fails its backward (a test suite calls this when it starts)."""
    global DEVICE
    if torch._C._get_privateuse1_backend_name() != NAME:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(NAME, backend_module=_Module())
    DEVICE = torch.device(NAME, 0)


@contextlib.contextmanager
def fake_accelerator() -> Iterator[FakeAccelerator]:
    """Within the block, ``"fakegpu"`` is a checked fake device (see the module docstring); pass
    it explicitly (``load_model(..., device="fakegpu")``, ``--device fakegpu``)."""
    register()
    with contextlib.ExitStack() as stack:
        # module.to(device) swaps each parameter for its device copy (set_data cannot take a subclass)
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_swap_module_params_on_conversion, previous)
        stack.enter_context(mock.patch.object(torch, "Generator", _Generator))
        checks = FakeAccelerator()
        stack.enter_context(_Placement(checks))
        stack.enter_context(checks)
        yield checks
