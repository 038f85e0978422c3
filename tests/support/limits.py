"""Servers under a memory limit, and what they used: for the hostile-input suites."""

from __future__ import annotations

from pathlib import Path


def memory_capped(limit: int | None) -> dict:
    """Popen arguments that run a server under an address-space limit of ``limit`` bytes (none: no limit).

    glibc keeps up to 8 malloc arenas per core, each reserving 64 MiB of address space; two keep the limit a bound on
    what the server uses rather than on how many threads it has.
    """
    if limit is None:
        return {}
    import os
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return {"preexec_fn": cap, "env": {**os.environ, "MALLOC_ARENA_MAX": "2"}}


def peak_memory(pid: int) -> int:
    """A process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")
