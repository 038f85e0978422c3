"""What one connection or request may cost a server, declared once and enforced before the app does any work.

Both servers (the device agent and the fleet collector) run uvicorn with the
protocol class made here and read request bodies with :func:`read_body`, so one
set of rules holds for both:

- **Headers**: the request line and headers together are at most
  ``max_header_bytes`` (431 past it, before the app sees the request), at most
  ``max_headers`` of them (431), and complete within ``header_timeout_s`` of the
  connection opening or of the previous response (the connection is closed: a
  client that sends nothing, or a byte every few seconds, holds no descriptor
  for long).
- **Idle keep-alive** connections are closed after ``keep_alive_s``.
- **Connections**: past ``max_connections`` open at once a new one is answered
  503 with ``Retry-After`` and closed, so descriptors never run out; the servers
  raise their descriptor limit to the hard limit at start (:func:`raise_open_files_limit`).
- **Bodies** are streamed and counted: a declared ``Content-Length`` over the
  limit is refused (413) before a byte is read, a streamed one as soon as it
  passes; a body must arrive within ``body_timeout_s`` plus the time
  ``min_body_rate`` bytes per second would take (408).
- **Saturation**: :class:`Admission` answers 503 with ``Retry-After`` once
  ``limit`` requests of the guarded routes are in flight.

Why h11 and not httptools: httptools (llhttp) has no bound on the size of a
header (a 128 MB header took the agent 18 s to parse, none of it counted against
the body limit); h11 refuses a request whose headers pass its incomplete-event
bound, as it reads them. It costs some microseconds per request, small next to a
model run.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP-level contract of one server (see the module's docstring)."""

    max_header_bytes: int = 16 << 10
    max_headers: int = 100
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    body_timeout_s: float = 30.0
    min_body_rate: int = 64 << 10
    max_connections: int = 1000


class RequestRefused(Exception):
    """A request refused for its size or pace; ``status_code`` is the HTTP status (413 or 408)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


# --------------------------------------------------------------------------- the protocol


def _plain_response(status: int, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": message}).encode()
    headers = [f"HTTP/1.1 {status} {_reason(status)}", "content-type: application/json",
               f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        headers.append(f"retry-after: {retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body


def _reason(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase


_LINGER_S = 1.0  # how long a refused connection's remaining input is read and dropped before it is closed


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a header-size answer of 431 and a connection cap."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, f"the server holds {self.limits.max_connections} connections, its limit; retry later", retry_after=1)
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_refused", False):
            return  # the answer is sent; the rest of the request is read and dropped until the connection closes
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
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # Nothing or part of a request line and headers in header_timeout_s: an idle or slow-loris connection.
            self.transport.close()

    def _refuse(self, status: int, message: str, retry_after: int | None = None) -> None:
        """Answer and close, a moment later: closing with the client's request still unread would reset the
        connection, and the client would see the reset instead of the answer."""
        self._refused = True
        self.transport.write(_plain_response(status, message, retry_after))
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


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft descriptor limit towards ``wanted`` (never past the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def connection_cap(limits: HttpLimits, reserve: int = 128) -> HttpLimits:
    """``limits`` with max_connections lowered where the descriptor limit is smaller (``reserve`` kept for files)."""
    from dataclasses import replace

    available = raise_open_files_limit(limits.max_connections + reserve) - reserve
    return limits if available >= limits.max_connections else replace(limits, max_connections=max(available, 1))


# --------------------------------------------------------------------------- bodies


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


async def stream_body(request: Any, limit: int, setting: str, limits: HttpLimits) -> AsyncIterator[bytes]:
    """The body's chunks (a Starlette request), refused with 413 past ``limit`` bytes and 408 when too slow."""
    refuse_declared_length(request.headers, limit, setting)
    size = 0
    async for chunk in _chunks_in_time(request.stream(), limits):
        size += len(chunk)
        if size > limit:
            raise RequestRefused(f"the request body is over the {limit}-byte limit ({setting})", 413)
        yield chunk


async def read_body(request: Any, limit: int, setting: str, limits: HttpLimits) -> bytes:
    """The whole body (see :func:`stream_body`); memory never holds more than ``limit`` bytes of it."""
    return b"".join([chunk async for chunk in stream_body(request, limit, setting, limits)])


# --------------------------------------------------------------------------- saturation and header count


class Admission:
    """ASGI middleware: 431 for too many headers; 503 + Retry-After once ``limit`` guarded requests are in flight.

    ``guarded(path)`` says which routes count (inference, uploads); health checks and metrics never wait or count.
    """

    def __init__(self, app: Any, *, limit: int, guarded: Any, limits: HttpLimits, what: str) -> None:
        self.app, self.limit, self.guarded, self.limits, self.what = app, limit, guarded, limits, what
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope["headers"]) > self.limits.max_headers:
            await _send_error(send, 431, f"the request has {len(scope['headers'])} headers; the limit is {self.limits.max_headers}")
            return
        if not self.guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _send_error(send, 503, f"{self.limit} {self.what} are in flight, the server's limit; retry shortly",
                              {"retry-after": "1"})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _send_error(send: Any, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
