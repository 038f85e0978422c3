"""The telemetry collector: a stateless FastAPI app over the fleet store.

Ingest: ``POST /v1/telemetry`` with ``Authorization: Bearer <device token>`` and
an ``UploadBatch`` body; the answer is an ``UploadAck`` naming every sequence of
the batch, stored now or before. Missing or unknown token → 401; a token of
another device than the batch's ``device_id`` → 403; a body that breaks the
contract → 422 (``{"error": "<field>: <problem>; …"}``): the schema's, and what
needs the collector's state: window times against its clock, and histogram bins
against the window's drift reference (sent in the batch or stored before); the
database away → 503, which a device treats like any other failure: it keeps the
rows and retries.

Queries (``GET /v1/devices``, ``/v1/devices/{id}/windows``, ``/v1/report``) are
for operators and dashboards, not devices: they need the operator token the
collector was started with (``--operator-token-file``); without one the query
API answers 403 and says how to turn it on. The CLI's ``report`` and ``alerts``
read the database directly and need no token.

No state lives in the process (tokens are checked against the database on each
request), so several collectors can serve one database behind a load balancer.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from device_agent.errors import UserError
from device_agent.desired_schema import DesiredState, DeviceReport, ReportAck
from device_agent.http_limits import HeaderCountLimit, HttpLimits, RequestBudget, read_body
from device_agent.telemetry_schema import (
    DeviceId,
    DriftReference,
    UploadAck,
    UploadBatch,
    reference_sha256,
)
from edgekit.fleet.desired import bundle_for_device, desired_state, read_bundle, record_report
from edgekit.fleet.rollouts import advance_rollouts, collector_actor
from edgekit.fleet.store import Store

log = logging.getLogger("edgekit.fleet.collector")

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
# An agent uploads batches of about 4 MiB (device_agent.telemetry.Outbox.pending), and one window with captured samples
# holds at most 4 MiB of them (AgentSettings.capture_max_bytes; base64 images: 5.3 MiB of JSON); 8 MiB takes either.
MAX_BODY_BYTES = 8 << 20
# Uploads validated at once: validation holds a body's Python objects, about 25 times its size for a body of numbers
# (bench/hostile_bench.py: 190 MB for 8 MiB). Uploads waiting for these threads hold only their bodies, within
# HTTP_LIMITS.max_inflight_body_bytes.
PARSE_THREADS = 2
HTTP_LIMITS = HttpLimits(max_inflight_body_bytes=64 << 20, max_concurrent_requests=16)
_UPLOAD_BODY = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/UploadBatch"}}}}


class ErrorBody(BaseModel):
    error: str


class DeviceInfo(BaseModel):
    id: str
    created_at: float
    windows: int
    last_seen: float | None


_ERRORS = {
    401: {"model": ErrorBody, "description": "missing or unknown token"},
    403: {"model": ErrorBody, "description": "the token may not do this"},
    422: {"model": ErrorBody, "description": "the request breaks the contract"},
    503: {"model": ErrorBody, "description": "the database is unavailable; retry later"},
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error(error.status_code, str(error.detail), getattr(error, "headers", None))


def _one_message(problems: list[str], shown: int = 20) -> str:
    return "; ".join(problems[:shown]) + (f"; and {len(problems) - shown} more" if len(problems) > shown else "")


def _describe_problems(errors) -> str:  # type: ignore[no-untyped-def]
    problems = []
    for problem in errors:
        where = ".".join(str(part) for part in problem["loc"] if part != "body") or "body"
        problems.append(f"{where}: {problem['msg']}")
    return _one_message(problems)


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return _error(422, _describe_problems(error.errors()))


async def _on_user_error(request: Request, error: UserError) -> JSONResponse:
    return _error(getattr(error, "status_code", 400), str(error), getattr(error, "headers", None))


async def _on_database_error(request: Request, error: sa.exc.SQLAlchemyError) -> JSONResponse:
    # Connection losses and lock timeouts: the device keeps its rows and retries later, nothing is lost.
    return _error(503, f"the fleet database is unavailable ({type(error).__name__}); retry later", {"Retry-After": "5"})


async def _on_internal_error(request: Request, error: Exception) -> JSONResponse:
    return _error(500, f"internal error ({type(error).__name__}); see the collector's log")


_bearer = HTTPBearer(auto_error=False, description="a device token (edgekit fleet devices add) or the operator token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _store(request: Request) -> Store:
    return request.app.state.store


def _authenticated_device(request: Request, credentials: Credentials) -> str:
    if credentials is None:
        raise HTTPException(401, "missing bearer token: send Authorization: Bearer <device token>", _UNAUTHORIZED)
    device = _store(request).device_for_token(credentials.credentials)
    if device is None:
        raise HTTPException(401, "unknown device token; issue one with `edgekit fleet devices add NAME`", _UNAUTHORIZED)
    return device


def _operator(request: Request, credentials: Credentials) -> None:
    expected: bytes | None = request.app.state.operator_token
    if expected is None:
        raise HTTPException(403, "the query API is off: start the collector with --operator-token-file FILE")
    if credentials is None:
        raise HTTPException(401, "missing bearer token: send Authorization: Bearer <operator token>", _UNAUTHORIZED)
    if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected):
        raise HTTPException(401, "wrong operator token", _UNAUTHORIZED)


# Young-generation threshold: a 500-window batch is ~45,000 container objects (models, their dicts, the histogram
# lists), alive until it is stored. At Python's default of 700 they went through ~60 young collections per batch and
# set off full ones; at 50,000 a batch costs about one. Older generations: collected 20x less often than they fill.
_GC_THRESHOLDS = (50_000, 20, 20)


@contextmanager
def gc_tuned_for_ingest() -> Iterator[None]:
    """Garbage collection tuned for ingest while the collector serves (the app's lifespan); restored afterwards.

    The objects made at start-up (FastAPI, SQLAlchemy, the pydantic schemas: ~90,000) will never be garbage, yet every
    full collection walked them; they are frozen out of it. With the thresholds above, the collector's CPU per window
    went from ~200 to ~150 µs in bench/collector_bench.py; its validation alone, in-process, from ~137 to ~70 µs.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    if app.state.rollouts is not None:
        app.state.rollouts.start()
    with gc_tuned_for_ingest():
        yield
    if app.state.rollouts is not None:
        await run_in_threadpool(app.state.rollouts.stop)
    app.state.parse_pool.shutdown(wait=False)


# The routes live on a module-level router so that each is a plain, named function; create_app mounts it.
_routes = APIRouter()


@_routes.get("/v1/health", summary="Liveness and database reachability")
def health(request: Request) -> dict:
    from edgekit.fleet.store import current_version

    return {"status": "ok", "schema_version": current_version(_store(request).engine)}


# Window times the collector accepts, against its own clock. Device clocks drift and an outbox holds weeks of unsent
# windows, so the past is bounded only by a date before any edgekit device ran; the future by a day: more than an
# NTP-kept clock drifts, or a hardware clock kept in local time is off (14 h at most), while the year 3000 is refused.
EARLIEST_WINDOW_TIME = 1_577_836_800.0  # 2020-01-01T00:00:00Z
MAX_CLOCK_AHEAD_S = 86_400.0


def _parse_upload(body: bytes, device: str) -> UploadBatch:
    """The batch in ``body``, checked against the contract, the authenticated ``device``, its references' digests
    and the collector's clock.

    Raises HTTPException: 422 for a contract breach, a misnamed reference or a window time out of range, 403 for
    records of another device than the token's. (The body's size was checked as it was read: ``upload``.)
    """
    try:
        batch = UploadBatch.model_validate_json(body)
    except ValidationError as error:
        raise HTTPException(422, _describe_problems(error.errors())) from None
    if batch.device_id != device:
        raise HTTPException(403, f"this token belongs to device {device!r}; it cannot write records of {batch.device_id!r}")
    for digest, reference in batch.references.items():
        actual = reference_sha256(reference)
        if actual != digest:
            raise HTTPException(422, f"references.{digest}: the reference's sha256 is {actual}; name it by that digest")
    problems = _clock_problems(batch, now=time.time())
    if problems:
        raise HTTPException(422, _one_message(problems))
    return batch


def _clock_problems(batch: UploadBatch, now: float) -> list[str]:
    """A problem for each window time outside [EARLIEST_WINDOW_TIME, now + MAX_CLOCK_AHEAD_S]."""
    latest = now + MAX_CLOCK_AHEAD_S
    problems = []
    for index, window in enumerate(batch.windows):
        for field, value in (("started_at", window.started_at), ("ended_at", window.ended_at)):
            if not EARLIEST_WINDOW_TIME <= value <= latest:
                problems.append(
                    f"windows.{index}.{field} (sequence {window.sequence}): {value!r} is outside "
                    f"[{EARLIEST_WINDOW_TIME:.0f} (2020-01-01T00:00:00Z), {latest:.0f} (the collector's clock + 1 day)]; "
                    "set the device's clock (NTP)"
                )
    return problems


def _bin_problems(batch: UploadBatch, references: Mapping[str, DriftReference]) -> list[str]:
    """A problem for each histogram (or score) of a feature its window's reference lacks, or with another bin count.

    A window without a reference, or whose reference is not in ``references``, is bounded by the schema's MAX_BINS only.
    """
    bins = {digest: {name: feature.bins for name, feature in reference.features.items()}
            for digest, reference in references.items()}
    problems = []
    for index, window in enumerate(batch.windows):
        expected = bins.get(window.reference_sha256) if window.reference_sha256 else None
        if expected is None:
            continue
        where = f"(sequence {window.sequence}): the window's reference {window.reference_sha256[:12]}…"
        for name, counts in window.histograms.items():
            if name not in expected:
                problems.append(f"windows.{index}.histograms.{name} {where} has no feature {name!r}; "
                                f"its features: {', '.join(sorted(expected)[:10])}{' …' if len(expected) > 10 else ''}")
            elif len(counts) != expected[name]:
                problems.append(f"windows.{index}.histograms.{name} {where} has {expected[name]} bins for it, "
                                f"not {len(counts)}: send exactly {expected[name]} counts")
        problems.extend(f"windows.{index}.scores.{name} {where} has no feature {name!r}"
                        for name in window.scores if name not in expected)
    return problems


def _store_upload(store: Store, batch: UploadBatch) -> UploadAck:
    """Check the batch's histograms against their references (the batch's, else stored ones: one lookup), then store it."""
    unsent = {window.reference_sha256 for window in batch.windows if window.reference_sha256} - batch.references.keys()
    references = {**store.references(unsent), **batch.references} if unsent else batch.references
    problems = _bin_problems(batch, references)
    if problems:
        raise HTTPException(422, _one_message(problems))
    return store.ingest(batch)


@_routes.post("/v1/telemetry", response_model=UploadAck, responses={**_ERRORS, 413: {"model": ErrorBody}},
              summary="Upload window summaries (idempotent)", openapi_extra={"requestBody": _UPLOAD_BODY})
async def upload(request: Request, device: Annotated[str, Depends(_authenticated_device)]) -> UploadAck:
    # The body is parsed here, after the token check, so that a caller without a valid token learns
    # nothing but 401 (FastAPI would decode a declared body first), and in one pass from bytes.
    with request.app.state.budget.holding() as held:
        body = await read_body(request, MAX_BODY_BYTES, "MAX_BODY_BYTES: send fewer windows per batch", HTTP_LIMITS, held)
        held.start_work()
        # Validation is CPU work: off the event loop, which keeps answering health checks and token checks meanwhile.
        batch = await asyncio.get_running_loop().run_in_executor(request.app.state.parse_pool, _parse_upload, body, device)
        return await run_in_threadpool(_store_upload, _store(request), batch)


@_routes.get("/v1/devices", response_model=list[DeviceInfo], responses=_ERRORS, dependencies=[Depends(_operator)],
             summary="Registered devices with their window count and last upload")
def list_devices(request: Request) -> list[DeviceInfo]:
    return [DeviceInfo(**vars(row)) for row in _store(request).list_devices()]


@_routes.get("/v1/devices/{device_id}/windows", responses={**_ERRORS, 404: {"model": ErrorBody}},
             dependencies=[Depends(_operator)], summary="One device's stored windows, oldest first")
def device_windows(
    request: Request,
    device_id: Annotated[DeviceId, Path()],
    since: Annotated[float | None, Query(ge=0, le=1e11, description="only windows that ended at or after (unix seconds)")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[dict]:
    store = _store(request)
    if not store.has_device(device_id):
        raise HTTPException(404, f"unknown device {device_id!r}")
    windows, _skipped = store.fetch_windows(device=device_id, since=since, limit=limit)  # unreadable rows are left out
    return [window.to_dict() for window in windows]


@_routes.get("/v1/report", responses={**_ERRORS, 404: {"model": ErrorBody}}, dependencies=[Depends(_operator)],
             summary="The fleet review (as `edgekit fleet report --json`)")
def fleet_report(
    request: Request,
    since: Annotated[float | None, Query(ge=0, le=1e11, description="only windows that ended at or after (unix seconds)")] = None,
    device: Annotated[DeviceId | None, Query()] = None,
) -> dict:
    from edgekit.fleet.report import build_report
    from edgekit.fleet.store import FleetError

    try:
        return build_report(_store(request), since=since, device=device).to_dict()
    except FleetError as error:  # an unknown device
        raise HTTPException(404, str(error)) from None


# --------------------------------------------------------------------------- desired state (device_agent.desired_schema)

# A report names at most MAX_MODELS models and MAX_OUTCOMES outcomes of at most MAX_REASON_CHARS each: under 256 KiB.
MAX_REPORT_BYTES = 256 << 10
_RANGE = re.compile(r"^bytes=(\d{1,18})-(\d{0,18})$")  # longer numbers cannot be offsets: the whole bundle is sent


def _own_device(device_id: str, device: str) -> None:
    if device_id != device:
        raise HTTPException(403, f"this token belongs to device {device!r}, not {device_id!r}")


@_routes.get("/v1/devices/{device_id}/desired", response_model=DesiredState, responses=_ERRORS,
             summary="What this device should serve (device token)")
def desired(request: Request, device_id: Annotated[DeviceId, Path()],
            device: Annotated[str, Depends(_authenticated_device)]) -> DesiredState:
    _own_device(device_id, device)
    return desired_state(_store(request), device)


@_routes.get("/v1/bundles/{sha256}", responses={**_ERRORS, 404: {"model": ErrorBody}, 416: {"model": ErrorBody}},
             response_class=StreamingResponse, summary="A bundle this device is told to run; Range: bytes=N- resumes")
def bundle(request: Request, sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
           device: Annotated[str, Depends(_authenticated_device)]) -> StreamingResponse:
    store = _store(request)
    found = bundle_for_device(store, device, sha256)
    if found is None:
        raise HTTPException(404, f"no bundle {sha256[:12]}… for device {device!r}: a device reads only the bundles "
                                 "its desired state names")
    start, end, status = 0, found.size - 1, 200
    match = _RANGE.match(request.headers.get("range", "").strip())
    if match:  # one range; anything else is ignored and the whole bundle sent, as RFC 9110 allows
        start = int(match.group(1))
        end = min(int(match.group(2)), found.size - 1) if match.group(2) else found.size - 1
        if start >= found.size or end < start:
            raise HTTPException(416, f"range starts at byte {start}; the bundle has {found.size} bytes",
                                {"Content-Range": f"bytes */{found.size}"})
        status = 206
    headers = {"Content-Length": str(end - start + 1), "Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{found.size}"
    return StreamingResponse(iterate_in_threadpool(read_bundle(store, sha256, start, end)), status_code=status,
                             media_type="application/octet-stream", headers=headers)


def _parse_report(body: bytes, device_id: str) -> DeviceReport:
    try:
        report = DeviceReport.model_validate_json(body)
    except ValidationError as error:
        raise HTTPException(422, _describe_problems(error.errors())) from None
    if report.device_id != device_id:
        raise HTTPException(403, f"the report is of {report.device_id!r}, sent to /v1/devices/{device_id}/reports")
    return report


@_routes.post("/v1/devices/{device_id}/reports", response_model=ReportAck, responses={**_ERRORS, 413: {"model": ErrorBody}},
              summary="What the device serves and what it did with its desired bundles (device token; idempotent)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/DeviceReport"}}}}})
