"""The device agent's settings: one pydantic model, read from YAML, with command-line flags on top.

Every problem of a settings file is reported at once, each naming the field,
the value found and what is allowed, so a device is fixed in one edit.
Relative paths in a YAML file are taken from the file's folder, so a config
file and the keyring beside it can move together.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device_agent.http_limits import HttpLimits
from device_agent.validation import read_yaml_mapping, validate_model

_PATH_FIELDS = ("state_dir", "keyring_dir", "admin_token_file", "ssl_certfile", "ssl_keyfile", "device_token_file")
# The HTTP limits (device_agent.http_limits) are settings too, with that module's defaults: declared there once.
_HTTP = HttpLimits()
_HTTP_SETTINGS = ("max_header_bytes", "header_timeout_s", "keep_alive_s", "body_timeout_s", "min_body_rate",
                  "max_connections", "max_inflight_body_bytes", "max_concurrent_requests")
_FLAG_FOR_FIELD = {
    "state_dir": "--state-dir",
    "keyring_dir": "--keyring",
}


class AgentSettings(BaseModel):
    """Everything ``edgekit-agent serve`` needs; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path = Field(description="models, staging and uploads live here")
    keyring_dir: Path = Field(description="folder of trusted public keys (*.pub)")
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)
    admin_token_file: Path | None = Field(None, description="file holding the admin API's bearer token; no file, no admin API")
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_body_bytes: int = Field(2 << 30, gt=0, description="largest bundle upload (admin API)")
    max_request_bytes: int = Field(64 << 20, gt=0, description="largest inference request, after decompression")
    # The resource contract of one inference request and one connection (README "Limits"), checked before any work.
    max_json_bytes: int = Field(2 << 20, gt=0, description="largest JSON part of an inference request (tensors past it: binary extension)")
    max_rows_per_request: int = Field(256, ge=1, description="most rows (texts, images) in one inference request")
    max_text_chars: int = Field(20_000, ge=1, description="a longer text is cut to this many characters before tokenizing")
    max_concurrent_requests: int = Field(_HTTP.max_concurrent_requests, ge=1, description="inference requests at work (decode, run) at once; past it 503 + Retry-After")
    max_inflight_body_bytes: int = Field(_HTTP.max_inflight_body_bytes, ge=1 << 20, description="bytes the bodies of all requests in flight hold together, counted as they arrive; past it 503")
    preprocess_threads: int = Field(2, ge=1, le=64, description="worker threads that decode, tokenize and preprocess requests")
    max_header_bytes: int = Field(_HTTP.max_header_bytes, ge=1024, le=1 << 20, description="request line and headers together")
    header_timeout_s: float = Field(_HTTP.header_timeout_s, gt=0, le=300, description="a connection must send complete headers within this")
    keep_alive_s: float = Field(_HTTP.keep_alive_s, gt=0, le=300, description="an idle keep-alive connection is closed after this")
    body_timeout_s: float = Field(_HTTP.body_timeout_s, gt=0, description="a body may take this long plus 1 s per min_body_rate bytes")
    min_body_rate: int = Field(_HTTP.min_body_rate, ge=1, description="bytes per second a body must average after body_timeout_s (slow links: lower it)")
    max_connections: int = Field(_HTTP.max_connections, ge=1, description="open connections; past it a new one gets 503")
    max_batch: int = Field(8, ge=1, description="most rows the dynamic batcher puts into one model run")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=1000, description="longest a request waits for others to join its batch")
    keep_versions: int = Field(3, ge=2, description="versions kept on disk per model (rollback needs two)")
    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per model run; None lets it choose")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Telemetry and drift monitoring (device_agent.telemetry): on when telemetry_url is set.
    telemetry_url: str | None = Field(None, pattern=r"^https?://", description="the fleet collector's base URL; windows go to {url}/v1/telemetry")
    device_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="this device's name at the collector")
    device_token_file: Path | None = Field(None, description="file holding the token `edgekit fleet devices add NAME` printed")
    window_size: int | None = Field(None, ge=1, description="rows per drift window; None: the bundle's reference (500)")
    window_seconds: float = Field(300.0, gt=0, description="a window also closes after this many seconds")
    alert_after_windows: int | None = Field(None, ge=1, description="consecutive drifting windows before an alert; None: the bundle's (2)")
    outbox_max_windows: int = Field(10_000, ge=1, description="unsent windows kept; past it the oldest are evicted and counted")
    outbox_max_bytes: int = Field(64 << 20, ge=1 << 16, description="bytes of unsent windows kept")
    upload_timeout_s: float = Field(10.0, gt=0, le=600, description="timeout of each upload request to the collector")
    upload_backoff_max_s: float = Field(300.0, gt=0, description="longest wait between failed uploads (exponential, full jitter)")
    poll_seconds: float = Field(30.0, gt=0, description="how often the desired state is pulled from the collector (telemetry_url set)")
    capture_every: int | None = Field(None, ge=1, description="keep every n-th raw input for retraining; None (default): keep none")
    capture_max_samples: int = Field(20, ge=1, le=1000, description="raw inputs kept per window when capture is on")
    capture_max_bytes: int = Field(1 << 20, ge=1, le=4 << 20, description="bytes of raw inputs kept per window when capture is on")
    # Explanations (device_agent.explain): off by default, since one costs a model row per word, image patch or column.
    explain: bool = Field(False, description="serve POST /v2/models/{name}/explain: occlusion attributions of raw texts, images or rows")

    def http_limits(self) -> HttpLimits:
        return HttpLimits(**{name: getattr(self, name) for name in _HTTP_SETTINGS})

    @model_validator(mode="after")
    def _tls_pair(self) -> AgentSettings:
        if self.max_inflight_body_bytes < self.max_request_bytes:
            raise ValueError(f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) must hold at least one request of "
                             f"max_request_bytes ({self.max_request_bytes})")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: set both for TLS, or neither")
        if self.telemetry_url is not None and (self.device_id is None or self.device_token_file is None):
            raise ValueError("telemetry_url needs device_id and device_token_file too (register the device with `edgekit fleet devices add NAME`)")
        return self


def load_settings(config_file: Path | None, overrides: Mapping[str, Any]) -> AgentSettings:
    """Settings from ``config_file`` (YAML, optional) with the non-None ``overrides`` (command-line flags) on top.

    Raises ConfigError listing every problem.
    """
    document = read_yaml_mapping(config_file, allow_empty=True) if config_file is not None else {}
    if config_file is not None:
        document = _resolve_paths(document, config_file.parent)
    document.update({field: value for field, value in overrides.items() if value is not None})
    source = str(config_file) if config_file is not None else "agent settings"
    hints = {field: f"set it in the config file or pass {flag}" for field, flag in _FLAG_FOR_FIELD.items()}
    return validate_model(document, AgentSettings, source=source, missing_hints=hints)


def _resolve_paths(document: dict[str, Any], base: Path) -> dict[str, Any]:
    resolved = dict(document)
    for field in _PATH_FIELDS:
        value = resolved.get(field)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            resolved[field] = str(base / value)
    return resolved
