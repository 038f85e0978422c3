"""The host probe reports what this machine really has."""

from __future__ import annotations

import os
import platform

import pytest

from device_agent.host import normalise_arch, probe_host


def test_probe_matches_this_machine():
    host = probe_host()
    assert host.cpu_arch == normalise_arch(platform.machine())
    assert host.cpu_count == os.cpu_count()
    assert host.disk_free_mb > 0
    assert host.memory_total_mb is None or host.memory_total_mb > 0
    onnxruntime = next(runtime for runtime in host.runtimes if runtime.name == "onnxruntime")
    assert onnxruntime.version is not None and "CPUExecutionProvider" in onnxruntime.providers
    checks = [check for check, _ in host.rows()]
    assert checks[:3] == ["python", "platform", "cpu"]


@pytest.mark.parametrize(("machine", "arch"), [("AMD64", "x86_64"), ("arm64", "aarch64"), ("aarch64", "aarch64"), ("x86_64", "x86_64")])
def test_architecture_names_follow_target_profiles(machine, arch):
    assert normalise_arch(machine) == arch


@pytest.mark.gpu
def test_probe_reports_the_cuda_gpu_and_its_compute_capability():
    host = probe_host()
    assert host.accelerator == "cuda"
    assert all(gpu.compute_capability for gpu in host.gpus)