async def report_state(request: Request, device_id: Annotated[DeviceId, Path()],
                       device: Annotated[str, Depends(_authenticated_device)]) -> ReportAck:
    _own_device(device_id, device)
    with request.app.state.budget.holding() as held:
        body = await read_body(request, MAX_REPORT_BYTES, "MAX_REPORT_BYTES: send fewer outcomes", HTTP_LIMITS, held)
        held.start_work()
        report = _parse_report(body, device_id)
        return ReportAck(recorded=await run_in_threadpool(record_report, _store(request), report))


class RolloutDriver:
    """Advances the running rollouts every ``interval_s`` from a thread, while the collector serves."""

    def __init__(self, store: Store, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgekit-rollouts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        actor = collector_actor()
        while not self._stopping.wait(self.interval_s):
            try:
                advance_rollouts(self.store, actor=actor)
            except sa.exc.SQLAlchemyError as error:  # e.g. the database away: the rollouts wait in it, unchanged
                detail = str(error.orig if getattr(error, "orig", None) is not None else error).strip().splitlines()
                log.warning("rollouts not advanced (%s: %s); retrying", type(error).__name__, detail[0] if detail else "")
            except Exception:  # noqa: BLE001 - a bug must not stop ingest; it is logged with its traceback
                log.exception("rollouts not advanced")


def _openapi_with_upload_body(app: FastAPI) -> dict:
    """The app's OpenAPI document, built once, with the ``UploadBatch`` schema that ``upload`` refers to."""
    # The ingest body is parsed by hand (see upload); its schema still belongs in the document.
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema = UploadBatch.model_json_schema(ref_template="#/components/schemas/{model}")
        components = document.setdefault("components", {}).setdefault("schemas", {})
        components.update(schema.pop("$defs", {}))
        components["UploadBatch"] = schema
        report = DeviceReport.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(report.pop("$defs", {}))
        components["DeviceReport"] = report
        app.openapi_schema = document
    return app.openapi_schema


def create_app(store: Store, *, operator_token: str | None = None, rollout_interval_s: float | None = 5.0) -> FastAPI:
    """The collector over ``store``; ``operator_token`` turns the query API on; rollouts advance every
    ``rollout_interval_s`` (None: not by this collector)."""
    app = FastAPI(
        title="edgekit fleet collector",
        version="1",
        description="Telemetry ingest for edgekit device agents, and a query API for operators.",
        lifespan=_lifespan,
    )
    app.state.store = store
    app.state.parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="edgekit-collector-parse")
    app.state.budget = RequestBudget(HTTP_LIMITS, "uploads")
    app.state.operator_token = operator_token.encode("utf-8") if operator_token else None
    app.state.rollouts = RolloutDriver(store, rollout_interval_s) if rollout_interval_s else None
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(UserError, _on_user_error)
    app.add_exception_handler(sa.exc.OperationalError, _on_database_error)
    app.add_exception_handler(sa.exc.InterfaceError, _on_database_error)
    app.add_exception_handler(Exception, _on_internal_error)
    app.include_router(_routes)
    app.add_middleware(HeaderCountLimit, limits=HTTP_LIMITS)
    app.openapi = lambda: _openapi_with_upload_body(app)  # type: ignore[method-assign]
    return app
