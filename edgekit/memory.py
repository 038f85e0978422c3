"""Will a training step fit? Checked before training starts, so a too-large batch is a clear message, not an OOM kill.

The estimate is deliberately rough (activations dominate; weights, gradients and
optimizer state are added once): it exists to catch settings that are off by a
large factor, such as a batch size meant for a GPU on a small edge host.
"""

from __future__ import annotations

import os

from edgekit.errors import EdgekitError

# Share of the free memory a training step may plan to use: the rest is for the
# allocator's fragmentation, the data and everything else on the host.
USABLE_SHARE = 0.7


def available_bytes(device: str) -> int:
    """Free memory on ``device``: CUDA's free bytes, or the host's available physical memory."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def transformer_step_bytes(batch: int, length: int, hidden: int, layers: int, heads: int, intermediate: int,
                           parameters: int, bytes_per_value: int = 4) -> int:
    """Activations kept for backward per layer (projections, FFN, attention scores) plus weights, gradients, Adam state."""
    per_token = 10 * hidden + 2 * intermediate  # q, k, v, context, output, norms, residuals; FFN in and out
    per_layer = batch * length * per_token + 3 * batch * heads * length * length  # scores, softmax, dropout mask
    return (layers * per_layer + batch * length * hidden * 4) * bytes_per_value + parameters * 4 * 4


def check_fits(needed: int, device: str, setting: str, smaller: str) -> None:
    """Raise a clear error when ``needed`` bytes exceed what ``device`` can spare; ``setting`` names the knob to turn."""
    free = available_bytes(device)
    if needed > USABLE_SHARE * free:
        raise EdgekitError(
            f"{setting} needs about {needed / 2**30:.1f} GiB per training step on {device}, but only "
            f"{free / 2**30:.1f} GiB is free ({USABLE_SHARE:.0%} usable): {smaller}"
        )
