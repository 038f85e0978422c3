"""What this machine is: CPU, memory, disk, GPU and the inference runtimes that import.

Used by ``edgekit doctor`` on a build host and by the agent to check that a
bundle's target matches the device. Light by design: no torch, and every probe
degrades to "unknown" instead of failing.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# CPU features that decide which int8 kernels ONNX Runtime can use.
_X86_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "bf16")
# /proc/device-tree/model substring → CUDA compute capability of Jetson GPUs.
_JETSON_COMPUTE = {"Orin": "8.7", "Xavier": "7.2", "TX2": "6.2", "Nano": "5.3"}


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str | None
    memory_mb: int | None = None
    driver: str | None = None


@dataclass(frozen=True)
class InstalledRuntime:
    name: str
    version: str | None
    providers: list[str] = field(default_factory=list)
    problem: str | None = None


@dataclass(frozen=True)
class HostReport:
    python: str
    platform: str
    cpu_arch: str
    cpu_model: str | None
    cpu_count: int
    cpu_flags: list[str]
    memory_total_mb: int | None
    memory_available_mb: int | None
    disk_free_mb: int
    jetson: str | None
    gpus: list[GpuInfo]
    runtimes: list[InstalledRuntime]
    warnings: list[str]

    @property
    def accelerator(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def to_dict(self) -> dict:
        return {**asdict(self), "accelerator": self.accelerator}

    def rows(self) -> list[tuple[str, str]]:
        """(check, finding) pairs for a terminal table, in the order a user reads them."""
        memory = f"{self.memory_available_mb} MB free of {self.memory_total_mb} MB" if self.memory_total_mb else "unknown"
        rows = [
            ("python", self.python),
            ("platform", self.platform),
            ("cpu", f"{self.cpu_arch}, {self.cpu_count} cores, {self.cpu_model or 'model unknown'}"),
            ("cpu int8 features", ", ".join(self.cpu_flags) or "none found"),
            ("memory", memory),
            ("disk", f"{self.disk_free_mb} MB free"),
        ]
        if self.jetson:
            rows.append(("jetson", self.jetson))
        if self.gpus:
            rows += [(f"gpu {index}", f"{gpu.name}, compute capability {gpu.compute_capability or 'unknown'}"
                      + (f", {gpu.memory_mb} MB" if gpu.memory_mb else "") + (f", driver {gpu.driver}" if gpu.driver else ""))
                     for index, gpu in enumerate(self.gpus)]
        else:
            rows.append(("gpu", "no CUDA GPU found (nvidia-smi absent or silent, not a Jetson)"))
        for runtime in self.runtimes:
            found = f"{runtime.version}" + (f", providers: {', '.join(runtime.providers)}" if runtime.providers else "")
            rows.append((runtime.name, found if runtime.version else runtime.problem or "not installed"))
        rows += [("warning", warning) for warning in self.warnings]
        return rows


def normalise_arch(machine: str) -> str:
    """``uname -m`` spelled the way target profiles spell it."""
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


def _cpuinfo() -> tuple[str | None, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, []
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    wanted = _X86_FLAGS + _ARM_FLAGS
    return model, [flag for flag in wanted if flag in flags]


def _meminfo() -> tuple[int | None, int | None]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    except OSError:
        return None, None

    def mb(key: str) -> int | None:
        value = fields.get(key)
        return int(value.split()[0]) // 1024 if value else None

    return mb("MemTotal"), mb("MemAvailable")


def _jetson_model() -> str | None:
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None
    return model if "jetson" in model.lower() else None


def _nvidia_smi_gpus() -> list[GpuInfo]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in output.strip().splitlines():
        name, compute, memory, driver = (part.strip() for part in (line.split(",") + ["", "", ""])[:4])
        gpus.append(GpuInfo(name, compute or None, int(memory) if memory.isdigit() else None, driver or None))
    return gpus


def _gpus(jetson: str | None) -> list[GpuInfo]:
    if jetson:  # Jetson's integrated GPU is not listed by nvidia-smi on older JetPacks
        compute = next((cc for key, cc in _JETSON_COMPUTE.items() if key.lower() in jetson.lower()), None)
        return [GpuInfo(jetson, compute)]
    return _nvidia_smi_gpus()


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _runtimes() -> tuple[list[InstalledRuntime], list[str]]:
    runtimes, warnings = [], []
    ort_wheels = [name for name in ("onnxruntime", "onnxruntime-gpu") if _distribution_version(name)]
    if len(ort_wheels) > 1:
        warnings.append("both onnxruntime and onnxruntime-gpu are installed; they overwrite each other: "
                        "`pip uninstall -y onnxruntime onnxruntime-gpu` then install only the one you need")
    try:
        import onnxruntime

        runtimes.append(InstalledRuntime("onnxruntime", onnxruntime.__version__, list(onnxruntime.get_available_providers())))
    except ImportError as exc:
        runtimes.append(InstalledRuntime("onnxruntime", None, problem=f"not importable ({exc}); install edgekit[agent]"))
    try:
        import tensorrt

        runtimes.append(InstalledRuntime("tensorrt", tensorrt.__version__))
    except ImportError as exc:
        runtimes.append(InstalledRuntime("tensorrt", None, problem=f"not importable ({exc})"))
    # The installed distribution's version, not an import: OpenVINO's libraries would stay in the agent's memory
    # whichever engine its bundles use (a bundle that asks for OpenVINO imports it as it loads).
    openvino = _distribution_version("openvino")
    runtimes.append(InstalledRuntime("openvino", openvino, problem=None if openvino else
                                     "not installed; `pip install \"edgekit[openvino]\"` for openvino bundles"))
    return runtimes, warnings


def probe_host(disk_path: Path | None = None) -> HostReport:
    """Look at this machine; never raises for a missing tool or file."""
    cpu_model, cpu_flags = _cpuinfo()
    memory_total, memory_available = _meminfo()
    jetson = _jetson_model()
    runtimes, warnings = _runtimes()
    return HostReport(
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpu_arch=normalise_arch(platform.machine()),
        cpu_model=cpu_model,
        cpu_count=os.cpu_count() or 1,
        cpu_flags=cpu_flags,
        memory_total_mb=memory_total,
        memory_available_mb=memory_available,
        disk_free_mb=shutil.disk_usage(disk_path or Path.cwd()).free // (1 << 20),
        jetson=jetson,
        gpus=_gpus(jetson),
        runtimes=runtimes,
        warnings=warnings,
    )
