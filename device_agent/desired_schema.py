"""The desired-state contract between a device and the fleet collector, declared once.

A device pulls what it should run; the collector never connects to a device, so
pull works behind NAT and a collector that is down only delays a rollout.

- ``GET /v1/devices/{id}/desired`` (device token) → ``DesiredState``: per model,
  the version the device should serve and the sha256 of its bundle.
- ``GET /v1/bundles/{sha256}`` (device token; only a bundle the device is told to
  run) → the bundle's bytes. ``Range: bytes=N-`` resumes a cut download (206).
- ``POST /v1/devices/{id}/reports`` (device token) with a ``DeviceReport``: what
  the device serves now and what happened to each desired bundle (installed,
  refused with the reason, rolled back). The device keeps each outcome until the
  collector acknowledges it (``ReportAck``); resending one is harmless (the
  collector stores an outcome once by ``(device, sha256, outcome, at)``).

The device verifies a downloaded bundle's sha256 against the desired state and
then its signature against its own keyring: the collector is trusted with
nothing but scheduling.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from device_agent.telemetry_schema import PRINTABLE, DeviceId, UnixTime

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
ModelVersion = Annotated[str, Field(max_length=32, pattern=r"^[0-9]+(\.[0-9]+){0,3}$")]  # the collector stores 32
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Models one device is told to run, and outcomes one report carries (a device keeps at most this many unsent).
MAX_MODELS = 64
MAX_OUTCOMES = 64
MAX_REASON_CHARS = 2000

Outcome = Literal["installed", "refused", "rolled_back", "failed"]
"""installed: verified, golden-checked on the device and serving. refused: the device will not run this bundle
(signature, target, golden check, anti-rollback: ``check`` says which) and will not try it again. rolled_back: the
device went back to a version it still held, without a download. failed: the device could not get or install it
for a reason that may pass (download, disk); it retries."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DesiredModel(_Strict):
    name: ModelName
    version: ModelVersion
    sha256: Sha256 = Field(description="the bundle file's sha256; the download must match it")
    size: int = Field(ge=1, description="the bundle file's size in bytes")
    rollout_id: int | None = Field(None, ge=1, description="the rollout that set this, if any")


class DesiredState(_Strict):
    device_id: DeviceId
    models: list[DesiredModel] = Field(default_factory=list, max_length=MAX_MODELS)


class InstallOutcome(_Strict):
    model: ModelName
    version: ModelVersion
    sha256: Sha256
    outcome: Outcome
    check: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$",
                              description="for refused: the check that failed (untrusted-key, golden, target, …)")
    reason: str = Field("", max_length=MAX_REASON_CHARS, pattern=PRINTABLE,
                        description="for people; no control or bidirectional characters (escape them)")
    at: UnixTime


class DeviceReport(_Strict):
    device_id: DeviceId
    serving: dict[ModelName, ModelVersion] = Field(default_factory=dict, max_length=MAX_MODELS,
                                                   description="the version each model serves now")
    outcomes: list[InstallOutcome] = Field(default_factory=list, max_length=MAX_OUTCOMES)


class ReportAck(_Strict):
    recorded: int = Field(ge=0, description="outcomes the collector had not stored before")
