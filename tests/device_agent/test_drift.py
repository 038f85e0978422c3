"""Drift scores and the streaming monitor: known values, windows by count and time, alerts, privacy, calibration."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from device_agent import features as drift_features
from device_agent.drift import (
    PROPORTION_FLOOR,
    CaptureSettings,
    DriftMonitor,
    MonitorSettings,
    js_distance,
    psi,
    score_histograms,
)
from device_agent.telemetry_schema import (
    DriftReference,
    FeatureReference,
    ModelRef,
    Thresholds,
    WindowSummary,
)
from edgekit.drift_reference import build_reference, numeric_edges


def test_psi_known_values():
    assert psi([0.5, 0.5], [50, 50]) == 0.0
    expected = 0.4 * math.log(0.9 / 0.5) - 0.4 * math.log(0.1 / 0.5)
    assert psi([0.5, 0.5], [90, 10]) == pytest.approx(expected)
    # An empty window bin is floored, not infinite: q = 1e-4 against p = 0.5.
    floored = (1 - 0.5) * math.log(1 / 0.5) + (PROPORTION_FLOOR - 0.5) * math.log(PROPORTION_FLOOR / 0.5)
    assert psi([0.5, 0.5], [10, 0]) == pytest.approx(floored)
    assert psi([0.5, 0.5], [0, 0]) == 0.0


def test_js_distance_is_base_2_and_bounded():
    assert js_distance([1.0, 0.0], [0, 10]) == pytest.approx(1.0)
    assert js_distance([0.25, 0.75], [25, 75]) == pytest.approx(0.0, abs=1e-9)
    p, q = np.array([0.5, 0.5]), np.array([0.75, 0.25])
    m = (p + q) / 2
    divergence = 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
    assert js_distance(p, [3, 1]) == pytest.approx(math.sqrt(divergence))
    rng = np.random.default_rng(0)
    for _ in range(50):
        value = js_distance(rng.dirichlet(np.ones(6)), rng.integers(0, 50, 6))
        assert 0.0 <= value <= 1.0


def test_scores_refuse_wrong_bin_counts():
    with pytest.raises(ValueError, match="3 bins; the reference has 2"):
        psi([0.5, 0.5], [1, 2, 3])


def _reference(window_size: int = 100, min_window_size: int = 20, consecutive: int = 2) -> DriftReference:
    return DriftReference(
        task="tensor",
        reference_rows=1000,
        window_size=window_size,
        min_window_size=min_window_size,
        consecutive_for_alert=consecutive,
        features={
            "input.x.0": FeatureReference(kind="numeric", source="input", edges=[-1.0, 0.0, 1.0],
                                          proportions=[0.16, 0.34, 0.34, 0.16], thresholds=Thresholds(psi=0.2, js=0.2)),
            "output.predicted_class": FeatureReference(kind="categorical", source="output", categories=["a", "b"],
                                                       proportions=[0.5, 0.5], thresholds=Thresholds(psi=0.2, js=0.2)),
        },
    )


def test_score_histograms_skips_missing_and_empty_features():
    reference = _reference()
    scores = score_histograms(reference, {"input.x.0": [16, 34, 34, 16], "output.predicted_class": [0, 0], "unknown": [1]})
    assert list(scores) == ["input.x.0"]
    assert scores["input.x.0"].psi == pytest.approx(0.0) and not scores["input.x.0"].drifting
    shifted = score_histograms(reference, {"input.x.0": [0, 0, 10, 90]})
    assert shifted["input.x.0"].drifting


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _feed(monitor: DriftMonitor, values: np.ndarray, classes: np.ndarray) -> list[dict]:
    closed = []
    for value, cls in zip(values, classes, strict=True):
        window = monitor.observe({"input.x.0": np.array([value]), "output.predicted_class": np.array([cls])}, 1, 2.0)
        if window is not None:
            closed.append(window)
    return closed


def _normal(rng, n):
    return rng.normal(0, 1, n), rng.integers(0, 2, n)


def test_windows_close_by_count_and_are_valid_summaries():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(_reference(), ModelRef(name="m", version="1"), clock=FakeClock())
    windows = _feed(monitor, *_normal(rng, 250))
    assert [w["requests"] for w in windows] == [100, 100]
    assert monitor.rows == 50
    for sequence, window in enumerate(windows):
        summary = WindowSummary(**window, sequence=sequence)
        assert sum(summary.histograms["input.x.0"]) == 100 and sum(summary.histograms["output.predicted_class"]) == 100
        assert set(summary.scores) == {"input.x.0", "output.predicted_class"}
        assert summary.latency.p50_ms == pytest.approx(2.0)


def test_a_window_size_below_the_references_minimum_is_still_judged():
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(_reference(min_window_size=20), None, MonitorSettings(window_size=10), clock=FakeClock())
    windows = _feed(monitor, *_normal(rng, 30))
    assert [w["requests"] for w in windows] == [10, 10, 10]
    assert all(w["scores"] for w in windows), "full windows of the configured size are judged"


def test_windows_close_by_time_and_small_ones_are_not_judged():
    clock = FakeClock()
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(_reference(), None, MonitorSettings(window_seconds=60), clock=clock)
    _feed(monitor, *_normal(rng, 10))
    assert monitor.close_if_due() is None
    clock.now += 61
    small = monitor.close_if_due()
    assert small is not None and small["requests"] == 10 and small["scores"] == {} and not small["drifting"]
    assert sum(small["histograms"]["input.x.0"]) == 10  # reported, with its counts
    _feed(monitor, *_normal(rng, 50))
    clock.now += 61
    judged = monitor.close_if_due()
    assert judged["requests"] == 50 and set(judged["scores"]) == {"input.x.0", "output.predicted_class"}


def test_alert_needs_k_consecutive_drifting_windows_and_small_windows_do_not_break_the_run():
    rng = np.random.default_rng(3)
    clock = FakeClock()
    monitor = DriftMonitor(_reference(consecutive=3), None, clock=clock)
    shifted = (rng.normal(3, 0.5, 100), np.zeros(100, dtype=int))
    first = _feed(monitor, *shifted)[0]
    assert first["drifting"] and not first["alert"] and first["top_features"]
    second = _feed(monitor, *shifted)[0]
    assert second["drifting"] and not second["alert"]
    _feed(monitor, shifted[0][:5], shifted[1][:5])  # a tiny window closed by time: not judged
    clock.now += 10_000
    assert monitor.close_if_due()["scores"] == {}
    third = _feed(monitor, *shifted)[0]
    assert third["alert"] and monitor.alert_active
    calm = _feed(monitor, *_normal(rng, 100))[0]
    assert not calm["drifting"] and not calm["alert"] and not monitor.alert_active


def test_no_raw_input_is_kept_by_default():
    monitor = DriftMonitor(_reference(), None, clock=FakeClock())
    marker = 0.123456789
    for _ in range(99):
        monitor.observe({"input.x.0": np.array([marker]), "output.predicted_class": np.array([1])}, 1, 1.0)
    assert monitor.wants_sample() is False
    window = monitor.observe({"input.x.0": np.array([marker]), "output.predicted_class": np.array([1])}, 1, 1.0)
    text = json.dumps(WindowSummary(**window, sequence=0).model_dump(mode="json"))
    assert "0.123456" not in text and window["samples"] == []
    # Only counters remain in the monitor between requests.
    assert all(isinstance(c, int) for bins in monitor._bins.values() for c in bins.counts)


def test_capture_is_bounded_by_count_and_bytes():
    monitor = DriftMonitor(_reference(), None, MonitorSettings(capture=CaptureSettings(every=2, max_samples=3, max_bytes=10_000)),
                           clock=FakeClock())
    kept = 0
    for index in range(40):
        if monitor.wants_sample():
            kept += monitor.add_sample(text=f"text {index}", predicted="a")
        monitor.observe(None, 1, 1.0)
    assert kept == 3
    big = DriftMonitor(_reference(), None, MonitorSettings(capture=CaptureSettings(every=1, max_samples=100, max_bytes=5_000)),
                       clock=FakeClock())
    image = np.zeros((32, 32, 3), np.uint8)  # ~4 KB as base64: one fits, two do not
    assert big.add_sample(image=image) and not big.add_sample(image=image)
    window = big.close()
    summary = WindowSummary(**window, sequence=0)
    assert summary.samples[0].image.shape == [32, 32, 3]


def test_discrete_features_get_one_bin_per_value():
    edges = numeric_edges(np.array([0.0] * 50 + [1.0] * 5))
    assert edges == [-0.5, 0.5, 1.5]
    assert numeric_edges(np.zeros(20)) == [-0.5, 0.5]  # a constant: a new value lands in an overflow bin
    continuous = numeric_edges(np.random.default_rng(0).normal(size=500))
    assert len(continuous) == 11 and all(b > a for a, b in itertools.pairwise(continuous))


def _stream(rng, n, shift=0.0, prior=None):
    images = np.clip(rng.normal(100 + shift, 40, (n, 8, 8)), 0, 255).astype(np.uint8)
    classes = rng.integers(0, 5, n) if prior is None else rng.choice(5, n, p=prior)
    logits = rng.normal(0, 1, (n, 5))
    logits[np.arange(n), classes] += 2.5
    found = drift_features.image_features(images)
    found.update(drift_features.output_features(logits))
    return found


def _windows(monitor, found):
    closed = []
    for row in range(len(next(iter(found.values())))):
        window = monitor.observe({k: v[row:row + 1] for k, v in found.items()}, 1, 1.0)
        if window is not None:
            closed.append(window)
    return closed


def test_calibrated_reference_keeps_false_alarms_low_and_catches_shifts():
    rng = np.random.default_rng(7)
    reference = build_reference(_stream(rng, 4000), task="image-classification", labels=list("abcde"), window_size=200,
                                min_window_size=50)
    assert set(reference.features) == {"input.brightness", "input.contrast", "output.entropy",
                                       "output.predicted_class", "output.top_probability"}
    monitor = DriftMonitor(reference, None, clock=FakeClock())
    calm = _windows(monitor, _stream(rng, 200 * 200))
    false_alarms = sum(w["drifting"] for w in calm)
    assert false_alarms <= 4, f"{false_alarms} of 200 unshifted windows drifted"
    assert not any(w["alert"] for w in calm)
    bright = _windows(monitor, _stream(rng, 400, shift=15))
    assert all(w["drifting"] for w in bright) and bright[1]["alert"]
    assert bright[0]["top_features"][0] == "input.brightness"
    prior = _windows(monitor, _stream(rng, 400, prior=[0.6, 0.1, 0.1, 0.1, 0.1]))
    assert all(w["drifting"] for w in prior) and "output.predicted_class" in prior[0]["top_features"]


def test_quantile_bins_expect_new_values_beyond_the_reference_range():
    values = np.random.default_rng(3).normal(size=999)
    reference = build_reference({"x": values}, task="t", labels=[], window_size=100, bootstrap_windows=50)
    proportions = reference.features["x"].proportions
    # 1 / (N + 1) past each end: the chance that a new value falls beyond the smallest (largest) of N.
    assert proportions[0] == proportions[-1] == pytest.approx(1 / 1000)
    assert sum(proportions) == pytest.approx(1.0)
    discrete = build_reference({"x": np.array([0.0, 1.0] * 100)}, task="t", labels=[], window_size=100, bootstrap_windows=50)
    assert discrete.features["x"].proportions == [0.0, 0.5, 0.5, 0.0]  # one bin per value: an unseen value is news


def test_small_reference_keeps_false_alarms_low_on_fresh_unshifted_data():
    # A reference of 600 rows against windows of 300: every window has about one row beyond the reference's range
    # per feature, and the reference's own sampling error is a fixed offset for all windows. With the overflow bins
    # left empty and thresholds calibrated on the reference alone, 22 of these 600 windows (3.7%) drifted.
    rng = np.random.default_rng(11)
    drifting = windows = 0
    for seed in range(6):
        reference = build_reference(_stream(rng, 600), task="image-classification", labels=list("abcde"), window_size=300,
                                    min_window_size=60, seed=seed)
        monitor = DriftMonitor(reference, None, clock=FakeClock())
        fresh = _stream(rng, 300 * 100)
        for start in range(0, 300 * 100, 300):
            window = monitor.observe({name: values[start:start + 300] for name, values in fresh.items()}, 300, 1.0)
            drifting += window["drifting"]
            windows += 1
    assert drifting / windows <= 0.015, f"{drifting} of {windows} unshifted windows drifted"


def test_reference_round_trips_through_the_manifest_slot():
    rng = np.random.default_rng(8)
    reference = build_reference(_stream(rng, 600), task="image-classification", labels=list("abcde"), bootstrap_windows=50)
    again = DriftReference.model_validate(json.loads(reference.model_dump_json()))
    assert again == reference
    assert reference.features["output.predicted_class"].categories == list("abcde")


def _table_rows(rng, n, x_shift=0.0, colours=(0.5, 0.3, 0.2)):
    palette = np.array(["red", "green", "blue"])
    return [{"x": float(x), "colour": str(c)} for x, c in zip(rng.normal(x_shift, 1, n), rng.choice(palette, n, p=colours))]


def test_monitor_flags_drift_of_a_table_column():
    from device_agent.bundle import TableColumn, TablePreprocessing

    spec = TablePreprocessing(columns=[TableColumn(name="x", kind="numeric", fill=0.0),
                                       TableColumn(name="colour", kind="categorical", categories=["red", "green"])])
    layout = drift_features.table_layout(spec)
    rng = np.random.default_rng(12)
    reference = build_reference(drift_features.table_features(_table_rows(rng, 2000), layout), task="tabular-classification",
                                labels=[], window_size=200, min_window_size=50, bootstrap_windows=200, categories=layout.categories)
    assert reference.features["input.category.colour"].categories == ["red", "green", "other"]
    assert reference.features["input.category.colour"].proportions == pytest.approx([0.5, 0.3, 0.2], abs=0.03)
    monitor = DriftMonitor(reference, None, clock=FakeClock())

    def windows(rows):
        return _windows(monitor, drift_features.table_features(rows, layout))

    assert not any(w["drifting"] for w in windows(_table_rows(rng, 400)))
    shifted = windows(_table_rows(rng, 400, x_shift=1.5))
    assert all(w["drifting"] for w in shifted) and shifted[0]["top_features"] == ["input.column.x"]
    unseen = windows(_table_rows(rng, 400, colours=(0.2, 0.2, 0.6)))  # blue: never a training category, so "other"
    assert all(w["drifting"] for w in unseen) and unseen[0]["top_features"] == ["input.category.colour"]
    summary = WindowSummary(**unseen[1], sequence=0)
    assert summary.histograms["input.category.colour"][2] > summary.histograms["input.category.colour"][0]
