"""The device-assertion mode of the CUDA tests (``device_guard.DeviceGuard``), checked on the CPU.

It runs in the default suite: a guard that missed strays would let ``make test-gpu`` pass jobs
that leave tensors on the CPU. The ``meta`` device stands in for the GPU (tensors there are not
on the CPU, and creating them costs nothing).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from device_guard import DeviceGuard, StrayDevice

HERE = str(Path(__file__).resolve().parent)
META = torch.device("meta")


def stray_zeros():
    return torch.zeros(3)  # no device: lands on the default device (the CPU)


def scalar():
    return torch.zeros(())  # 0-dim: torch mixes it into operations on any device


def following(x):
    return torch.zeros(3, device=x.device) + torch.ones_like(x) + torch.arange(3, device=x.device)


def back_to_host(x):
    return x.cpu()


def test_strict_guard_names_the_stray_call_site():
    with pytest.raises(StrayDevice, match=r"gpu/test_device_guard\.py:\d+ \(stray_zeros\): zeros created a tensor "
                                          r"on cpu, the job runs on meta"):
        with DeviceGuard(META, strict=True, root=HERE):
            stray_zeros()


def test_tensors_that_follow_the_device_pass_and_moves_are_checked_unless_off():
    x = torch.empty(3, device=META)
    with DeviceGuard(META, strict=True, root=HERE):
        assert following(x).device == META and scalar().dim() == 0
    host = torch.empty(3)  # a meta tensor holds no data to copy: a CPU one "moved" to the CPU
    guard = DeviceGuard(META, root=HERE)
    with guard:
        back_to_host(host)
    assert [(f, kind, n) for _, f, kind, n in guard.sites()] == [("cpu", "moved", 1)]
    with DeviceGuard(META, strict=True, moves=False, root=HERE):
        back_to_host(host)


def test_cpu_audit_records_factories_without_a_device_and_host_moves_only_from_the_source_tree():
    guard = DeviceGuard(None, root=HERE)
    with guard:
        stray_zeros(), stray_zeros(), following(torch.ones(3, device="cpu")), back_to_host(torch.ones(2)), scalar()
        torch.zeros(4)  # this test's own frame is under root too
    sites = {(site.split(" ")[1], func, kind): n for site, func, kind, n in guard.sites()}
    assert sites == {("(stray_zeros)", "zeros", "created"): 2, ("(back_to_host)", "cpu", "moved"): 1,
                     ("(test_cpu_audit_records_factories_without_a_device_and_host_moves_only_from_the_source_tree)",
                      "ones", "created"): 1,
                     ("(test_cpu_audit_records_factories_without_a_device_and_host_moves_only_from_the_source_tree)",
                      "zeros", "created"): 1}
    outside = DeviceGuard(None, root=HERE + "/elsewhere")
    with outside:
        stray_zeros()
    assert outside.sites() == []
