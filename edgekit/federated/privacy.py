"""Client-side differential privacy for a federation's updates, and the ε it amounts to.

Each site clips its update (its trained tensors minus the round's global ones, all together) to an L2 norm of
``clipping_norm`` (Flower's ``flwr.common.differential_privacy`` clipping) and adds Gaussian noise of standard deviation
``noise_multiplier × clipping_norm`` to every coordinate (numpy) before the update leaves the site; with privacy on
the site sends no training loss either. The coordinator never sees an unclipped or noiseless update. The settings are
the coordinator's, sent in each round's instructions, so the report states what every site applied.

The ε reported is for the Gaussian mechanism composed over the rounds, per site, with Rényi differential privacy:
two data sets of one site may change its clipped update by at most ``2 × clipping_norm`` (L2), so one round costs
``α · 2 / σ²`` at order α, R rounds ``R · α · 2 / σ²``, converted to (ε, δ) by ε = RDP(α) + log(1/δ) / (α − 1),
minimised over α. No subsampling amplification is claimed (every site trains every round), so the bound is loose
but never optimistic.
"""

from __future__ import annotations

import math

import numpy as np

from edgekit.config import PrivacySection

SENSITIVITY_IN_CLIPPING_NORMS = 2.0  # a site's data replaced: its clipped update may move anywhere in the C-ball


def privatise(global_arrays: list[np.ndarray], trained: list[np.ndarray], settings: PrivacySection,
              rng: np.random.Generator | None = None) -> tuple[list[np.ndarray], bool]:
    """The trained tensors with their update clipped and noised; whether clipping shortened the update."""
    from flwr.common.differential_privacy import clip_inputs_inplace, get_norm

    update = [np.subtract(t, g, dtype=np.float32) for t, g in zip(trained, global_arrays, strict=True)]
    clipped = get_norm(update) > settings.clipping_norm
    clip_inputs_inplace(update, settings.clipping_norm)
    rng = rng or np.random.default_rng()
    std = settings.noise_multiplier * settings.clipping_norm
    return [(g + u + rng.normal(0.0, std, u.shape)).astype(np.float32) for g, u in zip(global_arrays, update)], bool(clipped)


def epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """The (ε, δ) guarantee's ε for one site after ``rounds`` Gaussian releases (see the module docstring); a round
    run again after too few sites returned counts again (the site's update left it both times)."""
    per_order = rounds * SENSITIVITY_IN_CLIPPING_NORMS ** 2 / (2 * noise_multiplier ** 2)
    orders = np.concatenate([np.linspace(1.01, 10, 200), np.linspace(10, 1000, 400)])
    return float(min(per_order * a + math.log(1 / delta) / (a - 1) for a in orders))


def privacy_report(settings: PrivacySection, releases: int) -> dict:
    if not settings.enabled:
        return {"enabled": False}
    return {"enabled": True, "mechanism": "Gaussian, client side, per-site update clipped then noised", "releases": releases,
            "clipping_norm": settings.clipping_norm, "noise_multiplier": settings.noise_multiplier, "delta": settings.delta,
            "epsilon": round(epsilon(releases, settings.noise_multiplier, settings.delta), 3),
            "accountant": "Rényi DP of the Gaussian mechanism over the rounds, L2 sensitivity 2 × clipping_norm, no subsampling"}
