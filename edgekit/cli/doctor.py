"""``edgekit doctor``: what this machine can build and run, checked first on a new host or device."""

from __future__ import annotations

import importlib.metadata

import typer

from edgekit.cli.output import print_json, print_table

_BUILD_LIBRARIES = ("torch", "transformers", "peft", "optuna", "onnx", "onnxscript")


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _BUILD_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _torch_cuda() -> str | None:
    """What torch sees of CUDA, when torch is installed (importing it takes a second or two)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}: CUDA not available (CPU build or no GPU)"
    major, minor = torch.cuda.get_device_capability(0)
    return f"torch {torch.__version__}: CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, compute {major}.{minor}"


def doctor(as_json: bool = typer.Option(False, "--json", help="Print a JSON report.")) -> None:
    """Check this machine: Python, CPU int8 features, memory, disk, GPU, runtimes and build libraries."""
    from device_agent.host import probe_host
    from edgekit.targets import load_builtin_targets

    host = probe_host()
    libraries = _library_versions()
    torch_cuda = _torch_cuda() if libraries["torch"] else None
    host_compute = {gpu.compute_capability for gpu in host.gpus}
    matching = [
        profile.name
        for profile in load_builtin_targets()
        if profile.cpu_arch == host.cpu_arch
        and (profile.accelerator == "cpu" or profile.gpu_compute_capability in host_compute)
    ]
    if as_json:
        print_json({"host": host.to_dict(), "libraries": libraries, "torch_cuda": torch_cuda, "matching_targets": matching})
        return
    rows = [list(row) for row in host.rows()]
    rows += [[name, version or "not installed"] for name, version in libraries.items()]
    if torch_cuda:
        rows.append(["torch cuda", torch_cuda])
    rows.append(["targets this host can run", ", ".join(matching) or "none of the built-in targets"])
    print_table("edgekit doctor", ["check", "finding"], rows)
