"""The device audit of docs/gpu.md: which recbench call sites make CPU tensors in a method's step.

    .venv/bin/python tests/gpu/audit_devices.py [method ...]     # every registered method by default

For each method: its module is built (not audited: a built module is moved to the job's device as
a whole), then one forward and backward pass on a batch runs under ``DeviceGuard(None)``, which
records every tensor factory call from recbench code that names no device (on a GPU it would land
on the CPU) and every ``.cpu()``. Prints one markdown row per method and the call sites.

References: tests/gpu/device_guard.py, tests/gpu/test_cuda.py (the same build and batch).
"""
from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import torch

from device_guard import DeviceGuard
from test_cuda import METHODS, built_module, contract_tables, random_kjt


def audit(name: str, tables) -> Counter:
    module = built_module(name, tables)
    module.train()
    guard = DeviceGuard(None)
    with guard:
        out = module(random_kjt(tables, 256, np.random.default_rng(1), torch.device("cpu")))
        ((out.values() ** 2).sum() + module.extra_loss()).backward()
    return guard.strays


def main(names) -> int:
    tables = contract_tables()
    every: Counter = Counter()
    print("| method | stray call sites in a training step | calls |\n| --- | ---: | ---: |")
    for name in names:
        strays = audit(name, tables)
        every.update({key: 1 for key in strays})
        print(f"| {name} | {len(strays)} | {sum(strays.values())} |")
    print("\n| call site | function | kind | methods |\n| --- | --- | --- | ---: |")
    for (site, func, kind), n in sorted(every.items()):
        print(f"| `{site}` | {func} | {kind} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or METHODS))
