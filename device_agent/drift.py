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

import base64
import random
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import isfinite, isnan

import numpy as np

from device_agent.telemetry_schema import (
    LATENCY_MAX_MS,
    CapturedImage,
    CapturedSample,
    DriftReference,
    FeatureReference,
    FeatureScore,
    Latency,
    ModelRef,
    is_printable,
    reference_sha256,
)

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


def threshold_scale(calibrated_rows: int, rows: int | None) -> float:
    """How much wider PSI thresholds get for a window smaller than the one they were calibrated on.

    Under no drift PSI's sampling noise shrinks like 1/rows (a chi-square over
    rows), so a window of half the size needs twice the PSI threshold for the
    same false-alarm rate; JS distance, a square root, needs the square root of
    that. Larger windows keep the calibrated thresholds (conservative).
    """
    if rows is None or rows <= 0 or rows >= calibrated_rows:
        return 1.0
    return calibrated_rows / rows


def score_feature(feature: FeatureReference, counts: Sequence[int] | np.ndarray, scale: float = 1.0) -> FeatureScore:
    """PSI and JS distance of one feature's window counts, and whether either passes its calibrated threshold.

    ``scale`` (see :func:`threshold_scale`) widens the PSI threshold by itself and the JS one by its square root.
    """
    psi_value = psi(feature.proportions, counts)
    js_value = js_distance(feature.proportions, counts)
    drifting = psi_value > feature.thresholds.psi * scale or js_value > feature.thresholds.js * float(np.sqrt(scale))
    return FeatureScore(psi=psi_value, js=js_value, drifting=drifting)


def score_histograms(
    reference: DriftReference, histograms: Mapping[str, Sequence[int]], *, rows: int | None = None
) -> dict[str, FeatureScore]:
    """Scores for every reference feature that ``histograms`` carries with at least one count.

    Features the histograms lack (or that saw nothing) are left out rather than
    scored as "no drift"; histograms of features the reference does not know are
    ignored. ``rows``, when given and smaller than the reference's
    ``window_size``, widens the thresholds for the smaller window (a device's
    time-closed windows). Raises ValueError when a histogram has the wrong
    number of bins.
    """
    scale = threshold_scale(reference.window_size, rows)
    scores: dict[str, FeatureScore] = {}
    for name, feature in reference.features.items():
        counts = histograms.get(name)
        if counts is None or sum(counts) == 0:
            continue
        scores[name] = score_feature(feature, counts, scale)
    return scores


