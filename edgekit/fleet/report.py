"""The fleet review: per-device numbers, fleet-wide drift and alerts, computed once for every output.

The terminal table, ``--json``, the HTML report, ``edgekit fleet alerts`` and the
collector's ``/v1/report`` all read a ``FleetReport`` from ``build_report``, so
a number means the same thing everywhere. Definitions (over the windows in the
period, i.e. that ended at or after ``since``):

- requests, errors: sums; error rate = errors / requests (None without requests).
- p95 latency: the highest window p95. Windows carry percentiles, not raw
  latencies, so the period's exact p95 cannot be recomputed; the highest window
  p95 is a true upper bound of it (in every window at least 95% of requests are
  at or under their window's p95, hence under the maximum). ``p95_ms_latest`` is
  the most recent window's.
- drift status: from the windows the device judged (large enough to score), by
  sequence: ``alert`` when the latest judged window is an alert window,
  ``drifting`` when it drifts without an alert yet, ``ok``, or ``unknown`` when
  no window was judged. ``since`` is when the status began: the start of the
  current run of alert windows (or of drifting windows).
- outbox evictions: the device's cumulative ``evicted_total`` (highest seen).
- last seen: when the collector last stored a window of the device.
- sequence gaps: sequences missing between the first and last stored one
  (telemetry the device evicted, or has yet to deliver).
- fleet-wide drift, per model version and drift reference: the windows'
  histogram counts summed over every device, scored against the reference with
  ``device_agent.drift.score_histograms``, the same function a device uses on
  one window.
- skipped windows: stored rows that do not read as a window (written before the
  contract refused what they hold: a NaN, broken JSON, an absurd time); they
  count nowhere else, and every output says how many there were.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from device_agent.telemetry_schema import DriftReference, FeatureScore
from edgekit.fleet.store import FleetError, Store, StoredWindow, WindowedSample

if TYPE_CHECKING:
    from device_agent.classifier import Classifier
    from edgekit.fleet.export import SampleExplainer

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> float:
    """A duration such as 90s, 30m, 2h, 1d or 2w, in seconds."""
    match = _RELATIVE.match(text)
    if not match:
        raise FleetError(f"{option} {text!r} is not a duration; use a number and a unit: 90s, 30m, 2h, 1d or 2w")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``--since``: a duration back from now (30m, 24h, 7d, 2w), an ISO date or date-time, or unix seconds."""
    if text is None or not text.strip():
        return None
    now = time.time() if now is None else now
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise FleetError(
            f"--since {text!r} is not a time; use a duration back from now (30m, 24h, 7d), "
            "an ISO date or date-time (2025-06-01, 2025-06-01T12:00, with +00:00 for UTC), or unix seconds"
        ) from None
    return moment.timestamp()  # a naive time is local time, as the table prints it


@dataclass(frozen=True)
class DeviceReport:
    device_id: str
    model_name: str | None
    model_version: str | None
    windows: int
    requests: int
    errors: int
    error_rate: float | None
    p95_ms: float | None
    p95_ms_latest: float | None
    status: str  # ok | drifting | alert | unknown
    status_since: float | None
    top_features: list[str]
    evicted_total: int
    sequence_gaps: int
    first_window_start: float | None
    last_window_end: float | None
    last_seen: float | None


@dataclass(frozen=True)
class FleetDrift:
    model_name: str
    model_version: str
    reference_sha256: str
    devices: int
    windows: int
    requests: int
    drifting: bool
    top_features: list[str]
    scores: dict[str, FeatureScore]
    reference_missing: bool = False


@dataclass(frozen=True)
class FleetReport:
    generated_at: float
    since: float | None
    devices: list[DeviceReport]
    fleet_drift: list[FleetDrift]
    windows: list[StoredWindow] = field(repr=False)
    skipped_windows: int = 0  # stored rows left out: they do not read as a window (see StoredWindow.from_row)

    def to_dict(self) -> dict:
        """The JSON document of ``--json`` and ``/v1/report`` (windows left out: query them separately)."""
        return {
            "generated_at": self.generated_at,
            "since": self.since,
            "skipped_windows": self.skipped_windows,
            "devices": [asdict(device) for device in self.devices],
            "fleet_drift": [
                {**{k: v for k, v in asdict(entry).items() if k != "scores"},
                 "scores": {name: score.model_dump() for name, score in entry.scores.items()}}
                for entry in self.fleet_drift
            ],
        }


