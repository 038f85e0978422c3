"""What one connection or request may cost a server, declared once and enforced before the app does any work.

Both servers (the device agent and the fleet collector) run uvicorn with the
protocol class made here and read request bodies with :func:`stream_body`, so
one set of rules holds for both:

- **Headers**: the request line and headers together are at most
  ``max_header_bytes`` (431 past it, before the app sees the request), at most
  ``max_headers`` of them (431), and complete within ``header_timeout_s`` of the
  connection opening (or of the previous response, ``keep_alive_s`` when that
  is longer); else the connection is closed: a client that sends nothing, or a
  byte every few seconds, holds no descriptor for long.
- **Connections**: past ``max_connections`` open at once a new one is answered
  503 with ``Retry-After`` and closed, so descriptors never run out; the servers
  raise their descriptor limit towards it at start (:func:`connection_cap`). A
  response sent before the request's body arrived (a refusal) closes the
  connection: the rest of that body is not wanted.
- **Bodies** are streamed and counted: a declared ``Content-Length`` over the
  limit is refused (413) before a byte is read, a streamed one as soon as it
  passes; a body must arrive within ``body_timeout_s`` plus the time
  ``min_body_rate`` bytes per second would take (408).
- **Load** (:class:`RequestBudget`): the bodies of all requests in flight hold
  at most ``max_inflight_body_bytes`` together, counted as they arrive, and at
  most ``max_concurrent_requests`` requests work (decode, run) at once; past
  either, 503 with ``Retry-After``. A slow client holds a connection, never a
  work slot or memory it has not sent.

Why h11 and not httptools: httptools (llhttp) has no bound on the size of a
header (a 128 MB header took the agent 18 s to parse, none of it counted against
the body limit); h11 refuses a request whose headers pass its incomplete-event
bound, as it reads them. It costs some microseconds per request, small next to a
model run (bench/README.md, "Device agent").
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from device_agent.errors import UserError

log = logging.getLogger("edgekit.http")


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP-level contract of one server (see the module's docstring)."""

    max_header_bytes: int = 16 << 10
    max_headers: int = 100
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    body_timeout_s: float = 30.0
    min_body_rate: int = 16 << 10
    max_connections: int = 1000
    max_inflight_body_bytes: int = 256 << 20
    max_concurrent_requests: int = 32


class RequestRefused(UserError):
    """A request refused for its size, pace or the server's load; ``status_code`` and ``headers`` make the answer."""

    def __init__(self, message: str, status_code: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers


def error_body(message: str) -> bytes:
    """The body of every error either server sends: ``{"error": "..."}``."""
    return json.dumps({"error": message}).encode()


# --------------------------------------------------------------------------- the protocol


_LINGER_S = 1.0  # how long a refused connection's remaining input is read and dropped before it is closed


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a header-size answer of 431 and a connection cap."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._closing_soon = False
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, f"the server holds {self.limits.max_connections} connections, its limit; retry later", retry_after=1)
            return
        self._arm_header_timer(self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._closing_soon:
            return  # answered already: the rest of the request is read and dropped until the connection closes
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._header_timer.cancel()  # the request's headers are complete
            self._header_timer = None

    def send_400_response(self, msg: str) -> None:
        # h11 refuses a request whose line and headers stay incomplete past h11_max_incomplete_event_size.
        if len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            self._refuse(431, f"the request line and headers pass the {self.limits.max_header_bytes}-byte limit")
        else:
            self._refuse(400, msg)

    def on_response_complete(self) -> None:
        # Read before uvicorn's own handler: when the request is done, that handler starts the next cycle and parses a
        # request the client already sent on this connection, whose body may still be arriving (SEND_BODY again).
        answered_before_body = self.conn.their_state is h11.SEND_BODY
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if answered_before_body:
            # Answered before the body arrived (413, 408, 401, a GET that ignores its body): uvicorn would keep the
            # connection waiting for a body nobody reads, with no deadline.
            self._close_soon()
            return
        if self.cycle is None or self.cycle.response_complete:  # no next request under way yet
            self._arm_header_timer(max(self.limits.header_timeout_s, self.limits.keep_alive_s))

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _arm_header_timer(self, seconds: float) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(seconds, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        no_request = self.cycle is None or self.cycle.response_complete
        if no_request and not self.transport.is_closing():
            # No complete request line and headers in time: an idle or slow-loris connection.
            self.transport.close()

    def _refuse(self, status: int, message: str, retry_after: int | None = None) -> None:
        body = error_body(message)
        headers = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                   f"content-length: {len(body)}", "connection: close"]
        if retry_after is not None:
            headers.append(f"retry-after: {retry_after}")
        self.transport.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body)
        self._close_soon()

    def _close_soon(self) -> None:
        """Close a moment later, dropping what arrives meanwhile: closing with the client's request still unread would
        reset the connection, and the client would see the reset instead of the answer."""
        self._closing_soon = True
        self.loop.call_later(_LINGER_S, self.transport.close)


