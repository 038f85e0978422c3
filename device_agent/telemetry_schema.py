"""The telemetry contract between a device and the fleet collector, declared once.

Two documents cross the wire and one travels in the bundle:

- ``DriftReference``: written by the build's package pass into the bundle's
  ``drift_reference`` slot. Fixed bin edges per feature (from reference
  quantiles) or categories, the reference proportions, and per-feature score
  thresholds calibrated on reference chunks. The device only increments counts
  against these bins; the collector recomputes fleet-wide drift from summed
  counts with the same reference.
- ``WindowSummary``: one closed monitoring window of one device, keyed by
  ``(device_id, sequence)``; ``sequence`` increases by one per window and is
  never reused by a device, so the collector can upsert and report gaps.
- ``UploadBatch`` / ``UploadAck``: ``POST /v1/telemetry`` with
  ``Authorization: Bearer <device token>``. The collector answers with the
  sequences it has stored (new or already present); the device deletes exactly
  those rows from its outbox.

Histograms carry counts only (never raw inputs): ``len(edges) + 1`` counts for a
numeric feature (underflow bin, the interior bins, overflow bin) and
``len(categories)`` counts for a categorical one.

Everything a device sends is bounded here, because the collector stores it and
every report reads it back: floats are finite (JSON's ``NaN``/``Infinity``
literals are refused), lists and maps have a maximum length, timestamps lie in
``[0, UNIX_TIME_MAX]``, and free-text names hold no control or bidirectional
formatting characters (they end up on operators' terminals). The collector adds
the checks that need its clock and its stored references.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
FeatureName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
# Counts are stored as 64-bit integers (SQLite INTEGER, PostgreSQL bigint): larger ones are refused here, with a 422.
COUNT_MAX = 2**62
Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]
MAX_WINDOWS_PER_BATCH = 1000
# Bins of one feature. The build makes at most 22 for a numeric feature and one per label for a categorical one
# (ImageNet's 1,000 fit); the bound keeps one histogram from becoming a list of millions.
MAX_BINS = 1024
# Features of one reference or window: the build makes a few dozen (input statistics and model outputs).
MAX_FEATURES = 512
# 2100-01-01T00:00:00Z. Past it a timestamp is a bug or an attack, and readers (local time, plots) stop working
# somewhere further on; the collector narrows a window's times to its own clock (see edgekit.fleet.collector).
UNIX_TIME_MAX = 4_102_444_800.0
UnixTime = Annotated[float, Field(ge=0, le=UNIX_TIME_MAX, description="unix seconds")]
# One day: no request takes that long, so a larger percentile is not a measurement.
LATENCY_MAX_MS = 86_400_000.0
# Reference proportions sum to 1 within this. The build writes float64 shares whose sum is off by under 1e-12 even
# for MAX_BINS bins; 1e-6 also admits a writer that rounds each of a few dozen shares to 8 digits, and still refuses
# percentages, a lost bin or a forgotten normalisation, each of which would skew every score computed against the reference.
PROPORTIONS_SUM_TOLERANCE = 1e-6

# Characters no name may hold: C0 controls, DEL and C1 controls (terminal escapes: U+009B is a one-character CSI),
# and the bidirectional formatting characters (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069), which reorder what a
# terminal shows (U+202E shows the text after it reversed). PostgreSQL text cannot hold NUL at all.
_UNPRINTABLE_CLASS = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE = re.compile(f"[{_UNPRINTABLE_CLASS}]")
PRINTABLE = f"^[^{_UNPRINTABLE_CLASS}]*$"  # a pattern for free text that may reach a terminal


def is_printable(text: str) -> bool:
    """Whether ``text`` holds none of the characters a name may not (see ``_UNPRINTABLE_CLASS``)."""
    return _UNPRINTABLE.search(text) is None


def escape_unprintable(text: str) -> str:
    """``text`` with each character a name may not hold written as ``\\uXXXX``: safe to print on a terminal.

    The one way a name read from the fleet database reaches a terminal; rows stored before the contract refused
    these characters may still hold them.
    """
    return _UNPRINTABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Thresholds(_Strict):
    """A window drifts on a feature when a score exceeds its threshold (finite, as every float here)."""

    psi: float = Field(gt=0)
    js: float = Field(gt=0)


class FeatureReference(_Strict):
    kind: Literal["numeric", "categorical"]
    source: Literal["input", "output"]
    edges: list[float] | None = Field(None, max_length=MAX_BINS - 1,
                                      description="ascending bin edges (numeric); counts have len(edges)+1 entries")
    categories: list[Annotated[str, Field(max_length=256, pattern=PRINTABLE)]] | None = Field(
        None, max_length=MAX_BINS, description="category names (categorical); counts have one entry per name")
    proportions: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        max_length=MAX_BINS, description="the reference distribution over the same bins, summing to 1")
    thresholds: Thresholds

    @model_validator(mode="after")
    def _bins_agree(self) -> "FeatureReference":
        if self.kind == "numeric":
            if not self.edges or self.categories is not None:
                raise ValueError("a numeric feature needs edges and no categories")
            if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
                raise ValueError("edges must be strictly ascending")
        elif not self.categories or self.edges is not None:
            raise ValueError("a categorical feature needs categories and no edges")
        if len(self.proportions) != self.bins:
            raise ValueError(f"proportions has {len(self.proportions)} entries; the bins need {self.bins}")
        total = sum(self.proportions)
        if abs(total - 1) > PROPORTIONS_SUM_TOLERANCE:
            raise ValueError(f"proportions sum to {total!r}; they must sum to 1 (within {PROPORTIONS_SUM_TOLERANCE:g})")
        return self

    @property
    def bins(self) -> int:
        return len(self.edges) + 1 if self.kind == "numeric" else len(self.categories or ())


class DriftReference(_Strict):
    """The bundle's drift reference: what "normal" looks like for this model's inputs and outputs."""

    format: Literal[1] = 1
    task: str
    features: dict[FeatureName, FeatureReference] = Field(max_length=MAX_FEATURES)
    reference_rows: int = Field(ge=1, le=COUNT_MAX)
    window_size: int = Field(500, ge=1, description="the window size the thresholds were calibrated for")
    min_window_size: int = Field(100, ge=1, description="smaller windows are reported but never judged")
    consecutive_for_alert: int = Field(2, ge=1, description="drifting windows in a row before an alert")


class ModelRef(_Strict):
    name: str = Field(max_length=128, pattern=PRINTABLE)
    version: str = Field(max_length=32, pattern=PRINTABLE)


LatencyMs = Annotated[float, Field(ge=0, le=LATENCY_MAX_MS)]


class Latency(_Strict):
    p50_ms: LatencyMs | None = None
    p95_ms: LatencyMs | None = None
    p99_ms: LatencyMs | None = None


class FeatureScore(_Strict):
    psi: float = Field(ge=0)
    js: float = Field(ge=0, le=1)
    drifting: bool


class CapturedImage(_Strict):
    shape: list[Annotated[int, Field(ge=1, le=8192)]] = Field(min_length=2, max_length=3, description="height, width[, channels]")
    data_base64: str = Field(description="the raw uint8 pixels, row-major, base64")


class CapturedSample(_Strict):
    """One raw input kept by the (opt-in, off by default) sampled capture, for retraining."""

    captured_at: UnixTime
    text: str | None = Field(None, max_length=100_000)
    image: CapturedImage | None = None
    predicted: str | None = Field(None, max_length=256, pattern=PRINTABLE,
                                  description="the model's label for it (a pseudo-label: review before training)")

    @model_validator(mode="after")
    def _one_input(self) -> "CapturedSample":
        if (self.text is None) == (self.image is None):
            raise ValueError("a sample carries exactly one of text or image")
        return self


Histograms = Annotated[dict[FeatureName, Annotated[list[Count], Field(max_length=MAX_BINS)]], Field(max_length=MAX_FEATURES)]
Scores = Annotated[dict[FeatureName, FeatureScore], Field(max_length=MAX_FEATURES)]


class WindowSummary(_Strict):
    sequence: Count
    started_at: UnixTime
    ended_at: UnixTime = Field(description="unix seconds, at or after started_at")
    model: ModelRef | None = Field(None, description="None while no model is active")
    reference_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="sha256 of the canonical JSON of the DriftReference")
    requests: Count
    errors: Count = Field(description="at most requests")
    latency: Latency = Latency()
    histograms: Histograms = Field(default_factory=dict)
    scores: Scores = Field(default_factory=dict, description="empty when the window was too small to judge")
    drifting: bool = False
    alert: bool = Field(False, description="this window completes k consecutive drifting windows (or continues such a run)")
    top_features: list[FeatureName] = Field(default_factory=list, max_length=10)
    evicted_total: int = Field(0, ge=0, le=COUNT_MAX, description="outbox rows this device has evicted unsent, since it was installed")
    samples: list[CapturedSample] = Field(default_factory=list, max_length=1000, description="only when capture is enabled")

    @model_validator(mode="after")
    def _consistent(self) -> "WindowSummary":
        problem = window_inconsistency(self.started_at, self.ended_at, self.requests, self.errors)
        if problem:
            raise ValueError(problem)
        return self


def window_inconsistency(started_at: float, ended_at: float, requests: int, errors: int) -> str | None:
    """What makes a window's fields contradict each other, or None; the one rule for sent and stored windows."""
    if errors > requests:
        return f"errors ({errors}) must be at most requests ({requests})"
    if started_at > ended_at:
        return f"started_at ({started_at!r}) must be at or before ended_at ({ended_at!r})"
    return None


class UploadBatch(_Strict):
    device_id: DeviceId
    windows: list[WindowSummary] = Field(min_length=1, max_length=MAX_WINDOWS_PER_BATCH)
    references: dict[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")], DriftReference] = Field(
        default_factory=dict, description="the references the windows name, by sha256; the collector keeps each once"
    )


class UploadAck(_Strict):
    stored: list[int] = Field(description="sequences now stored (newly or before): the device may delete these rows")
    duplicates: int = Field(0, ge=0, description="how many of them were already stored")


def reference_sha256(reference: DriftReference) -> str:
    """The digest windows use to name their reference: sha256 of its canonical JSON."""
    import hashlib
    import json

    canonical = json.dumps(reference.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