def build_report(store: Store, *, since: float | None = None, device: str | None = None, now: float | None = None) -> FleetReport:
    """The fleet review over windows that ended at or after ``since``, for one device or all."""
    if device is not None:
        store.require_device(device)
    windows, skipped = store.fetch_windows(device=device, since=since)
    by_device: dict[str, list[StoredWindow]] = defaultdict(list)
    for window in windows:
        by_device[window.device_id].append(window)
    known = [row.id for row in store.list_devices()] if device is None else [device]
    devices = [device_report(name, by_device.get(name, [])) for name in known]
    digests = {window.reference_sha256 for window in windows if window.reference_sha256}
    references = store.references(digests) if digests else {}
    return FleetReport(
        generated_at=time.time() if now is None else now,
        since=since,
        devices=devices,
        fleet_drift=fleet_drift(windows, references),
        windows=windows,
        skipped_windows=skipped,
    )


def device_report(device_id: str, windows: list[StoredWindow]) -> DeviceReport:
    """One device's numbers from its windows (any order)."""
    windows = sorted(windows, key=lambda window: window.sequence)
    requests = sum(window.requests for window in windows)
    errors = sum(window.errors for window in windows)
    p95s = [window.p95_ms for window in windows if window.p95_ms is not None]
    with_model = [window for window in windows if window.model_name is not None]
    status, since, top = drift_status(windows)
    gaps = (windows[-1].sequence - windows[0].sequence + 1 - len(windows)) if windows else 0
    return DeviceReport(
        device_id=device_id,
        model_name=with_model[-1].model_name if with_model else None,
        model_version=with_model[-1].model_version if with_model else None,
        windows=len(windows),
        requests=requests,
        errors=errors,
        error_rate=errors / requests if requests else None,
        p95_ms=max(p95s) if p95s else None,
        p95_ms_latest=p95s[-1] if p95s else None,
        status=status,
        status_since=since,
        top_features=top,
        evicted_total=max((window.evicted_total for window in windows), default=0),
        sequence_gaps=gaps,
        first_window_start=min((window.started_at for window in windows), default=None),
        last_window_end=max((window.ended_at for window in windows), default=None),
        last_seen=max((window.received_at for window in windows), default=None),
    )


def drift_status(windows: list[StoredWindow]) -> tuple[str, float | None, list[str]]:
    """(status, when it began, top drifting features) from windows in sequence order; see the module's definitions."""
    judged = [window for window in windows if window.judged]
    if not judged:
        return "unknown", None, []
    latest = judged[-1]
    if not latest.drifting and not latest.alert:
        return "ok", None, []
    flag = "alert" if latest.alert else "drifting"
    run_start = latest
    for window in reversed(judged):
        if not getattr(window, flag):
            break
        run_start = window
    top = list(latest.top_features) or sorted(
        (name for name, score in latest.scores.items() if score.drifting),
        key=lambda name: latest.scores[name].psi, reverse=True,
    )[:5]
    return flag, run_start.started_at, top


def fleet_drift(windows: list[StoredWindow], references: dict[str, DriftReference]) -> list[FleetDrift]:
    """Drift per (model, version, reference) from histogram counts summed over every device's windows."""
    from device_agent.drift import score_histograms, top_drifting

    groups: dict[tuple[str, str, str], list[StoredWindow]] = defaultdict(list)
    for window in windows:
        if window.model_name and window.model_version and window.reference_sha256:
            groups[(window.model_name, window.model_version, window.reference_sha256)].append(window)
    results = []
    for (name, version, digest), members in sorted(groups.items()):
        reference = references.get(digest)
        scores: dict[str, FeatureScore] = {}
        if reference is not None:
            summed = sum_histograms(members, reference)
            scores = score_histograms(reference, summed, rows=sum(window.requests for window in members))
        results.append(FleetDrift(
            model_name=name,
            model_version=version,
            reference_sha256=digest,
            devices=len({window.device_id for window in members}),
            windows=len(members),
            requests=sum(window.requests for window in members),
            drifting=any(score.drifting for score in scores.values()),
            top_features=top_drifting(scores, reference) if reference is not None else [],
            scores=scores,
            reference_missing=reference is None,
        ))
    return results