def protocol_class(limits: HttpLimits) -> type[BoundedH11Protocol]:
    """The protocol uvicorn is given (``http=``), bound to ``limits``."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"limits": limits})


def uvicorn_options(limits: HttpLimits) -> dict[str, Any]:
    """The uvicorn.run / uvicorn.Config arguments that enforce ``limits``."""
    return {
        "http": protocol_class(limits),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "timeout_keep_alive": limits.keep_alive_s,
        "backlog": 1024,
    }


def connection_cap(limits: HttpLimits, reserve: int = 128) -> HttpLimits:
    """``limits`` with max_connections lowered where the descriptor limit cannot be raised enough (``reserve`` kept
    for files); the soft limit is raised towards the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + reserve
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft - reserve >= limits.max_connections:
        return limits
    log.warning("max_connections lowered from %d to %d: the open-files limit is %d (raise it with ulimit -n or LimitNOFILE=)",
                limits.max_connections, max(soft - reserve, 1), soft)
    return replace(limits, max_connections=max(soft - reserve, 1))


# --------------------------------------------------------------------------- bodies and load


class RequestBudget:
    """The load of the requests in flight, shared on one event loop (so it needs no lock): body bytes and work slots."""

    def __init__(self, limits: HttpLimits, what: str) -> None:
        self.limits, self.what = limits, what
        self.body_bytes = 0
        self.working = 0

    @contextmanager
    def holding(self) -> Iterator[HeldBudget]:
        """What one request holds, given back when the block ends."""
        held = HeldBudget(self)
        try:
            yield held
        finally:
            self.body_bytes -= held.body_bytes
            self.working -= held.working


class HeldBudget:
    """One request's share of a :class:`RequestBudget`."""

    def __init__(self, budget: RequestBudget) -> None:
        self.budget, self.body_bytes, self.working = budget, 0, 0

    def add_body(self, size: int) -> None:
        budget = self.budget
        if budget.body_bytes + size > budget.limits.max_inflight_body_bytes:
            raise _busy(f"the bodies of the {budget.what} in flight hold {budget.limits.max_inflight_body_bytes} bytes, the "
                        "server's limit (max_inflight_body_bytes)")
        budget.body_bytes += size
        self.body_bytes += size

    def start_work(self) -> None:
        budget = self.budget
        if budget.working >= budget.limits.max_concurrent_requests:
            raise _busy(f"{budget.limits.max_concurrent_requests} {budget.what} are at work, the server's limit "
                        "(max_concurrent_requests)")
        budget.working += 1
        self.working = 1


def _busy(message: str) -> RequestRefused:
    return RequestRefused(f"{message}; retry shortly", 503, {"Retry-After": "1"})


async def _chunks_in_time(stream: AsyncIterator[bytes], limits: HttpLimits) -> AsyncIterator[bytes]:
    """The body's chunks; RequestRefused(408) once the body is later than its size and the minimum rate allow."""
    started, received = time.monotonic(), 0
    iterator = stream.__aiter__()
    while True:
        allowed = limits.body_timeout_s + received / limits.min_body_rate - (time.monotonic() - started)
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), max(allowed, 0.0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestRefused(
                f"the request body arrived too slowly ({received} bytes in {time.monotonic() - started:.0f} s); "
                f"send it within {limits.body_timeout_s:g} s plus 1 s per {limits.min_body_rate} bytes", 408
            ) from None
        received += len(chunk)
        yield chunk


def refuse_declared_length(headers: Any, limit: int, setting: str) -> None:
    """413 when the request declares a Content-Length over ``limit``, before reading any of it."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestRefused(f"the request body ({declared} bytes) is over the {limit}-byte limit ({setting})", 413)


async def stream_body(request: Any, limit: int, setting: str, limits: HttpLimits,
                      held: HeldBudget | None = None) -> AsyncIterator[bytes]:
    """The body's chunks (a Starlette request): 413 past ``limit`` bytes, 408 when too slow, 503 when the chunks would
    pass the bytes in flight of ``held``'s budget (None: a body that goes to disk, not memory)."""
    refuse_declared_length(request.headers, limit, setting)
    size = 0
    async for chunk in _chunks_in_time(request.stream(), limits):
        size += len(chunk)
        if size > limit:
            raise RequestRefused(f"the request body is over the {limit}-byte limit ({setting})", 413)
        if held is not None:
            held.add_body(len(chunk))
        yield chunk


async def read_body(request: Any, limit: int, setting: str, limits: HttpLimits, held: HeldBudget | None = None) -> bytes:
    """The whole body (see :func:`stream_body`); memory never holds more than ``limit`` bytes of it."""
    return b"".join([chunk async for chunk in stream_body(request, limit, setting, limits, held)])


# --------------------------------------------------------------------------- header count


class HeaderCountLimit:
    """ASGI middleware: 431 for a request of more than ``max_headers`` headers (h11 bounds only their bytes)."""

    def __init__(self, app: Any, *, limits: HttpLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(scope["headers"]) > self.limits.max_headers:
            body = error_body(f"the request has {len(scope['headers'])} headers; the limit is {self.limits.max_headers}")
            await send({"type": "http.response.start", "status": 431,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
