"""The collector under hostile input, as a real `edgekit fleet serve` process in an address-space limit.

Each case asserts the answer's code, that a valid upload right after is stored,
and, at the end, that the collector's peak memory stayed under a stated bound.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from edgekit.fleet.store import Store
from tests.fleet.conftest import collector_process, make_batch, make_reference, post
from tests.support.limits import peak_memory

MEMORY_LIMIT = 2 << 30
PEAK_MEMORY_BOUND = 500 << 20  # resident memory the collector may reach over this whole module


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    db_url = f"sqlite:///{tmp_path_factory.mktemp('hostile-collector') / 'fleet.db'}"
    store = Store.open(db_url)
    token = store.add_device("edge-1")
    store.close()
    with collector_process(db_url, memory_limit=MEMORY_LIMIT) as running:
        running.token = token
        running.sequence = 0
        yield running
        assert running.process.poll() is None, "the collector died"
        assert peak_memory(running.process.pid) < PEAK_MEMORY_BOUND


def _port(collector) -> int:
    return int(collector.url.rsplit(":", 1)[1])


def _stores_a_valid_upload(collector) -> None:
    collector.sequence += 1
    response = post(collector.url, collector.token, make_batch("edge-1", [collector.sequence], make_reference()))
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == [collector.sequence]


def test_a_declared_huge_body_is_refused_before_reading(collector):
    with socket.create_connection(("127.0.0.1", _port(collector)), timeout=10) as conn:
        conn.sendall(f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {collector.token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {100 << 30}\r\n\r\n".encode())
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    _stores_a_valid_upload(collector)


def test_a_chunked_body_past_the_limit_is_cut_off_while_streaming(collector):
    """Today's collector read the whole body first: 1.6 GB of it killed it. Here 256 MiB are offered."""
    answer = b""
    with socket.create_connection(("127.0.0.1", _port(collector)), timeout=10) as conn:
        conn.sendall(f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {collector.token}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        conn.settimeout(0.5)
        for _ in range(256):
            try:
                conn.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                answer += conn.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        conn.settimeout(10)
        if not answer:
            answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    _stores_a_valid_upload(collector)


def test_an_oversized_header_is_refused_with_431(collector):
    response = httpx.get(f"{collector.url}/v1/health", headers={"X-Big": "a" * (128 << 10)}, timeout=30)
    assert response.status_code == 431, response.text
    _stores_a_valid_upload(collector)


def test_idle_connections_do_not_stop_new_clients_and_are_closed(collector):
    idle = [socket.create_connection(("127.0.0.1", _port(collector))) for _ in range(300)]
    try:
        assert httpx.get(f"{collector.url}/v1/health", timeout=5).status_code == 200
        _stores_a_valid_upload(collector)
        deadline = time.monotonic() + 20  # the collector's header_timeout_s is 10
        for conn in idle:
            conn.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                assert conn.recv(4096) == b""
            except ConnectionResetError:
                pass
    finally:
        for conn in idle:
            conn.close()


def test_a_ten_million_bin_histogram_is_refused_without_the_memory(collector):
    """A 19 MB body of one huge histogram took 542 MB of the collector's memory; now the body limit or MAX_BINS stops it."""
    batch = make_batch("edge-1", [10_000]).model_dump(mode="json")
    batch["windows"][0]["histograms"] = {"f0": [0] * 7_000_000}
    body = json.dumps(batch, separators=(",", ":")).encode()
    response = httpx.post(f"{collector.url}/v1/telemetry", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {collector.token}", "Content-Type": "application/json"})
    assert response.status_code in (413, 422), response.text
    _stores_a_valid_upload(collector)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_refused_and_the_next_upload_is_stored(collector, literal):
    batch = make_batch("edge-1", [20_000]).model_dump(mode="json")
    batch["windows"][0]["latency"]["p95_ms"] = 5.0
    body = json.dumps(batch).encode().replace(b'"p95_ms": 5.0', b'"p95_ms": ' + literal)
    response = httpx.post(f"{collector.url}/v1/telemetry", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {collector.token}", "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert "p95_ms" in response.json()["error"]
    _stores_a_valid_upload(collector)


def test_a_slow_loris_is_cut_off_at_the_header_deadline(collector):
    """One header byte every half second: closed once the collector's 10 s header deadline passes."""
    with socket.create_connection(("127.0.0.1", _port(collector))) as conn:
        started = time.monotonic()
        closed = False
        for byte in b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                conn.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.5)
            if time.monotonic() - started > 20:
                break
        conn.settimeout(5)
        try:
            closed = closed or conn.recv(4096) == b""
        except ConnectionResetError:
            closed = True
        assert closed and time.monotonic() - started < 16
    _stores_a_valid_upload(collector)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"errors": 600}, "errors"),
    ({"started_at": 1_700_000_100.0, "ended_at": 1_700_000_000.0}, "started_at"),
    ({"ended_at": 1e18}, "ended_at"),
    ({"model": {"name": "clf\u202e", "version": "1.0.0"}}, "model.name"),
])
def test_windows_that_break_the_contract_get_422_and_the_next_upload_is_stored(collector, change, fragment):
    batch = make_batch("edge-1", [30_000]).model_dump(mode="json")
    batch["windows"][0].update(change)
    response = post(collector.url, collector.token, batch)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]
    _stores_a_valid_upload(collector)


def test_a_request_sent_right_after_the_last_on_one_connection_is_answered(collector):
    # The next request's headers arrive with the previous one and its body a moment later: the server starts its
    # cycle while finishing the previous answer, and must not take it for a request answered before its body.
    collector.sequence += 1
    body = json.dumps(make_batch("edge-1", [collector.sequence]).model_dump(mode="json")).encode()
    with socket.create_connection(("127.0.0.1", _port(collector)), timeout=10) as conn:
        conn.sendall(b"GET /v1/health HTTP/1.1\r\nHost: collector\r\n\r\n"
                     b"POST /v1/telemetry HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {collector.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.5)
        conn.sendall(body)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2 or not answers.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answers += chunk
    assert answers.count(b"HTTP/1.1 200 OK") == 2, answers.decode(errors="replace")
    assert f'"stored":[{collector.sequence}]'.encode() in answers