def sum_histograms(windows: list[StoredWindow], reference: DriftReference) -> dict[str, list[int]]:
    """Counts added bin by bin per reference feature; a histogram with the wrong number of bins is left out."""
    sums: dict[str, list[int]] = {}
    for window in windows:
        for name, counts in window.histograms.items():
            feature = reference.features.get(name)
            if feature is None or len(counts) != feature.bins:
                continue
            total = sums.setdefault(name, [0] * feature.bins)
            for index, count in enumerate(counts):
                total[index] += count
    return sums


# --------------------------------------------------------------------------- what drifted traffic leans on

EXPLAINED_PER_SIDE = 50  # samples explained per device and side (drifted, reference): each costs a run per word or patch
TOP_WORDS = 10


@dataclass(frozen=True)
class WordLean:
    token: str  # lower-cased: the words' case is one word to an uncased tokenizer, and to the reader
    lean: float  # the word's positive scores summed over the explained samples, divided by their number
    samples: int  # how many of those samples it supports the prediction in


@dataclass(frozen=True)
class TrafficLean:
    """What one set of samples' predictions rest on: the top words (texts), or the mean heat map (images)."""

    samples: int  # explained
    words: list[WordLean]  # texts: the TOP_WORDS of highest lean
    leans: dict[str, float] = field(default_factory=dict)  # texts: every supporting word's lean, to compare sides
    heatmap: np.ndarray | None = None  # images: the mean heat map over the model's view
    pixels: np.ndarray | None = None  # images: the mean of the model's views, to draw the heat map over

    def lean_of(self, token: str) -> float:
        return self.leans.get(token, 0.0)


@dataclass(frozen=True)
class DeviceLean:
    device_id: str
    status: str  # drifting | alert
    drifted: TrafficLean | None  # samples of its drifting windows
    reference: TrafficLean | None  # samples of its windows judged not drifting: the traffic the model was fine with
    note: str | None = None  # why a side is missing
    unreadable: int = 0  # captured images (both sides) that could not be decoded: skipped, not explained
    unreadable_problem: str | None = None  # why the first of them could not be


@dataclass(frozen=True)
class DriftExplained:
    model: str  # "name version" of the bundle whose model explained the samples
    per_side: int  # at most this many samples explained per device and side
    devices: list[DeviceLean]


def explain_drifted_traffic(store: Store, report: FleetReport, classifier: Classifier,
                            per_side: int = EXPLAINED_PER_SIDE) -> DriftExplained:
    """For each drifting or alerting device of ``report``: what the samples captured in its drifting windows lean on,
    and what those of its non-drifting windows (the reference) lean on, over the report's period.

    Only samples the bundle's own model version answered count (another version's explanation says nothing about the
    device's answers); at most ``per_side`` of each side, the newest, are explained.
    """
    from edgekit.fleet.export import SampleExplainer

    if classifier.input_kind not in ("text", "image"):
        raise FleetError(f"--bundle: {classifier.name} takes {classifier.input_kind} input; devices capture texts and "
                         "images only, so there is nothing of its kind to explain")
    model = (classifier.manifest.model.name, classifier.manifest.model.version)
    devices = []
    for device in report.devices:
        if device.status not in ("drifting", "alert"):
            continue
        sides = [store.fetch_samples(device.device_id, model=model, drifting=drifting, since=report.since,
                                  newest=per_side)[0] for drifting in (True, False)]
        unreadable: list[str] = []
        drifted, reference = (_traffic_lean(SampleExplainer(classifier), samples, unreadable) for samples in sides)
        note = None
        if drifted is None:
            note = f"no {classifier.input_kind} samples of {classifier.name} were captured in its drifting windows"
            if device.model_name and (device.model_name, device.model_version) != model:
                note += f" (it serves {device.model_name} {device.model_version}: explain with that version's bundle)"
        elif reference is None:
            note = (f"no reference: no {classifier.input_kind} samples of {classifier.name} were captured in its windows "
                    "judged not drifting")
        devices.append(DeviceLean(device.device_id, device.status, drifted, reference, note, len(unreadable),
                                  unreadable[0] if unreadable else None))
    return DriftExplained(classifier.name, per_side, devices)


