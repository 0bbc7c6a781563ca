"""A device-assertion mode: every tensor that recbench code creates or moves must land on one device.

``DeviceGuard(device)`` is a ``TorchFunctionMode``. Inside it, each tensor factory call
(``torch.zeros``, ``torch.arange``, ``torch.tensor``, ... : PyTorch's own list of device
constructors) and each ``Tensor.cpu`` / ``Tensor.to`` whose result is a tensor on another device
than ``device`` is a *stray*, recorded with the recbench call site that made it (the code that
called torch, past torch's own Python wrappers, when it lies under ``recbench/``). Tensors that
TorchRec or FBGEMM make themselves are their choice and are not recorded, and so are 0-dim
tensors (torch lets a 0-dim CPU tensor take part in CUDA operations, e.g. a zero ``extra_loss``). ``strict=True`` raises at the first stray instead
(``StrayDevice``, naming the call site): that is how the CUDA tests run.

On a CPU-only machine the job's device is ``cpu``, so a stray cannot be seen by its result; there
``DeviceGuard(None)`` records every factory call from recbench code that names no device (it
lands on the default device, i.e. on the CPU in a CUDA job), and every ``.cpu()``: the call sites
a CUDA job would trip over (docs/gpu.md, "Audit"). An explicit ``device=`` is taken as followed
(on the CPU, ``device=x.device`` and ``device="cpu"`` cannot be told apart at run time: the
literal CPU devices are found by grep, docs/gpu.md).

References: PyTorch ``torch.overrides.TorchFunctionMode``, ``torch.utils._device`` (the
``set_default_device`` mode is built the same way).
"""
from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

RECBENCH = str(Path(__file__).resolve().parents[2] / "recbench")
TORCH = str(Path(torch.__file__).resolve().parent) + "/"
MOVES = {torch.Tensor.cpu, torch.Tensor.to}


class StrayDevice(AssertionError):
    """recbench code created or moved a tensor off the job's device."""


def call_site(root: str = RECBENCH) -> Optional[str]:
    """``<root name>/<path>:<line> (<function>)`` of the code that called torch, when it lies under
    ``root``; None when torch was called from elsewhere (TorchRec, FBGEMM: their own choices)."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if frame.filename == __file__ or frame.filename.startswith(TORCH):
            continue  # this mode, and torch's own Python wrappers
        if frame.filename.startswith(root + "/"):
            return f"{Path(root).name}{frame.filename[len(root):]}:{frame.lineno} ({frame.name})"
        return None
    return None


class DeviceGuard(TorchFunctionMode):
    """Records (or, strict, raises on) tensors that recbench code puts off ``device``.

    ``device``: the job's device (``cuda:0``, ``meta``); None = the CPU audit described in the module
    docstring. ``moves``: also check ``.cpu()`` / ``.to()`` (off for a whole job, whose evaluation
    moves predictions to the host on purpose). ``root``: the source folder whose call sites count
    (recbench/). ``strays`` counts ``(call site, function name, kind)``; kind is ``created`` or ``moved``.
    """

    def __init__(self, device=None, strict: bool = False, moves: bool = True, root: str = RECBENCH):
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.strict, self.moves, self.root = strict, moves, str(root)
        self.strays: Counter = Counter()
        self._constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        kind = ("created" if func in self._constructors else "moved" if self.moves and func in MOVES else None)
        if (kind is not None and isinstance(result, torch.Tensor) and result.dim() > 0
                and self._stray(func, args, kwargs, result, kind)):  # 0-dim CPU tensors mix into CUDA ops
            site = call_site(self.root)
            if site is not None:
                key: Tuple[str, str, str] = (site, getattr(func, "__name__", str(func)), kind)
                self.strays[key] += 1
                if self.strict:
                    raise StrayDevice(f"{site}: {key[1]} {kind} a tensor on {result.device}, "
                                      f"the job runs on {self.device}")
        return result

    def _stray(self, func, args, kwargs, result: torch.Tensor, kind: str) -> bool:
        if self.device is not None:
            return result.device.type != self.device.type
        if kind == "moved":
            return func is torch.Tensor.cpu
        return kwargs.get("device") is None

    def sites(self) -> list:
        """The stray call sites, most frequent first: ``[(site, function, kind, count), ...]``."""
        return [(*key, n) for key, n in self.strays.most_common()]
