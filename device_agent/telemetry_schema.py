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
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
FeatureName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
# Counts are stored as 64-bit integers (SQLite INTEGER, PostgreSQL bigint): larger ones are refused here, with a 422.
COUNT_MAX = 2**62
# Names stored in database text columns: no control characters (PostgreSQL text cannot hold NUL at all).
_NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]*$"
MAX_WINDOWS_PER_BATCH = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    """A window drifts on a feature when a score exceeds its threshold."""

    psi: float = Field(gt=0)
    js: float = Field(gt=0)


class FeatureReference(_Strict):
    kind: Literal["numeric", "categorical"]
    source: Literal["input", "output"]
    edges: list[float] | None = Field(None, description="ascending bin edges (numeric); counts have len(edges)+1 entries")
    categories: list[str] | None = Field(None, description="category names (categorical); counts have one entry per name")
    proportions: list[float] = Field(description="the reference distribution over the same bins, summing to 1")
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
        return self

    @property
    def bins(self) -> int:
        return len(self.edges) + 1 if self.kind == "numeric" else len(self.categories or ())


class DriftReference(_Strict):
    """The bundle's drift reference: what "normal" looks like for this model's inputs and outputs."""

    format: Literal[1] = 1
    task: str
    features: dict[FeatureName, FeatureReference]
    reference_rows: int = Field(ge=1, le=COUNT_MAX)
    window_size: int = Field(500, ge=1, description="the window size the thresholds were calibrated for")
    min_window_size: int = Field(100, ge=1, description="smaller windows are reported but never judged")
    consecutive_for_alert: int = Field(2, ge=1, description="drifting windows in a row before an alert")


class ModelRef(_Strict):
    name: str = Field(max_length=128, pattern=_NO_CONTROL_CHARACTERS)
    version: str = Field(max_length=32, pattern=_NO_CONTROL_CHARACTERS)


class Latency(_Strict):
    p50_ms: float | None = Field(None, ge=0)
    p95_ms: float | None = Field(None, ge=0)
    p99_ms: float | None = Field(None, ge=0)


class FeatureScore(_Strict):
    psi: float = Field(ge=0)
    js: float = Field(ge=0, le=1)
    drifting: bool


class CapturedImage(_Strict):
    shape: list[Annotated[int, Field(ge=1, le=8192)]] = Field(min_length=2, max_length=3, description="height, width[, channels]")
    data_base64: str = Field(description="the raw uint8 pixels, row-major, base64")


class CapturedSample(_Strict):
    """One raw input kept by the (opt-in, off by default) sampled capture, for retraining."""

    captured_at: float = Field(ge=0)
    text: str | None = Field(None, max_length=100_000)
    image: CapturedImage | None = None
    predicted: str | None = Field(None, max_length=256, pattern=_NO_CONTROL_CHARACTERS,
                                  description="the model's label for it (a pseudo-label: review before training)")

    @model_validator(mode="after")
    def _one_input(self) -> "CapturedSample":
        if (self.text is None) == (self.image is None):
            raise ValueError("a sample carries exactly one of text or image")
        return self


class WindowSummary(_Strict):
    sequence: int = Field(ge=0, le=COUNT_MAX)
    started_at: float = Field(ge=0, description="unix seconds")
    ended_at: float = Field(ge=0, description="unix seconds")
    model: ModelRef | None = Field(None, description="None while no model is active")
    reference_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="sha256 of the canonical JSON of the DriftReference")
    requests: int = Field(ge=0, le=COUNT_MAX)
    errors: int = Field(ge=0, le=COUNT_MAX)
    latency: Latency = Latency()
    histograms: dict[FeatureName, list[Annotated[int, Field(ge=0, le=COUNT_MAX)]]] = Field(default_factory=dict)
    scores: dict[FeatureName, FeatureScore] = Field(default_factory=dict, description="empty when the window was too small to judge")
    drifting: bool = False
    alert: bool = Field(False, description="this window completes k consecutive drifting windows (or continues such a run)")
    top_features: list[FeatureName] = Field(default_factory=list, max_length=10)
    evicted_total: int = Field(0, ge=0, le=COUNT_MAX, description="outbox rows this device has evicted unsent, since it was installed")
    samples: list[CapturedSample] = Field(default_factory=list, max_length=1000, description="only when capture is enabled")


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
