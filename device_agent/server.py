"""The device agent's HTTP server: Open Inference Protocol v2, the model repository, an admin API and metrics.

- ``/v2/...`` speaks the Open Inference Protocol (KServe v2) as Triton does, so
  ``tritonclient.http`` and KServe clients work unchanged: health, server and
  model metadata, inference (JSON and the binary tensor extension, the
  classification extension) and the model repository extension (index, load,
  unload).
- ``/admin/...`` installs signed bundles, activates versions and rolls back.
  It and the repository extension's load and unload, everything that changes
  what the device serves, need ``Authorization: Bearer <token>`` (the token
  file is a setting; without one they are off). Unlike Triton's: anyone who
  reaches the port could otherwise take the device's model down.
- ``/metrics`` is Prometheus text under Triton's metric names.
- ``/v2/models/{name}/explain`` (off unless ``explain`` is set, ``--explain``)
  takes an infer request's raw texts, images or rows and answers which words,
  image regions or columns each prediction rests on (``device_agent.explain``).
  One runs at a time and ``EXPLAIN_WAITING`` more may queue (503 past that),
  apart from inference's work slots.

Requests to a model go through its :class:`DynamicBatcher`. Blocking
repository work (installs, loads, golden checks, directory listings) runs in
worker threads so inference keeps flowing meanwhile. Every error answers
``{"error": "..."}``; a client's mistake is never a 5xx.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import hmac
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from device_agent import features as drift_features
from device_agent.batching import DynamicBatcher
from device_agent.bundle import (
    SPECTRAL_INPUT, ImagePreprocessing, Manifest, ModelInfo, SpectralPreprocessing, TablePreprocessing, TensorSpec, TokenizerPreprocessing,
)
from device_agent.classifier import Classifier, ModelRunFailed, batchable, joined_rows
from device_agent.config import AgentSettings
from device_agent.desired_state import DesiredStatePuller
from device_agent.errors import UserError
from device_agent.explain import Explanation, NothingToExplain
from device_agent.explain import explain as explain_input
from device_agent.http_limits import (
    HeaderCountLimit, HttpLimits, RequestBudget, RequestRefused, connection_cap, read_body, stream_body, uvicorn_options,
)
from device_agent.input_contract import check_feeds, check_rows, value_ranges
from device_agent.metrics import Metrics, RequestStats, metric_family, metric_labels
from device_agent.protocol import (
    HEADER_LENGTH,
    InferRequest,
    OutputChoice,
    ProtocolError,
    choose_outputs,
    decode_inputs,
    decompress,
    encode_response,
    flat_json,
    parse_infer_request,
    parse_json_model,
)
from device_agent.repository import ModelNotFound, Repository, ServedModel, VersionInfo
from device_agent.preprocess import ImagePreprocessor, TableEncoder, TextTokenizer, spectral_features
from device_agent.runtime import Session
from device_agent.telemetry import Telemetry

log = logging.getLogger("edgekit.agent.server")
T = TypeVar("T")

SERVER_NAME = "edgekit-agent"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
# Bodies of the small control requests (index, load, unload) never need more.
_CONTROL_BODY_LIMIT = 64 << 10
_UPLOAD_WRITE_CHUNK = 1 << 20
# Inputs one explain request may hold. Each costs a model row per word the model reads (at most its max_length + 1,
# however long the text), per image patch position (169 for a 28x28 image, 225 for a 224x224 crop) or per column.
MAX_EXPLAIN_ROWS = 8
# Explain requests that may wait for the one that runs: with it, the most an agent takes on at once. They have their
# own bound, not inference's work slots, so slow explanations never make /infer answer 503; and a longer queue would
# only make a client wait longer than retrying later does.
EXPLAIN_WAITING = 2
EXPLAIN_OFF = "explanations are off on this agent; start it with --explain (or set explain: true in its config)"


@functools.cache
def agent_version() -> str:
    """The installed edgekit distribution's version (device_agent must not import edgekit itself)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgekit")
    except PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- JSON logs

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, any ``extra=`` fields, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "info") -> None:
    """Send every logger's records (uvicorn's included) to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --------------------------------------------------------------------------- the agent's state


class Agent:
    """What the routes share: the repository, settings, counters and one batcher per serving model."""

    def __init__(self, repository: Repository, settings: AgentSettings) -> None:
        self.repository = repository
        self.settings = settings
        self.http_limits = settings.http_limits()
        self.metrics = Metrics()
        # Decoding, tokenizing and preprocessing run here, never on the event loop that answers health checks.
        self.preprocess_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="edgekit-preprocess")
        self.inference_budget = RequestBudget(self.http_limits, "inference requests")
        self.admin_token = _read_admin_token(settings.admin_token_file)
        self.started_at = time.time()
        self.start_problem: str | None = "the repository is still loading its models"
        self._start_ended = asyncio.Event()
        self._batchers: dict[str, tuple[Session, DynamicBatcher]] = {}
        self._tokenizers: dict[tuple[str, str], TextTokenizer] = {}
        self._tables: dict[tuple[str, str], ServedTable] = {}
        self._classifiers: dict[str, Classifier] = {}
        # One explanation at a time, in a thread of its own: it runs for many rows, and in the preprocessing pool it
        # would hold up the decoding of every inference request behind it.
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="edgekit-explain") if settings.explain else None
        self.explain_slots = ExplainSlots(EXPLAIN_WAITING)
        self.explanations = ExplanationCounts()
        self.telemetry = _make_telemetry(settings)
        # Pulls rollouts from the collector (telemetry_url set); made once the repository has started.
        self.desired: DesiredStatePuller | None = None

    def record_request(self, served: ServedModel, observed: _Observed | None, latency_ms: float, error: bool) -> None:
        """Count one inference request in its model's drift window (telemetry on); a full window goes to the outbox."""
        if self.telemetry is None:
            return
        monitor = self.telemetry.monitor_for(served.name, served.version, served.manifest.drift_reference)
        if observed is not None and observed.sample is not None and monitor.wants_sample():
            monitor.add_sample(**observed.sample)
        window = monitor.observe(observed.features if observed else None, observed.rows if observed else 0, latency_ms, error)
        self.telemetry.submit(monitor, window)

    async def start_repository(self) -> None:
        """Recover the repository and load its models; until this ends the server is live but not ready."""
        try:
            await run_in_threadpool(self.repository.start)
        except Exception as error:  # the agent stays up to report the problem and take a new install
            log.exception("the model repository failed to start")
            self.start_problem = f"the model repository failed to start: {error}"
        else:
            self.start_problem = None
        finally:
            self._start_ended.set()

    async def start_ended(self) -> None:
        """Wait for the repository's start; it empties uploads/, so an install must not begin before."""
        await self._start_ended.wait()

    def serving(self, name: str, version: str | None = None) -> ServedModel:
        check_model_reference(name, version)
        return self.repository.served(name, version)

    def batcher_for(self, served: ServedModel) -> DynamicBatcher:
        """The model's batcher; a new one when the model's session changed (install, activate, rollback, load)."""
        current = self._batchers.get(served.name)
        if current is not None and current[0] is served.session:
            return current[1]
        # Replacing the entry drops the old session once its in-flight batch ends.
        stats = self.metrics.for_model(served.name, served.version).batches
        batcher = DynamicBatcher(served.session.run, joined_rows(served.manifest, self.settings.max_batch),
                                 self.settings.max_batch_delay_ms, stats)
        self._batchers[served.name] = (served.session, batcher)
        return batcher

    def tokenizer_for(self, served: ServedModel) -> TextTokenizer:
        """The text model's tokenizer, built once per served version."""
        key = (served.name, served.version)
        if key not in self._tokenizers:
            spec = served.manifest.preprocessing
            assert isinstance(spec, TokenizerPreprocessing)
            self._tokenizers[key] = TextTokenizer(served.slot_dir / spec.tokenizer_file, spec.max_length)
        return self._tokenizers[key]

    def table_for(self, served: ServedModel) -> ServedTable:
        """The table model's encoder (and drift feature layout), built once per served version."""
        key = (served.name, served.version)
        if key not in self._tables:
            spec = served.manifest.preprocessing
            assert isinstance(spec, TablePreprocessing)
            self._tables[key] = ServedTable(spec)
        return self._tables[key]

    def classifier_for(self, served: ServedModel) -> Classifier:
        """The model as a classifier of raw inputs (explanations), rebuilt when its session changes, like its batcher.

        It runs the session directly, not through the batcher (its rows are one input's variants), in runs of the rows
        the batcher would join (``joined_rows`` of ``max_batch``: what a TensorRT engine's profile was sized for), or
        of a fixed batch dimension's size. A bundle of raw tensors, or without labels, is refused here (400).
        """
        current = self._classifiers.get(served.name)
        if current is not None and current.session is served.session:
            return current
        classifier = Classifier(served.manifest, served.session, served.slot_dir, max_rows=self.settings.max_batch)
        self._classifiers[served.name] = classifier
        return classifier

    async def off_loop(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the preprocessing pool: CPU work that must not stall the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.preprocess_pool, functools.partial(function, *args))

    async def off_loop_explaining(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the explanations' own thread (explanations on), one at a time."""
        assert self.explain_pool is not None
        return await asyncio.get_running_loop().run_in_executor(self.explain_pool, functools.partial(function, *args))

    def forget(self, name: str) -> None:
        """Drop an unloaded model's batcher and classifier, and with them the last references to its session."""
        self._batchers.pop(name, None)
        self._classifiers.pop(name, None)

    async def readiness_problems(self) -> list[str]:
        """Why the server is not ready: still starting, or a model's active version is not serving."""
        if self.start_problem is not None:
            return [self.start_problem]
        infos = await run_in_threadpool(self.repository.index)
        return [
            f"{info.name} {info.version} is {info.state}" + (f" ({info.reason})" if info.reason else "")
            for info in infos
            if info.active and info.state != "READY"
        ]


class ServedTable:
    """What a table model's requests need, made once: the row encoder, and the drift features' layout when asked for."""

    def __init__(self, spec: TablePreprocessing) -> None:
        self.spec = spec
        self.encoder = TableEncoder(spec)

    @functools.cached_property
    def layout(self) -> drift_features.TableLayout:
        return drift_features.table_layout(self.spec)


class ExplainSlots:
    """Explain requests admitted at once: one runs in the explain thread and at most ``waiting`` wait for it; past
    that, 503 with ``Retry-After``. On the event loop, like ``RequestBudget``, so it needs no lock."""

    def __init__(self, waiting: int) -> None:
        self.limit = 1 + waiting
        self.admitted = 0

    @contextmanager
    def taking(self) -> Iterator[None]:
        if self.admitted >= self.limit:
            raise RequestRefused(f"{self.limit} explain requests are running or waiting (one runs at a time and "
                                 f"{self.limit - 1} may wait: the agent's explain queue limit); retry shortly", 503,
                                 {"Retry-After": "1"})
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1


class ExplanationCounts:
    """Explain requests per model version by result, and the model rows they ran.

    Kept apart from the inference counters and the drift windows: an explanation runs its input many times over with
    pieces taken away, so counted as traffic it would inflate the request rate and feed the drift monitor inputs no
    client sent.
    """

    RESULTS = ("success", "refused", "error")

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.model_rows: Counter[tuple[str, str]] = Counter()

    def count(self, served: ServedModel, result: str, model_rows: int = 0) -> None:
        for every in self.RESULTS:  # every result starts at 0, so a rate() over the first error sees it
            self.requests[(served.name, served.version, every)] += 0
        self.requests[(served.name, served.version, result)] += 1
        self.model_rows[(served.name, served.version)] += model_rows

    def metric_lines(self) -> list[str]:
        requests = [(metric_labels(model=model, version=version, result=result), count)
                    for (model, version, result), count in sorted(self.requests.items())]
        rows = [(metric_labels(model=model, version=version), count) for (model, version), count in sorted(self.model_rows.items())]
        return (metric_family("edgekit_explain_requests_total", "counter",
                        "Explain requests by result (success; refused: the client's mistake, or the agent's limits "
                        "(413, 503); error)", requests)
                + metric_family("edgekit_explain_model_rows_total", "counter",
                          "Model rows run for explanations (not counted in nv_inference_count)", rows))


def _make_telemetry(settings: AgentSettings) -> Telemetry | None:
    """The outbox, uploader and monitors when ``telemetry_url`` is set; None (no monitoring) otherwise."""
    if settings.telemetry_url is None:
        return None
    from device_agent.drift import CaptureSettings, MonitorSettings
    from device_agent.telemetry import Outbox, Uploader, read_device_token

    assert settings.device_id is not None and settings.device_token_file is not None  # AgentSettings checks
    outbox = Outbox(settings.state_dir / "telemetry" / "outbox.sqlite", settings.device_id,
                    max_rows=settings.outbox_max_windows, max_bytes=settings.outbox_max_bytes)
    capture = None
    if settings.capture_every is not None:
        capture = CaptureSettings(settings.capture_every, settings.capture_max_samples, settings.capture_max_bytes)
    monitor_settings = MonitorSettings(window_size=settings.window_size, window_seconds=settings.window_seconds,
                                       consecutive_for_alert=settings.alert_after_windows, capture=capture)
    uploader = Uploader(outbox, settings.telemetry_url, read_device_token(settings.device_token_file),
                        timeout_s=settings.upload_timeout_s, backoff_max_s=settings.upload_backoff_max_s)
    return Telemetry(outbox, uploader, monitor_settings)


async def _start_desired_puller(agent: Agent) -> None:
    """Pull the desired state in a thread once the repository's start has ended: the start empties staging/, where
    installs unpack. A model it switches has its batcher dropped, as after an unload, so the old session goes now."""
    from device_agent.telemetry import read_device_token

    settings = agent.settings
    await agent.start_ended()
    loop = asyncio.get_running_loop()
    try:
        assert settings.telemetry_url is not None and settings.device_id is not None and settings.device_token_file is not None
        agent.desired = DesiredStatePuller(
            agent.repository, settings.telemetry_url, settings.device_id, read_device_token(settings.device_token_file),
            poll_seconds=settings.poll_seconds, timeout_s=settings.upload_timeout_s, backoff_max_s=settings.upload_backoff_max_s,
            on_change=lambda name: loop.call_soon_threadsafe(agent.forget, name),
        )
        agent.desired.start()
    except Exception:  # the agent keeps serving what it has; the log says why no rollout reaches it
        log.exception("the desired-state puller did not start; rollouts will not reach this device")


@dataclass(frozen=True)
class _Observed:
    """What the drift monitor takes from one answered request: feature values, rows, and a raw input when captured."""

    features: dict[str, np.ndarray] | None
    rows: int
    sample: dict | None = None


def _observe(agent: Agent, served: ServedModel, feeds: dict[str, np.ndarray], raw: dict, outputs: dict[str, np.ndarray]) -> _Observed:
    """Drift features of an answered request (device_agent.features), computed only for a bundle with a drift reference."""
    rows = int(next(iter(feeds.values())).shape[0]) if feeds else 0
    if served.manifest.drift_reference is None:
        return _Observed(None, rows)
    spec = served.manifest.preprocessing
    if "images" in raw:
        found = drift_features.image_features(raw["images"])
    elif isinstance(spec, TokenizerPreprocessing) and "input_ids" in feeds and "attention_mask" in feeds:
        found = drift_features.text_features(feeds["input_ids"], feeds["attention_mask"], agent.tokenizer_for(served).unknown_id, spec.max_length)
    elif _is_table_row_batch(spec, feeds, served.manifest):
        # From the encoded rows, whether the client sent raw rows or the features tensor: the same values either way.
        found = drift_features.table_features(feeds[served.manifest.inputs[0].name], agent.table_for(served).layout)
    elif isinstance(spec, SpectralPreprocessing):
        # From the raw windows, as the reference was made; the spectral features cannot give them back.
        series = raw.get(SPECTRAL_INPUT)
        found = drift_features.tensor_features({SPECTRAL_INPUT: series}) if series is not None else {}
    else:
        found = drift_features.tensor_features(feeds)
    logits = outputs.get(served.manifest.outputs[0].name)
    if logits is not None and logits.ndim == 2 and logits.dtype.kind == "f":
        found.update(drift_features.output_features(logits))
    sample = None
    if agent.settings.capture_every is not None and rows:
        labels = served.manifest.task.labels
        predicted = None
        if "output.predicted_class" in found and labels:
            index = int(found["output.predicted_class"][0])
            predicted = labels[index] if index < len(labels) else None
        if "texts" in raw:
            sample = {"text": raw["texts"][0], "predicted": predicted}
        elif "images" in raw:
            sample = {"image": raw["images"][0], "predicted": predicted}
    return _Observed(found, rows, sample)


def _is_table_row_batch(spec, feeds: dict[str, np.ndarray], manifest: Manifest) -> bool:
    if not isinstance(spec, TablePreprocessing) or len(manifest.inputs) != 1:
        return False
    encoded = feeds.get(manifest.inputs[0].name)
    return encoded is not None and encoded.ndim == 2 and encoded.shape[1] == spec.width


def _read_admin_token(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise UserError(f"cannot read admin_token_file {path} ({exc.strerror}); create it with a long random token") from None
    if len(token) < 16:
        raise UserError(f"admin_token_file {path} holds {len(token)} characters; use a random token of at least 16")
    if path.stat().st_mode & 0o077:
        log.warning("admin token file %s is readable by other users; chmod 600 it", path)
    return token


def check_model_reference(name: str, version: str | None = None) -> None:
    """Refuse what cannot be a model name or version before it reaches the repository, which uses them in paths."""
    try:
        ModelInfo(name=name, version=version if version is not None else "0")
    except ValidationError:
        what = f"{name!r} version {version!r}" if version is not None else repr(name)
        raise ModelNotFound(f"no model {what}: not a valid model name or version") from None


async def _run(batcher: DynamicBatcher, manifest: Manifest, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs for ``feeds``: runs of at most the batcher's rows (so one request's memory is bounded by
    ``max_batch``, not by its rows), or one run per row where the bundle was gated a row per run."""
    rows = rows_run_alone(manifest, feeds) or (row_slices(feeds, batcher.max_batch) if batchable(manifest) else [feeds])
    if len(rows) == 1:
        return await batcher.submit(rows[0])
    parts = await asyncio.gather(*(batcher.submit(row) for row in rows))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def row_slices(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """``feeds`` cut along dimension 0 into pieces of at most ``size`` rows; whole when the inputs disagree on it."""
    counts = {array.shape[0] if array.ndim else None for array in feeds.values()}
    if len(counts) != 1 or None in counts or next(iter(counts)) <= size:
        return [feeds]
    total = counts.pop()
    return [{name: array[start:start + size] for name, array in feeds.items()} for start in range(0, total, size)]


def rows_run_alone(manifest: Manifest, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
    """A request's rows as separate feeds, each without trailing padding, when the bundle says ``max_rows_per_run: 1``
    (dynamic int8: its answers depend on the rows and padding of a run); None otherwise.

    Padding is read from an ``attention_mask`` input ``[batch, sequence]``: every input with that sequence axis is cut
    after the row's last real token, so a text in a request of several gets the answer it gets alone.
    """
    first = next(iter(feeds.values()))
    if manifest.runtime.max_rows_per_run != 1 or first.ndim == 0 or len(first) <= 1:
        return None
    mask = feeds.get("attention_mask")
    rows = []
    for index in range(len(first)):
        row = {name: value[index:index + 1] for name, value in feeds.items()}
        if mask is not None and mask.ndim == 2 and mask[index].any():
            length = int(np.flatnonzero(mask[index]).max()) + 1
            row = {name: value[:, :length] if value.ndim >= 2 and value.shape[1] == mask.shape[1] else value
                   for name, value in row.items()}
        rows.append(row)
    return rows


def _agent(request: Request) -> Agent:
    return request.app.state.agent


# --------------------------------------------------------------------------- errors


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status_of(error: UserError) -> int:
    if isinstance(error, ModelNotFound):
        return 404
    return getattr(error, "status_code", 400)  # InstallRefused, NothingToRollBack, ProtocolError, RequestRefused carry theirs


async def _on_user_error(request: Request, error: UserError) -> JSONResponse:
    return _error(_status_of(error), str(error), getattr(error, "headers", None))


async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error(error.status_code, str(error.detail), getattr(error, "headers", None))


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()]
    return _error(400, "; ".join(problems))


async def _on_internal_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises after this answer, and uvicorn logs the traceback.
    return _error(500, f"internal error ({type(error).__name__}); see the agent's log")


# --------------------------------------------------------------------------- request bodies


async def receive_to_file(request: Request, path: Path, limit: int, limits: HttpLimits) -> int:
    """Stream the body into a new file (mode 0600) without holding it in memory; 413 past ``limit``."""
    size, pending = 0, bytearray()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        async for chunk in stream_body(request, limit, "max_body_bytes", limits):
            size += len(chunk)
            pending += chunk
            if len(pending) >= _UPLOAD_WRITE_CHUNK:
                data, pending = pending, bytearray()
                await run_in_threadpool(handle.write, data)
        await run_in_threadpool(handle.write, pending)
    return size


async def _control_body(request: Request, agent: Agent, model: type[BaseModel], what: str) -> BaseModel:
    """The optional JSON body of a control request (index, load, unload): empty means all defaults (tritonclient sends
    an empty index request)."""
    document = await read_body(request, _CONTROL_BODY_LIMIT, "control requests", agent.http_limits)
    return parse_json_model(document or b"{}", model, what)


# --------------------------------------------------------------------------- OIP: health and metadata

oip = APIRouter(tags=["inference"])


@oip.get("/v2/health/live", summary="Server live")
async def server_live() -> dict:
    return {"live": True}


@oip.get("/v2/health/ready", summary="Server ready", responses={400: {"description": "not ready, with the reason"}})
async def server_ready(agent: Agent = Depends(_agent)) -> dict:
    """200 when every model that has an active version serves it (loaded and golden-checked here).

    A repository with no models at all is ready: there is nothing it should be
    serving. A model unloaded through the repository API makes the server not
    ready until it is loaded again, because its active version does not serve.
    """
    problems = await agent.readiness_problems()
    if problems:
        raise HTTPException(400, "not ready: " + "; ".join(problems))
    return {"ready": True}


@oip.get("/v2", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": agent_version(), "extensions": EXTENSIONS}


def _tensor_metadata(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [dim if isinstance(dim, int) else -1 for dim in spec.shape]}


def _model_metadata(served: ServedModel) -> dict:
    manifest = served.manifest
    return {
        "name": served.name,
        "versions": [served.version],
        "platform": "onnxruntime_onnx",
        "inputs": [_input_metadata(spec, manifest) for spec in public_inputs(manifest)],
        "outputs": [_tensor_metadata(spec) for spec in manifest.outputs],
    }


def _input_metadata(spec: TensorSpec, manifest: Manifest) -> dict:
    """An input's metadata; the raw ``rows`` input also names the columns a row may hold, and the raw ``series`` input
    the spectral bands its windows become, in ``parameters``."""
    entry = _tensor_metadata(spec)
    preprocessing = manifest.preprocessing
    if spec is ROWS_INPUT and isinstance(preprocessing, TablePreprocessing):
        entry["parameters"] = {"columns": [{"name": column.name, "kind": column.kind} for column in preprocessing.columns]}
    if isinstance(preprocessing, SpectralPreprocessing) and spec == series_input(preprocessing):
        entry["parameters"] = {"bands": preprocessing.bands}
    return entry


@oip.get("/v2/models/{name}", summary="Model metadata")
async def model_metadata(name: str, agent: Agent = Depends(_agent)) -> dict:
    return _model_metadata(agent.serving(name))


@oip.get("/v2/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(name: str, version: str, agent: Agent = Depends(_agent)) -> dict:
    return _model_metadata(agent.serving(name, version))


@oip.get("/v2/models/{name}/ready", summary="Model ready")
async def model_ready(name: str, agent: Agent = Depends(_agent)) -> dict:
    served = agent.serving(name)
    return {"name": served.name, "version": served.version, "ready": True}


@oip.get("/v2/models/{name}/versions/{version}/ready", summary="Model version ready")
async def model_version_ready(name: str, version: str, agent: Agent = Depends(_agent)) -> dict:
    served = agent.serving(name, version)
    return {"name": served.name, "version": served.version, "ready": True}


# --------------------------------------------------------------------------- OIP: inference

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f"JSON, or with the binary tensor extension a JSON header of {HEADER_LENGTH} bytes followed by raw tensors",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@oip.post("/v2/models/{name}/infer", summary="Inference", openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request, agent: Agent = Depends(_agent)) -> Response:
    return await _infer(agent, request, agent.serving(name))


@oip.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on a version", openapi_extra=_INFER_BODY)
async def infer_version(name: str, version: str, request: Request, agent: Agent = Depends(_agent)) -> Response:
    return await _infer(agent, request, agent.serving(name, version))


async def _infer(agent: Agent, request: Request, served: ServedModel) -> Response:
    """Count the request as Triton does: success or failure, and its duration."""
    stats = agent.metrics.for_model(served.name, served.version).requests
    started = time.perf_counter()
    try:
        response, observed = await _answer(agent, request, served, stats)
    except Exception as error:
        status = _status_of(error) if isinstance(error, UserError) else getattr(error, "status_code", 500)
        if status < 500:  # the client's mistake: no model ran, so neither a failure nor a drift window's error
            agent.metrics.refused[status] += 1
            raise
        stats.failure += 1
        agent.record_request(served, None, (time.perf_counter() - started) * 1e3, error=True)
        raise
    stats.success += 1
    elapsed_us = _microseconds_since(started)
    stats.request_duration_us += elapsed_us
    agent.record_request(served, observed, elapsed_us / 1e3, error=False)
    return response


def _microseconds_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1e6)


async def _answer(agent: Agent, request: Request, served: ServedModel, stats: RequestStats) -> tuple[Response, _Observed | None]:
    with agent.inference_budget.holding() as held:
        body = await read_body(request, agent.settings.max_request_bytes, "max_request_bytes", agent.http_limits, held)
        held.start_work()  # a slot only once the body is here: a slow client never holds one
        started = time.perf_counter()
        decoded = await agent.off_loop(
            _decode, agent, served, body, request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)
        )
        stats.compute_input_duration_us += _microseconds_since(started)
        try:
            outputs = await _run(agent.batcher_for(served), served.manifest, decoded.feeds)
        except Exception as error:  # validated inputs that the model still refuses: a fault of the model, not the client
            log.error("model run failed", extra={"model": served.name, "version": served.version}, exc_info=error)
            raise HTTPException(500, f"{served.name} {served.version} failed to run: {error}") from None
    observed = _observe(agent, served, decoded.feeds, decoded.raw, outputs) if agent.telemetry is not None else None
    infer_request, choices = decoded.request, decoded.choices

    started = time.perf_counter()
    content, header_length = encode_response(
        model_name=served.name,
        model_version=served.version,
        request_id=infer_request.id,
        outputs=outputs,
        choices=choices,
        manifest=served.manifest,
    )
    stats.compute_output_duration_us += _microseconds_since(started)
    if header_length is None:
        return Response(content, media_type="application/json"), observed
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}), observed


@dataclass(frozen=True)
class _Decoded:
    """An inference request ready to run: its feeds, the outputs it wants, and its raw texts or images (drift, capture)."""

    request: InferRequest
    feeds: dict[str, np.ndarray]
    choices: list[OutputChoice]
    raw: dict


def _decode(agent: Agent, served: ServedModel, body: bytes, encoding: str | None, header_length: str | None,
            explaining: bool = False) -> _Decoded:
    """The request decoded, every part of the input contract checked (in the preprocessing pool); an explain request
    also within ``MAX_EXPLAIN_ROWS``."""
    settings = agent.settings
    body = decompress(body, encoding, settings.max_request_bytes)
    infer_request, binary = parse_infer_request(body, header_length, max_json_bytes=settings.max_json_bytes)
    if explaining:
        check_explain_rows(infer_request)
    check_rows(infer_request, served.manifest, settings.max_rows_per_request)
    raw: dict = {}
    feeds = (
        _text_feeds(agent, served, infer_request, binary, raw)
        or _image_feeds(served, infer_request, binary, raw)
        or _table_feeds(agent, served, infer_request, binary, raw)
        or _spectral_feeds(served, infer_request, binary, raw)
        or decode_inputs(infer_request, binary, served.manifest)
    )
    tokenizer = agent.tokenizer_for(served) if isinstance(served.manifest.preprocessing, TokenizerPreprocessing) else None
    check_feeds(served.manifest, feeds, value_ranges(served.manifest, tokenizer.vocabulary_size if tokenizer else None))
    return _Decoded(infer_request, feeds, choose_outputs(infer_request, served.manifest), raw)


# --------------------------------------------------------------------------- explanations


@oip.post("/v2/models/{name}/explain", summary="Explain predictions (agent started with --explain)", openapi_extra=_INFER_BODY)
async def explain_route(name: str, request: Request, agent: Agent = Depends(_agent)) -> Response:
    """Which words, image regions or columns each raw input's prediction rests on: the body of an infer request with
    the raw ``text``, ``image`` or ``rows`` input, at most ``MAX_EXPLAIN_ROWS`` of them."""
    return await _explain(agent, request, name)


@oip.post("/v2/models/{name}/versions/{version}/explain", summary="Explain predictions of a version (agent started with --explain)",
          openapi_extra=_INFER_BODY)
async def explain_version_route(name: str, version: str, request: Request, agent: Agent = Depends(_agent)) -> Response:
    return await _explain(agent, request, name, version)


async def _explain(agent: Agent, request: Request, name: str, version: str | None = None) -> Response:
    """Off: 404, as from an agent without the route (no credential turns it on, so not 403). On: count the request
    by result in the explanations' own counters, never in inference's or a drift window; a request refused for the
    agent's limits (413, 503) counts as refused, not as an error."""
    if agent.explain_pool is None:
        raise HTTPException(404, EXPLAIN_OFF)
    served = agent.serving(name, version)
    try:
        content, model_rows = await _explanations(agent, request, served)
    except Exception as error:
        status = _status_of(error) if isinstance(error, UserError) else getattr(error, "status_code", 500)
        agent.explanations.count(served, "refused" if status < 500 or isinstance(error, RequestRefused) else "error")
        raise
    agent.explanations.count(served, "success", model_rows)
    return Response(content, media_type="application/json")


async def _explanations(agent: Agent, request: Request, served: ServedModel) -> tuple[bytes, int]:
    """The response body and the model rows it cost; the body is read and decoded exactly as for /infer.

    The body counts against the bytes in flight with inference's bodies (one bound on the memory bodies hold), but
    the request takes an explain slot (``ExplainSlots``), never one of inference's work slots: explanations queue
    for their own thread, and /infer keeps answering meanwhile.
    """
    classifier = agent.classifier_for(served)
    with agent.inference_budget.holding() as held:
        body = await read_body(request, agent.settings.max_request_bytes, "max_request_bytes", agent.http_limits, held)
        with agent.explain_slots.taking():  # only once the body is here: a slow client never holds one
            decoded = await agent.off_loop(
                _decode, agent, served, body, request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH), True
            )
            inputs = raw_inputs(decoded, classifier)
            return await agent.off_loop_explaining(explained_body, classifier, served, decoded.request.id, inputs)


def check_explain_rows(request: InferRequest) -> None:
    """Refuse an explain request of more than ``MAX_EXPLAIN_ROWS`` inputs, from the shapes it declares (413)."""
    for tensor in request.inputs:
        if tensor.shape and tensor.shape[0] > MAX_EXPLAIN_ROWS:
            raise ProtocolError(
                f"input {tensor.name!r} holds {tensor.shape[0]} rows; an explain request takes at most {MAX_EXPLAIN_ROWS} "
                "(each costs one model run per word, image patch or column): split it into several requests", 413
            )


def raw_inputs(decoded: _Decoded, classifier: Classifier) -> list[Any]:
    """The request's raw texts, images or rows (what an explanation takes away pieces of); tensors are refused."""
    key, spec = {"text": ("texts", TEXT_INPUT), "image": ("images", IMAGE_INPUT), "table": ("rows", ROWS_INPUT)}[classifier.input_kind]
    found = decoded.raw.get(key)
    if found is None:
        raise ProtocolError(f"explanations take the raw {spec.name!r} input ({spec.datatype}), not the model's tensors: "
                            f"send {spec.name!r} as to /infer")
    return list(found)


def explained_body(classifier: Classifier, served: ServedModel, request_id: str | None, inputs: list[Any]) -> tuple[bytes, int]:
    """The explain response as JSON bytes, and the model rows it cost: made in the explain thread, heat maps and
    encoding included (8 heat maps of a 224x224 crop take ~100 ms to list and encode: not on the event loop)."""
    explanations = explain_each(classifier, inputs)
    document: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    if request_id is not None:
        document["id"] = request_id
    document["explanations"] = [explanation_json(explanation) for explanation in explanations]
    content = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return content, sum(explanation.rows_run for explanation in explanations)


def explain_each(classifier: Classifier, inputs: list[Any]) -> list[Explanation]:
    """One explanation per input; which input has nothing to explain is named."""
    explanations = []
    for index, item in enumerate(inputs):
        try:
            explanations.append(explain_input(classifier, item))
        except NothingToExplain as error:
            raise NothingToExplain(f"input {index}: {error}") from None
        except ModelRunFailed as error:  # validated inputs the model still fails on: the model's fault, as in /infer
            log.error("explanation run failed", extra={"model": classifier.name}, exc_info=error)
            raise HTTPException(500, str(error)) from None
        except UserError:
            raise
        except Exception as error:
            log.error("explanation failed", extra={"model": classifier.name}, exc_info=error)
            raise HTTPException(500, f"explaining with {classifier.name} failed: {error}") from None
    return explanations


def explanation_json(explanation: Explanation) -> dict:
    """``Explanation.to_json`` with every word or column in input order; an image's heat map also as numbers (rows of
    pixels, 4 decimals) for the client to draw: no PNG is made on the device."""
    document = explanation.to_json()
    if explanation.heatmap is not None:
        document["heatmap"]["values"] = np.round(explanation.heatmap, 4).tolist()
    return document


# What text, image, table and spectral models take from clients besides their tensors: raw strings, tokenized here
# with the bundle's tokenizer; raw uint8 images, preprocessed here as the bundle's spec says; raw table rows, each a
# JSON object of column name → value, encoded here as the bundle's columns say; raw FP32 windows (``series_input``),
# made into spectral features here.
TEXT_INPUT = TensorSpec(name="text", datatype="BYTES", shape=["batch"])
IMAGE_INPUT = TensorSpec(name="image", datatype="UINT8", shape=["batch", "height", "width", "channels"])
ROWS_INPUT = TensorSpec(name="rows", datatype="BYTES", shape=["batch"])


def series_input(spec: SpectralPreprocessing) -> TensorSpec:
    """A spectral bundle's raw windows: FP32 ``[batch, channels, steps]``, exactly the bundle's channels and steps."""
    return TensorSpec(name=SPECTRAL_INPUT, datatype="FP32", shape=["batch", spec.channels, spec.steps])


def public_inputs(manifest: Manifest) -> list[TensorSpec]:
    """The inputs a client may send: the model's tensors, and raw text, images, rows or windows where the bundle
    preprocesses."""
    spec = manifest.preprocessing
    if isinstance(spec, SpectralPreprocessing):
        return [series_input(spec), *manifest.inputs]
    raw = {TokenizerPreprocessing: [TEXT_INPUT], ImagePreprocessing: [IMAGE_INPUT], TablePreprocessing: [ROWS_INPUT]}
    return raw.get(type(spec), []) + list(manifest.inputs)


def _image_feeds(served: ServedModel, request: InferRequest, binary: bytes, raw: dict) -> dict[str, np.ndarray] | None:
    """The model's float input for a raw ``image`` input, or None when the request sends tensors."""
    spec = served.manifest.preprocessing
    if not isinstance(spec, ImagePreprocessing) or not any(t.name == IMAGE_INPUT.name for t in request.inputs):
        return None
    if len(served.manifest.inputs) != 1:
        raise ProtocolError(f"raw images feed models with one input; this one takes {[i.name for i in served.manifest.inputs]}")
    images = decode_inputs(request, binary, served.manifest.model_copy(update={"inputs": [IMAGE_INPUT]}))[IMAGE_INPUT.name]
    raw["images"] = images
    return {served.manifest.inputs[0].name: ImagePreprocessor(spec)(images)}


def _table_feeds(agent: Agent, served: ServedModel, request: InferRequest, binary: bytes, raw: dict) -> dict[str, np.ndarray] | None:
    """The model's ``features`` for a table model's ``rows`` input, or None when the request sends tensors."""
    if not isinstance(served.manifest.preprocessing, TablePreprocessing) or not any(t.name == ROWS_INPUT.name for t in request.inputs):
        return None
    if len(served.manifest.inputs) != 1:
        raise ProtocolError(f"raw rows feed models with one input; this one takes {[i.name for i in served.manifest.inputs]}")
    rows = table_rows(request, binary, served.manifest, agent.settings.max_json_bytes)
    raw["rows"] = rows
    return {served.manifest.inputs[0].name: agent.table_for(served).encoder(rows)}


def _spectral_feeds(served: ServedModel, request: InferRequest, binary: bytes, raw: dict) -> dict[str, np.ndarray] | None:
    """The model's ``features`` for a spectral model's raw ``series`` windows, or None when the request sends tensors.

    A window of another shape than the bundle's is refused naming both (``decode_inputs``); one holding NaN or an
    infinity is refused by ``spectral_features``."""
    spec = served.manifest.preprocessing
    if not isinstance(spec, SpectralPreprocessing) or not any(t.name == SPECTRAL_INPUT for t in request.inputs):
        return None
    windows_spec = series_input(spec)
    windows = decode_inputs(request, binary, served.manifest.model_copy(update={"inputs": [windows_spec]}))[windows_spec.name]
    raw[windows_spec.name] = windows
    return {served.manifest.inputs[0].name: spectral_features(windows, spec.bands)}


def table_rows(request: InferRequest, binary: bytes, manifest: Manifest, max_json_bytes: int) -> list[Any]:
    """The ``rows`` input's rows: JSON objects in the request's JSON ``data`` as they are, and JSON texts (strings in
    ``data``, BYTES elements of the binary extension) parsed; every other check is ``decode_inputs``'s.

    The texts count against ``max_json_bytes`` as the request's JSON does: parsing them costs the same.
    """
    objects: dict[int, Any] = {}
    inputs = []
    for tensor in request.inputs:
        if tensor.name == ROWS_INPUT.name and tensor.data is not None:
            flat = flat_json(tensor.data)
            objects = {index: item for index, item in enumerate(flat) if not isinstance(item, str)}
            # decode_inputs takes strings only: the objects stand in as empty texts, and come back below.
            tensor = tensor.model_copy(update={"data": ["" if index in objects else item for index, item in enumerate(flat)]})
        inputs.append(tensor)
    only_rows = manifest.model_copy(update={"inputs": [ROWS_INPUT]})
    texts = decode_inputs(request.model_copy(update={"inputs": inputs}), binary, only_rows)[ROWS_INPUT.name].ravel()
    size = sum(len(text) for index, text in enumerate(texts) if index not in objects)
    if size > max_json_bytes:
        raise ProtocolError(f"the rows' JSON texts are {size} bytes, over the {max_json_bytes}-byte limit (max_json_bytes): "
                            "split them into several requests", 413)
    return [objects[index] if index in objects else _json_row(text, index) for index, text in enumerate(texts)]


def _json_row(text: bytes, index: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        reason = error.msg
    except ValueError:  # not UTF-8, or an integer of more digits than Python converts
        reason = "not UTF-8, or a number too long"
    except RecursionError:
        reason = "nested too deeply"
    raise ProtocolError(f"row {index} is not a JSON object text ({reason}); send each row as {{\"column\": value, ...}}")


def _text_feeds(agent: Agent, served: ServedModel, request: InferRequest, binary: bytes, raw: dict) -> dict[str, np.ndarray] | None:
    """Token tensors for a text model's BYTES ``text`` input, or None when the request sends tensors."""
    if not isinstance(served.manifest.preprocessing, TokenizerPreprocessing) or not any(t.name == TEXT_INPUT.name for t in request.inputs):
        return None
    texts = decode_inputs(request, binary, served.manifest.model_copy(update={"inputs": [TEXT_INPUT]}))[TEXT_INPUT.name]
    strings = [leading_characters(item, agent.settings.max_text_chars) for item in texts.ravel()]
    encoded = agent.tokenizer_for(served).encode(strings)
    raw["texts"] = strings
    return {spec.name: encoded[spec.name] for spec in served.manifest.inputs}


def leading_characters(text: bytes, count: int) -> str:
    """The first ``count`` characters of UTF-8 ``text``, decoding no more of it than they can take (4 bytes each).

    The model reads at most max_length tokens, which ``count`` characters (max_text_chars) cover in any ordinary
    text; the cut bounds the tokenizer's time and memory whatever a client sends.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(text[:4 * count], final=len(text) <= 4 * count)[:count]
    except UnicodeDecodeError:
        raise ProtocolError("input 'text' must be UTF-8") from None


# --------------------------------------------------------------------------- the admin token


_bearer = HTTPBearer(auto_error=False, description="the token in the agent's admin_token_file")


async def require_admin(
    agent: Agent = Depends(_agent), credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """401 without a bearer token, 403 with a wrong one (compared in constant time)."""
    if agent.admin_token is None:
        raise HTTPException(403, "the admin API is off: set admin_token_file in the agent's settings")
    if credentials is None:
        raise HTTPException(401, "the admin API needs 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode("utf-8"), agent.admin_token):
        raise HTTPException(403, "wrong admin token")


# --------------------------------------------------------------------------- OIP: model repository extension

repository_routes = APIRouter(tags=["model repository"])


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool | None = Field(None, description="true: list only the versions that serve")


class ModelRequest(BaseModel):
    """The body of load and unload (``{"parameters": {"unload_dependents": false}}``); optional."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, JsonValue] | None = None


def _optional_json_body(schema: str) -> dict:
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


def _version_row(info: VersionInfo) -> dict:
    return {"name": info.name, "version": info.version, "state": info.state, "reason": info.reason}


@repository_routes.post("/v2/repository/index", summary="Repository index", openapi_extra=_optional_json_body("IndexRequest"))
async def repository_index(request: Request, agent: Agent = Depends(_agent)) -> list[dict]:
    wanted = await _control_body(request, agent, IndexRequest, "the index request")
    infos = await run_in_threadpool(agent.repository.index)
    return [_version_row(info) for info in infos if not wanted.ready or info.state == "READY"]


@repository_routes.post("/v2/repository/models/{name}/load", summary="Load a model (admin token)",
                        openapi_extra=_optional_json_body("ModelRequest"), dependencies=[Depends(require_admin)])
async def repository_load(name: str, request: Request, agent: Agent = Depends(_agent)) -> dict:
    load = await _control_body(request, agent, ModelRequest, "the load request")
    overrides = sorted(key for key in (load.parameters or {}) if key == "config" or key.startswith("file:"))
    if overrides:
        raise ProtocolError(f"load parameters {overrides} are not supported: models come only from signed bundles")
    check_model_reference(name)
    served = await run_in_threadpool(agent.repository.load, name)
    log.info("loaded %s %s through the repository API", served.name, served.version)
    return {"name": served.name, "version": served.version, "state": "READY"}


@repository_routes.post("/v2/repository/models/{name}/unload", summary="Unload a model (admin token)",
                        openapi_extra=_optional_json_body("ModelRequest"), dependencies=[Depends(require_admin)])
async def repository_unload(name: str, request: Request, agent: Agent = Depends(_agent)) -> dict:
    await _control_body(request, agent, ModelRequest, "the unload request")
    check_model_reference(name)
    await run_in_threadpool(agent.repository.unload, name)
    agent.forget(name)
    log.info("unloaded %s through the repository API", name)
    return {"name": name}


# --------------------------------------------------------------------------- admin API

admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the signed .ekb bundle, as raw bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _served_row(served: ServedModel) -> dict:
    # runtime: what runs the model here (an openvino bundle runs on ONNX Runtime where OpenVINO does not import).
    return {"name": served.name, "version": served.version, "state": "READY", "golden_error": served.golden_error,
            "runtime": list(served.session.providers)}


def _admin_row(info: VersionInfo) -> dict:
    return {**_version_row(info), "active": info.active}


@admin.post("/models", summary="Install a bundle", openapi_extra=_UPLOAD_BODY)
async def install_bundle(request: Request, force: bool = False, agent: Agent = Depends(_agent)) -> dict:
    """Verify, load, golden-check and switch to the uploaded bundle; on any failure the serving model stays."""
    await agent.start_ended()
    upload = agent.repository.new_upload_path()
    try:
        size = await receive_to_file(request, upload, agent.settings.max_body_bytes, agent.http_limits)
        served = await run_in_threadpool(agent.repository.install, upload, force=force)
    except UserError as error:  # a refused bundle, or an upload over the limit
        agent.metrics.installs["refused"] += 1
        log.warning("bundle not installed: %s", error)
        raise
    except Exception:
        agent.metrics.installs["error"] += 1
        raise
    finally:
        upload.unlink(missing_ok=True)
    agent.metrics.installs["success"] += 1
    log.info("installed %s %s", served.name, served.version, extra={"bytes": size, "golden_error": served.golden_error})
    return _served_row(served)


@admin.get("/models", summary="Installed versions")
async def list_versions(agent: Agent = Depends(_agent)) -> list[dict]:
    return [_admin_row(info) for info in await run_in_threadpool(agent.repository.index)]


@admin.post("/models/{name}/activate/{version}", summary="Serve an installed version")
async def activate_version(name: str, version: str, agent: Agent = Depends(_agent)) -> dict:
    check_model_reference(name, version)
    served = await run_in_threadpool(agent.repository.activate, name, version)
    log.info("activated %s %s", served.name, served.version)
    return _served_row(served)


@admin.post("/models/{name}/rollback", summary="Serve the previous version")
async def rollback_model(name: str, agent: Agent = Depends(_agent)) -> dict:
    check_model_reference(name)
    served = await run_in_threadpool(agent.repository.rollback, name)
    agent.metrics.rollbacks += 1
    return _served_row(served)


@admin.get("/status", summary="Agent status")
async def agent_status(agent: Agent = Depends(_agent)) -> dict:
    infos = await run_in_threadpool(agent.repository.index)
    problems = await agent.readiness_problems()
    settings = agent.settings
    return {
        "name": SERVER_NAME,
        "version": agent_version(),
        "uptime_s": round(time.time() - agent.started_at, 3),
        "ready": not problems,
        "not_ready_because": problems,
        "models": [_admin_row(info) for info in infos],
        "batching": {"max_batch": settings.max_batch, "max_delay_ms": settings.max_batch_delay_ms},
        "host": agent.repository.host.to_dict(),
    }


# --------------------------------------------------------------------------- metrics

metrics_routes = APIRouter(tags=["metrics"])


@metrics_routes.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(agent: Agent = Depends(_agent)) -> PlainTextResponse:
    infos = await run_in_threadpool(agent.repository.index)
    active = [(info.name, info.version) for info in infos if info.active and info.state == "READY"]
    text = agent.metrics.render(active)
    if agent.telemetry is not None:
        text += "\n".join(await run_in_threadpool(agent.telemetry.metric_lines)) + "\n"
    if agent.desired is not None:
        text += "\n".join(agent.desired.metric_lines()) + "\n"
    if agent.explain_pool is not None:
        text += "\n".join(agent.explanations.metric_lines()) + "\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# --------------------------------------------------------------------------- the app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request bodies the routes read by hand (they may be binary)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (InferRequest, IndexRequest, ModelRequest):
            document = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(document.pop("$defs", {}))
            components[model.__name__] = document
        app.openapi_schema = schema
    return app.openapi_schema


async def _close_due_windows(telemetry: Telemetry) -> None:
    """Close windows by time: once a second, on the event loop that also counts requests (the monitors take no lock)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            telemetry.tick()
        except Exception:
            log.exception("closing telemetry windows failed")


def create_app(repository: Repository, settings: AgentSettings) -> FastAPI:
    """The agent's web application. At startup it starts ``repository`` in a worker thread
    (recovery, then loading and golden-checking each active model); the server is
    live at once and ready when that is done.
    """
    agent = Agent(repository, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(agent.start_repository())
        ticking = None
        if agent.telemetry is not None:
            agent.telemetry.start()
            ticking = asyncio.create_task(_close_due_windows(agent.telemetry))
        pulling = asyncio.create_task(_start_desired_puller(agent)) if settings.telemetry_url is not None else None
        yield
        if not starting.done():
            starting.cancel()
        if pulling is not None:
            pulling.cancel()
        if agent.desired is not None:
            await run_in_threadpool(agent.desired.stop)
        if ticking is not None:
            ticking.cancel()
            # Windows still open are written to the outbox: a clean stop loses nothing.
            await run_in_threadpool(agent.telemetry.stop)
        agent.preprocess_pool.shutdown(wait=False)
        if agent.explain_pool is not None:
            agent.explain_pool.shutdown(wait=False)

    app = FastAPI(
        title=SERVER_NAME,
        version=agent_version(),
        description="edgekit device agent: Open Inference Protocol v2, model repository, admin API, metrics",
        lifespan=lifespan,
    )
    app.state.agent = agent
    app.add_exception_handler(UserError, _on_user_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_internal_error)
    for router in (oip, repository_routes, admin, metrics_routes):
        app.include_router(router)
    app.add_middleware(HeaderCountLimit, limits=agent.http_limits)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def run_server(settings: AgentSettings) -> None:
    """Serve until stopped (``edgekit-agent serve``): JSON logs, the repository under ``state_dir``, uvicorn."""
    import uvicorn

    from device_agent.keys import Keyring
    from device_agent.runtime import RuntimeOptions

    configure_json_logging(settings.log_level)
    repository = Repository(
        settings.state_dir,
        Keyring.load(settings.keyring_dir),
        keep_versions=settings.keep_versions,
        # TensorRT engines are built on the device once and kept with its state.
        runtime_options=RuntimeOptions(
            intra_op_threads=settings.intra_op_threads, engine_cache_dir=settings.state_dir / "engine-cache"
        ),
    )
    app = create_app(repository, settings)
    log.info("serving on %s:%s", settings.host, settings.port, extra={"tls": settings.ssl_certfile is not None})
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_config=None,
        log_level=settings.log_level,
        server_header=False,
        **uvicorn_options(connection_cap(settings.http_limits())),
    )