def top_drifting(scores: Mapping[str, FeatureScore], reference: DriftReference, limit: int = 5) -> list[str]:
    """The drifting features, most drifting first: ordered by how far PSI passes its threshold (ratio)."""
    def excess(name: str) -> float:
        thresholds = reference.features[name].thresholds
        return max(scores[name].psi / thresholds.psi, scores[name].js / thresholds.js)

    return sorted((name for name, score in scores.items() if score.drifting), key=excess, reverse=True)[:limit]


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The bin of each value: 0 below ``edges[0]``, i for ``edges[i-1] <= v < edges[i]``, len(edges) from the last edge up.

    The one binning rule, used for the reference at build time and for counts on the device.
    """
    return np.searchsorted(edges, values, side="right")


# --------------------------------------------------------------------------- the streaming monitor

# Latencies kept per window for its percentiles; past this a reservoir sample keeps the memory flat.
_LATENCY_RESERVOIR = 4096


@dataclass(frozen=True)
class CaptureSettings:
    """Opt-in sampled capture of raw inputs for retraining: every ``every``-th row, at most ``max_samples`` / ``max_bytes`` per window."""

    every: int = 100
    max_samples: int = 20
    max_bytes: int = 1 << 20


@dataclass(frozen=True)
class MonitorSettings:
    window_size: int | None = None  # None: the reference's (500 without one)
    window_seconds: float = 300.0
    min_window_size: int | None = None  # None: the reference's
    consecutive_for_alert: int | None = None  # None: the reference's
    capture: CaptureSettings | None = None  # None: no raw input is ever kept


class _NumericBins:
    # Python lists and bisect: for the one to few rows of a request this is several times faster than numpy calls.
    __slots__ = ("counts", "edges")

    def __init__(self, edges: list[float]) -> None:
        self.edges = [float(edge) for edge in edges]
        self.counts = [0] * (len(edges) + 1)

    def add(self, values: np.ndarray) -> None:
        counts, edges = self.counts, self.edges
        for value in values.tolist():
            if not isnan(value):  # NaN has no bin
                counts[bisect_right(edges, value)] += 1


class _CategoricalBins:
    __slots__ = ("counts",)

    def __init__(self, categories: list[str]) -> None:
        self.counts = [0] * len(categories)

    def add(self, values: np.ndarray) -> None:
        counts = self.counts
        for index in values.tolist():
            # A class index the reference does not know is dropped: there is no bin to put it in.
            if 0 <= index < len(counts):
                counts[int(index)] += 1


class DriftMonitor:
    """Windows of one served model version: counts per request, drift judged when a window closes.

    ``observe`` only increments counters (histogram bins from fixed edges,
    requests, errors, a bounded latency sample): no raw input is kept unless
    capture is enabled. A window closes when it has ``window_size`` rows
    (``observe`` returns it) or when ``window_seconds`` have passed since it
    opened (``close_if_due`` returns it). A closed window is a dict of
    ``WindowSummary`` fields without ``sequence`` and ``evicted_total``, which
    the outbox assigns. Windows below ``min_window_size`` rows are reported
    but not judged, and leave the run of drifting windows as it was.

    Not thread-safe: the agent calls it from its event loop only.
    """

    def __init__(
        self,
        reference: DriftReference | None,
        model: ModelRef | None,
        settings: MonitorSettings = MonitorSettings(),
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.reference = reference
        self.reference_sha256 = reference_sha256(reference) if reference is not None else None
        self.model = model
        self.window_size = settings.window_size or (reference.window_size if reference else 500)
        self.window_seconds = settings.window_seconds
        # A window_size below the reference's minimum would leave every full window unjudged: the smaller size wins
        # (thresholds widen for small windows in score_histograms).
        self.min_window_size = min(settings.min_window_size or (reference.min_window_size if reference else 100), self.window_size)
        self.consecutive_for_alert = settings.consecutive_for_alert or (reference.consecutive_for_alert if reference else 2)
        self.capture = settings.capture
        self._clock = clock
        self._random = random.Random(seed)
        self.drifting_run = 0
        self.last_judged: dict | None = None  # the last window that had scores (for /metrics)
        self._open_window()

    def _open_window(self) -> None:
        self.started_at = self._clock()
        self.rows = 0
        self.requests = 0
        self.errors = 0
        self._latencies: list[float] = []
        self._latency_seen = 0
        self._samples: list[CapturedSample] = []
        self._sample_bytes = 0
        self._bins: dict[str, _NumericBins | _CategoricalBins] = {}
        if self.reference is not None:
            for name, feature in self.reference.features.items():
                self._bins[name] = _NumericBins(feature.edges) if feature.kind == "numeric" else _CategoricalBins(feature.categories)

    # -- per request

    def observe(self, features: Mapping[str, np.ndarray] | None, rows: int, latency_ms: float | None, error: bool = False) -> dict | None:
        """Count one request of ``rows`` rows; the closed window when this one fills it, else None."""
        self.requests += 1
        if error:
            self.errors += 1
        else:
            self.rows += rows
        if latency_ms is not None and isfinite(latency_ms):  # the contract takes finite percentiles only
            self._latency_seen += 1
            if len(self._latencies) < _LATENCY_RESERVOIR:
                self._latencies.append(latency_ms)
            else:
                slot = self._random.randrange(self._latency_seen)
                if slot < _LATENCY_RESERVOIR:
                    self._latencies[slot] = latency_ms
        if features:
            bins = self._bins
            for name, values in features.items():
                target = bins.get(name)
                if target is not None:
                    target.add(values)
        if self.rows >= self.window_size:
            return self.close()
        return None

    def wants_sample(self) -> bool:
        """Whether to capture the raw input of the request about to be observed (capture on, its turn, room left)."""
        capture = self.capture
        if capture is None or len(self._samples) >= capture.max_samples or self._sample_bytes >= capture.max_bytes:
            return False
        return self.requests % capture.every == 0

    def add_sample(self, *, text: str | None = None, image: np.ndarray | None = None, predicted: str | None = None) -> bool:
        """Keep one raw input in the window when it fits the bounds; whether it was kept.

        A ``predicted`` label the contract refuses (control or bidirectional characters) is left out: the sample is
        kept unlabelled, as export-samples shows it.
        """
        capture = self.capture
        if capture is None or len(self._samples) >= capture.max_samples:
            return False
        if predicted is not None and not is_printable(predicted):
            predicted = None
        if image is not None:
            pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
            size = pixels.nbytes * 4 // 3 + 64
            if self._sample_bytes + size > capture.max_bytes:
                return False
            sample = CapturedSample(
                captured_at=self._clock(), predicted=predicted,
                image=CapturedImage(shape=list(pixels.shape), data_base64=base64.b64encode(pixels.tobytes()).decode()),
            )
        elif text is not None:
            size = len(text.encode("utf-8")) + 64
            if self._sample_bytes + size > capture.max_bytes:
                return False
            sample = CapturedSample(captured_at=self._clock(), text=text, predicted=predicted)
        else:
            return False
        self._samples.append(sample)
        self._sample_bytes += size
        return True

    # -- closing windows

    def close_if_due(self) -> dict | None:
        """The window when ``window_seconds`` have passed since it opened, else None."""
        if self._clock() - self.started_at >= self.window_seconds:
            return self.close()
        return None

    def close(self) -> dict:
        """Close the open window now: judge it (when large enough), open the next, and return its fields."""
        ended_at = self._clock()
        histograms = {name: list(bins.counts) for name, bins in self._bins.items()}
        scores: dict[str, FeatureScore] = {}
        drifting = alert = False
        top: list[str] = []
        if self.reference is not None and self.rows >= self.min_window_size:
            scores = score_histograms(self.reference, histograms, rows=self.rows)
            drifting = any(score.drifting for score in scores.values())
            self.drifting_run = self.drifting_run + 1 if drifting else 0
            alert = self.drifting_run >= self.consecutive_for_alert
            top = top_drifting(scores, self.reference)
        latencies = np.asarray(self._latencies) if self._latencies else None
        window = {
            "started_at": self.started_at,
            "ended_at": max(ended_at, self.started_at),
            "model": self.model,
            "reference_sha256": self.reference_sha256,
            "requests": self.requests,
            "errors": self.errors,
            "latency": Latency(
                **{f"p{q}_ms": min(float(np.percentile(latencies, q)), LATENCY_MAX_MS) for q in (50, 95, 99)}
                if latencies is not None else {}
            ),
            "histograms": histograms,
            "scores": scores,
            "drifting": drifting,
            "alert": alert,
            "top_features": top,
            "samples": self._samples,
        }
        if scores:
            self.last_judged = window
        self._open_window()
        return window

    @property
    def alert_active(self) -> bool:
        return self.drifting_run >= self.consecutive_for_alert
