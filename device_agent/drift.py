"""Drift scores and the streaming drift monitor, numpy only (the device, the build and the collector share it).

Scores compare a window's histogram counts with the reference proportions of
the same fixed bins (``telemetry_schema.FeatureReference``):

- PSI, the population stability index: ``sum((q - p) * ln(q / p))`` in nats,
  with every proportion (reference and window) floored at ``1e-4`` so an empty
  bin gives a large but finite score. Rules of thumb: 0.1 warns, 0.25 alerts.
- Jensen-Shannon *distance*: the square root of the JS divergence computed with
  base-2 logarithms, so it always lies in [0, 1] (0: same distribution, 1:
  disjoint supports). No flooring is needed: ``0 * log 0`` is taken as 0.

Neither is a p-value: on large windows significance tests flag trivial
differences, so a window is judged against distance thresholds calibrated on
reference chunks at build time (``edgekit.drift_reference``).

Histograms merge by adding counts, so the collector scores fleet-wide drift
with :func:`score_histograms` on summed counts, exactly as a device scores one
window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from device_agent.telemetry_schema import DriftReference, FeatureReference, FeatureScore

PROPORTION_FLOOR = 1e-4


def _window_proportions(counts: Sequence[int] | np.ndarray, bins: int) -> np.ndarray | None:
    observed = np.asarray(counts, dtype=np.float64)
    if observed.shape != (bins,):
        raise ValueError(f"counts have {observed.size} bins; the reference has {bins}")
    if (observed < 0).any():
        raise ValueError("counts must not be negative")
    total = observed.sum()
    return None if total == 0 else observed / total


def psi(reference_proportions: Sequence[float] | np.ndarray, counts: Sequence[int] | np.ndarray) -> float:
    """Population stability index of ``counts`` against the reference, in nats; 0.0 for an empty window.

    Both distributions are floored at :data:`PROPORTION_FLOOR` (not renormalised),
    the usual convention, so one empty bin cannot make the score infinite.
    """
    reference = np.asarray(reference_proportions, dtype=np.float64)
    window = _window_proportions(counts, reference.size)
    if window is None:
        return 0.0
    p = np.maximum(reference, PROPORTION_FLOOR)
    q = np.maximum(window, PROPORTION_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference_proportions: Sequence[float] | np.ndarray, counts: Sequence[int] | np.ndarray) -> float:
    """Jensen-Shannon distance (base-2 logs, so in [0, 1]) of ``counts`` against the reference; 0.0 for an empty window."""
    reference = np.asarray(reference_proportions, dtype=np.float64)
    window = _window_proportions(counts, reference.size)
    if window is None:
        return 0.0
    p = reference / reference.sum()
    middle = (p + window) / 2

    def _kl_to_middle(x: np.ndarray) -> float:
        present = x > 0
        return float(np.sum(x[present] * np.log2(x[present] / middle[present])))

    divergence = (_kl_to_middle(p) + _kl_to_middle(window)) / 2
    # Rounding can leave a hair below 0 or above 1.
    return float(np.sqrt(min(max(divergence, 0.0), 1.0)))


def score_feature(feature: FeatureReference, counts: Sequence[int] | np.ndarray) -> FeatureScore:
    """PSI and JS distance of one feature's window counts, and whether either passes its calibrated threshold."""
    psi_value = psi(feature.proportions, counts)
    js_value = js_distance(feature.proportions, counts)
    drifting = psi_value > feature.thresholds.psi or js_value > feature.thresholds.js
    return FeatureScore(psi=psi_value, js=js_value, drifting=drifting)


def score_histograms(reference: DriftReference, histograms: Mapping[str, Sequence[int]]) -> dict[str, FeatureScore]:
    """Scores for every reference feature that ``histograms`` carries with at least one count.

    Features the histograms lack (or that saw nothing) are left out rather than
    scored as "no drift"; histograms of features the reference does not know are
    ignored. Raises ValueError when a histogram has the wrong number of bins.
    """
    scores: dict[str, FeatureScore] = {}
    for name, feature in reference.features.items():
        counts = histograms.get(name)
        if counts is None or sum(counts) == 0:
            continue
        scores[name] = score_feature(feature, counts)
    return scores


def top_drifting(scores: Mapping[str, FeatureScore], reference: DriftReference, limit: int = 5) -> list[str]:
    """The drifting features, most drifting first: ordered by how far PSI passes its threshold (ratio)."""
    def excess(name: str) -> float:
        thresholds = reference.features[name].thresholds
        return max(scores[name].psi / thresholds.psi, scores[name].js / thresholds.js)

    return sorted((name for name, score in scores.items() if score.drifting), key=excess, reverse=True)[:limit]