def _traffic_lean(explainer: SampleExplainer, samples: list[WindowedSample], unreadable: list[str]) -> TrafficLean | None:
    """The aggregate of the samples' explanations (``edgekit.explanations.tally_words`` and ``mean_view``, as the
    build report aggregates its own); None when none of them could be explained. A captured image that cannot be
    decoded is skipped, and why is appended to ``unreadable``: one bad sample must not cost the whole report."""
    from edgekit.explanations import mean_view, tally_words
    from edgekit.fleet.export import captured_image

    kind = explainer.classifier.input_kind
    explanations = []
    for windowed in samples:
        sample = windowed.sample
        if kind == "text" and sample.text is not None:
            explanation = explainer.explain(windowed, sample.text)
        elif kind == "image" and sample.image is not None:
            try:
                pixels = captured_image(sample)
            except FleetError as error:
                unreadable.append(str(error))
                continue
            explanation = explainer.explain(windowed, pixels)
        else:
            continue
        if explanation is not None:
            explanations.append(explanation)
    if not explanations:
        return None
    if kind == "image":
        pixels, heatmap = mean_view(explanations)
        return TrafficLean(len(explanations), [], heatmap=heatmap, pixels=pixels)
    tallies = tally_words(explanations, lowercase=True)
    leans = {token: tally.positive_total / len(explanations) for token, tally in tallies.items() if tally.supporting}
    top = sorted(leans, key=lambda token: (-leans[token], token))[:TOP_WORDS]
    return TrafficLean(len(explanations), [WordLean(token, leans[token], tallies[token].supporting) for token in top], leans)


# --------------------------------------------------------------------------- alerts


@dataclass(frozen=True)
class AlertThresholds:
    max_error_rate: float | None = 0.05
    max_p95_ms: float | None = None
    max_evictions: int | None = None
    stale_after_s: float | None = None
    fleet_drift: bool = True


@dataclass(frozen=True)
class Alert:
    subject: str  # a device id, or "fleet:<model>@<version>"
    reasons: list[str]


def alerts(report: FleetReport, thresholds: AlertThresholds) -> list[Alert]:
    """Every device (and fleet-wide model version) past a threshold, with the reasons in words."""
    found = []
    for device in report.devices:
        reasons = []
        if device.status == "alert":
            features = f" ({', '.join(device.top_features)})" if device.top_features else ""
            reasons.append(f"drift alert since {format_time(device.status_since)}{features}")
        if thresholds.max_error_rate is not None and device.error_rate is not None and device.error_rate > thresholds.max_error_rate:
            reasons.append(f"error rate {device.error_rate:.1%} > {thresholds.max_error_rate:.1%}")
        if thresholds.max_p95_ms is not None and device.p95_ms is not None and device.p95_ms > thresholds.max_p95_ms:
            reasons.append(f"p95 latency {device.p95_ms:.1f} ms > {thresholds.max_p95_ms:g} ms")
        if thresholds.max_evictions is not None and device.evicted_total > thresholds.max_evictions:
            reasons.append(f"outbox evicted {device.evicted_total} windows unsent > {thresholds.max_evictions}")
        if thresholds.stale_after_s is not None and (
            device.last_seen is None or report.generated_at - device.last_seen > thresholds.stale_after_s
        ):
            reasons.append(f"not seen since {format_time(device.last_seen)}")
        if reasons:
            found.append(Alert(device.device_id, reasons))
    if thresholds.fleet_drift:
        for entry in report.fleet_drift:
            if entry.drifting:
                found.append(Alert(
                    f"fleet:{entry.model_name}@{entry.model_version}",
                    [f"fleet-wide drift over {entry.devices} devices ({', '.join(entry.top_features)})"],
                ))
    return found


def format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
