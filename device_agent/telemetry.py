"""Telemetry that no crash or outage loses: the SQLite outbox, the uploader, and the agent's glue.

- :class:`Outbox`: every closed window is written to a local SQLite database
  (WAL, ``synchronous=FULL``: a committed window survives kill -9 and power
  loss) before anything else happens to it, keyed by ``(device_id, sequence)``.
  The next sequence number lives in the same database and moves in the same
  transaction as the insert, so a restart never reuses one. The outbox is
  bounded by rows and bytes; when a new window does not fit, the oldest are
  evicted and counted, and the count (``evicted_total``, persisted) travels
  upstream in every later window.
- :class:`Uploader`: a thread that sends the oldest windows in batches
  (``POST {url}/v1/telemetry``, ``Authorization: Bearer <token>``, timeouts on
  every request), and deletes exactly the sequences the collector's
  ``UploadAck`` lists. Failures back off exponentially with full jitter; 401
  and 403 are logged as a configuration problem and back off the same way.
  A batch the collector refuses as breaking the contract (422, 413) is sent
  again a window at a time, and a window refused on its own moves to a
  bounded ``rejected`` table with the collector's reason (logged, counted in
  ``edgekit_drift_outbox_rejected_total``): one bad window, say from a clock
  set wrong, never blocks the windows after it.
  Delivery is at-least-once; the collector's upsert makes storage exactly-once.
- :class:`Telemetry`: one :class:`~device_agent.drift.DriftMonitor` per served
  model version, a writer thread that moves closed windows into the outbox,
  and the ``edgekit_drift_*`` metrics.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.drift import DriftMonitor, MonitorSettings
from device_agent.telemetry_schema import (
    MAX_WINDOWS_PER_BATCH,
    DriftReference,
    ModelRef,
    UploadAck,
    WindowSummary,
)

log = logging.getLogger("edgekit.agent.telemetry")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    device_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    body TEXT NOT NULL,
    size INTEGER NOT NULL,
    reference_sha256 TEXT,
    PRIMARY KEY (device_id, sequence)
);
CREATE TABLE IF NOT EXISTS counters (
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (device_id, name)
);
CREATE TABLE IF NOT EXISTS drift_references (
    sha256 TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    device_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    rejected_at REAL NOT NULL,
    PRIMARY KEY (device_id, sequence)
);
"""
# Windows the collector refused, kept for an operator to read (sqlite3 outbox.sqlite 'SELECT reason FROM rejected');
# past this many the oldest go. They are never sent again: the collector refused them on their own.
MAX_REJECTED = 1000


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    bytes: int
    evicted_total: int
    next_sequence: int
    rejected_total: int = 0


class Outbox:
    """The durable, bounded queue of closed windows of one device (see the module docstring). Thread-safe."""

    def __init__(self, path: Path, device_id: str, *, max_rows: int = 10_000, max_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.device_id = device_id
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a sequence is read and used atomically.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """The block under the lock in one write transaction (BEGIN IMMEDIATE): committed at its end, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE device_id = ? AND name = ?", (self.device_id, name)).fetchone()
        return row[0] if row else 0

    def _set_counter(self, name: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO counters (device_id, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id, name) DO UPDATE SET value = excluded.value",
            (self.device_id, name, value),
        )

    def append(self, fields: dict, reference: DriftReference | None = None) -> WindowSummary:
        """Give the window its sequence and ``evicted_total``, make room, and commit it; returns what was stored."""
        with self._transaction():
            sequence = self._next_sequence()
            evicted = self._counter("evicted_total")
            summary = WindowSummary(**fields, sequence=sequence, evicted_total=evicted)
            body = summary.model_dump_json()
            evicted += self._make_room(len(body))
            if evicted != summary.evicted_total:
                summary = summary.model_copy(update={"evicted_total": evicted})
                body = summary.model_dump_json()
            self._db.execute(
                "INSERT INTO windows (device_id, sequence, body, size, reference_sha256) VALUES (?, ?, ?, ?, ?)",
                (self.device_id, sequence, body, len(body), summary.reference_sha256),
            )
            if reference is not None and summary.reference_sha256 is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO drift_references (sha256, body) VALUES (?, ?)",
                    (summary.reference_sha256, reference.model_dump_json()),
                )
            self._set_counter("next_sequence", sequence + 1)
            self._set_counter("evicted_total", evicted)
        return summary

    def _next_sequence(self) -> int:
        stored = self._db.execute("SELECT MAX(sequence) FROM windows WHERE device_id = ?", (self.device_id,)).fetchone()[0]
        # The counter is the truth; the table's maximum only guards against a counter lost to manual editing.
        return max(self._counter("next_sequence"), (stored + 1) if stored is not None else 0)

    def _make_room(self, incoming_bytes: int) -> int:
        """Evict the oldest windows until one more of ``incoming_bytes`` fits; how many were evicted."""
        rows, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM windows WHERE device_id = ?", (self.device_id,)
        ).fetchone()
        evicted = 0
        if rows + 1 <= self.max_rows and size + incoming_bytes <= self.max_bytes:
            return 0
        for sequence, row_size in self._db.execute(
            "SELECT sequence, size FROM windows WHERE device_id = ? ORDER BY sequence", (self.device_id,)
        ).fetchall():
            if rows + 1 <= self.max_rows and size + incoming_bytes <= self.max_bytes:
                break
            self._db.execute("DELETE FROM windows WHERE device_id = ? AND sequence = ?", (self.device_id, sequence))
            rows, size, evicted = rows - 1, size - row_size, evicted + 1
        if evicted:
            log.warning("telemetry outbox full: evicted %d oldest unsent windows", evicted, extra={"outbox": str(self.path)})
        return evicted

    def pending(self, limit: int = 100, max_bytes: int = 4 << 20) -> list[tuple[int, str, str | None]]:
        """The oldest unsent windows, ``(sequence, body JSON, reference sha256)``, at most ``limit`` and about ``max_bytes``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, body, reference_sha256, size FROM windows WHERE device_id = ? ORDER BY sequence LIMIT ?",
                (self.device_id, limit),
            ).fetchall()
        chosen, total = [], 0
        for sequence, body, sha, size in rows:
            if chosen and total + size > max_bytes:
                break
            chosen.append((sequence, body, sha))
            total += size
        return chosen

    def references(self, digests: Iterable[str]) -> dict[str, str]:
        """The stored references' JSON, by sha256."""
        wanted = sorted(set(digests))
        if not wanted:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT sha256, body FROM drift_references WHERE sha256 IN ({','.join('?' * len(wanted))})", wanted
            ).fetchall()
        return dict(rows)

    def delete(self, sequences: Iterable[int]) -> int:
        """Remove the acknowledged windows; how many rows went."""
        wanted = [(self.device_id, int(s)) for s in set(sequences)]
        if not wanted:
            return 0
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM windows WHERE device_id = ? AND sequence = ?", wanted)
            deleted = self._db.total_changes - before
            self._db.execute(
                "DELETE FROM drift_references WHERE sha256 NOT IN "
                "(SELECT DISTINCT reference_sha256 FROM windows WHERE reference_sha256 IS NOT NULL)"
            )
        return deleted

    def reject(self, sequence: int, reason: str) -> None:
        """Move a window the collector refused on its own out of the queue, into ``rejected`` with the reason."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO rejected (device_id, sequence, body, reason, rejected_at) "
                "SELECT device_id, sequence, body, ?, ? FROM windows WHERE device_id = ? AND sequence = ?",
                (reason[:2000], time.time(), self.device_id, sequence),
            )
            self._db.execute("DELETE FROM windows WHERE device_id = ? AND sequence = ?", (self.device_id, sequence))
            self._db.execute(
                "DELETE FROM rejected WHERE device_id = ? AND sequence NOT IN "
                "(SELECT sequence FROM rejected WHERE device_id = ? ORDER BY sequence DESC LIMIT ?)",
                (self.device_id, self.device_id, MAX_REJECTED),
            )
            self._set_counter("rejected_total", self._counter("rejected_total") + 1)

    def rejected(self) -> list[tuple[int, str]]:
        """The kept refused windows: ``(sequence, the collector's reason)``, oldest first."""
        with self._lock:
            return self._db.execute("SELECT sequence, reason FROM rejected WHERE device_id = ? ORDER BY sequence",
                                    (self.device_id,)).fetchall()

    def stats(self) -> OutboxStats:
        with self._lock:
            rows, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM windows WHERE device_id = ?", (self.device_id,)
            ).fetchone()
            evicted = self._counter("evicted_total")
            next_sequence = self._next_sequence()
            rejected = self._counter("rejected_total")
        return OutboxStats(rows=rows, bytes=size, evicted_total=evicted, next_sequence=next_sequence, rejected_total=rejected)


# --------------------------------------------------------------------------- the uploader


# What the collector answers for a batch that breaks the contract (a window's content or size), as opposed to a problem
# of the collector, the network or the token: resending the same window will never succeed.
_CONTRACT_REFUSALS = (413, 422)


def _refuses_the_window(error: UploadRefused) -> bool:
    """Whether the collector's answer to a batch of one window refuses the window itself: too large, or a 422 whose
    message names it (``windows.0``)."""
    return error.status == 413 or (error.status == 422 and "windows.0" in str(error))


class UploadRefused(Exception):
    """The collector answered, but not with an acknowledgement (4xx/5xx or a body that is not an UploadAck)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class UploaderStats:
    uploaded: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_success_at: float | None = None
    last_error: str | None = None


class Uploader:
    """Sends the outbox to the collector from a background thread until :meth:`stop`."""

    def __init__(
        self,
        outbox: Outbox,
        url: str,
        token: str,
        *,
        batch_windows: int = 200,
        batch_bytes: int = 4 << 20,
        timeout_s: float = 10.0,
        idle_s: float = 5.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
    ) -> None:
        self.outbox = outbox
        self.endpoint = url.rstrip("/") + "/v1/telemetry"
        self._token = token
        self.batch_windows = min(batch_windows, MAX_WINDOWS_PER_BATCH)
        self.batch_bytes = batch_bytes
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stats = UploaderStats()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgekit-telemetry-uploader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A new window is in the outbox: send it without waiting for the idle poll (a backoff still holds)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                sent = self.upload_once()
            except Exception as error:  # noqa: BLE001 - any failure (network, HTTP, disk): keep the rows, back off, retry
                self._failed(error)
                self._sleep(self._backoff(), wakeable=False)
                continue
            if sent == 0:
                self._sleep(self.idle_s, wakeable=True)

    def _sleep(self, seconds: float, *, wakeable: bool) -> None:
        if wakeable:
            self._wake.wait(seconds)
            self._wake.clear()
        else:
            self._stopping.wait(seconds)

    def _backoff(self) -> float:
        # Full jitter (uniform over [0, capped exponential]): a fleet that lost its collector does not return in step.
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(self.stats.consecutive_failures - 1, 30))
        return random.uniform(0, ceiling)

    def _failed(self, error: Exception) -> None:
        self.stats.failures += 1
        self.stats.consecutive_failures += 1
        self.stats.last_error = str(error)
        if isinstance(error, UploadRefused) and error.status in (401, 403):
            log.error(
                "the collector refused this device's token (%s); check device_id and device_token_file "
                "(issue a token with `edgekit fleet devices add NAME`); windows stay in the outbox",
                error,
                extra={"endpoint": self.endpoint},
            )
        else:
            log.warning("telemetry upload failed (%s); retrying with backoff", error, extra={"endpoint": self.endpoint})

    def upload_once(self) -> int:
        """Send one batch of the oldest windows; how many left the outbox (acknowledged, or refused on their own;
        0 when the outbox is empty). Raises on failure."""
        rows = self.outbox.pending(self.batch_windows, self.batch_bytes)
        if not rows:
            return 0
        try:
            return self._send(rows)
        except UploadRefused as error:
            if error.status not in _CONTRACT_REFUSALS:
                raise
        # Some window breaks the collector's contract: find which, one at a time, so the others still go.
        handled = 0
        for row in rows:
            try:
                handled += self._send([row])
            except UploadRefused as error:
                if not _refuses_the_window(error):
                    raise  # e.g. its drift reference: not this window's own fault, so it is kept and retried
                self.outbox.reject(row[0], str(error))
                handled += 1
                log.error("the collector refused telemetry window %d (%s); it is kept in the outbox's rejected table "
                          "and not sent again", row[0], error, extra={"endpoint": self.endpoint})
        return handled

    def _send(self, rows: list[tuple[int, str, str | None]]) -> int:
        """POST ``rows`` as one batch and delete what the collector acknowledged; how many that was."""
        references = self.outbox.references(sha for _, _, sha in rows if sha)
        body = (
            '{"device_id":' + json.dumps(self.outbox.device_id)
            + ',"windows":[' + ",".join(window for _, window, _ in rows) + "]"
            + ',"references":{' + ",".join(f"{json.dumps(sha)}:{ref}" for sha, ref in references.items()) + "}}"
        ).encode()
        ack = self._post(body)
        sent = {sequence for sequence, _, _ in rows}
        # Only what this batch carried and the collector says it stored: never a row it did not see.
        deleted = self.outbox.delete(sent.intersection(ack.stored))
        self.stats.uploaded += deleted
        self.stats.consecutive_failures = 0
        self.stats.last_success_at = time.time()
        self.stats.last_error = None
        return len(sent.intersection(ack.stored))

    def _post(self, body: bytes) -> UploadAck:
        request = urllib.request.Request(
            self.endpoint,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read(2048).decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            raise UploadRefused(error.code, str(detail)) from None
        try:
            return UploadAck.model_validate_json(answer)
        except ValueError:
            raise UploadRefused(200, "the collector's answer is not an UploadAck") from None


# --------------------------------------------------------------------------- the agent's telemetry


def read_device_token(path: Path) -> str:
    from device_agent.errors import UserError

    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UserError(
            f"cannot read device_token_file {path} ({exc.strerror}); save the token `edgekit fleet devices add NAME` printed there"
        ) from None
    if not token:
        raise UserError(f"device_token_file {path} is empty; save the token `edgekit fleet devices add NAME` printed there")
    return token


@dataclass
class _Served:
    monitor: DriftMonitor
    version: str


@dataclass
class Telemetry:
    """Monitors per served model, the outbox writer and the uploader; the agent's one handle on telemetry."""

    outbox: Outbox
    uploader: Uploader | None
    settings: MonitorSettings = field(default_factory=MonitorSettings)
    clock: Callable[[], float] = time.time
    _served: dict[str, _Served] = field(default_factory=dict)
    _writer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="edgekit-outbox"))

    def start(self) -> None:
        if self.uploader is not None:
            self.uploader.start()

    def monitor_for(self, name: str, version: str, reference: dict | None) -> DriftMonitor:
        """The monitor of this model version; a new version flushes the old one's open window first."""
        current = self._served.get(name)
        if current is not None and current.version == version:
            return current.monitor
        if current is not None and current.monitor.requests:
            self.submit(current.monitor, current.monitor.close())
        drift_reference = _parse_reference(reference, name, version)
        monitor = DriftMonitor(drift_reference, ModelRef(name=name, version=version), self.settings, clock=self.clock)
        self._served[name] = _Served(monitor, version)
        return monitor

    def submit(self, monitor: DriftMonitor, window: dict | None) -> None:
        """Write a closed window to the outbox in the writer thread (in order), then wake the uploader."""
        if window is None:
            return
        self._writer.submit(self._write, window, monitor.reference)

    def _write(self, window: dict, reference: DriftReference | None) -> None:
        try:
            summary = self.outbox.append(window, reference)
        except Exception:
            log.exception("could not write a telemetry window to the outbox")
            return
        if summary.alert:
            log.warning("drift alert: %s %s drifts on %s", summary.model.name if summary.model else "?",
                        summary.model.version if summary.model else "?", ", ".join(summary.top_features))
        if self.uploader is not None:
            self.uploader.wake()

    def tick(self) -> None:
        """Close the windows whose time is up (the agent calls this about once a second)."""
        for served in list(self._served.values()):
            self.submit(served.monitor, served.monitor.close_if_due())

    def flush(self) -> None:
        """Close every open window that saw requests and wait until the outbox holds them (shutdown)."""
        for served in list(self._served.values()):
            if served.monitor.requests:
                self.submit(served.monitor, served.monitor.close())
        self._writer.submit(lambda: None).result(timeout=30)

    def stop(self) -> None:
        self.flush()
        if self.uploader is not None:
            self.uploader.stop()
        self._writer.shutdown(wait=True)
        self.outbox.close()

    def metric_lines(self) -> list[str]:
        """``edgekit_drift_*`` gauges: last judged window's scores, drifting, alert, top features, outbox state."""
        from device_agent.metrics import metric_family, metric_labels

        psi_samples, js_samples, feature_drift, window_drift, alert, top = [], [], [], [], [], []
        for name, served in sorted(self._served.items()):
            monitor, model = served.monitor, {"model": name, "version": served.version}
            if monitor.reference is None:
                continue
            judged = monitor.last_judged
            window_drift.append((metric_labels(**model), int(bool(judged and judged["drifting"]))))
            alert.append((metric_labels(**model), int(monitor.alert_active)))
            if judged is None:
                continue
            for feature, score in sorted(judged["scores"].items()):
                psi_samples.append((metric_labels(**model, feature=feature), round(score.psi, 6)))
                js_samples.append((metric_labels(**model, feature=feature), round(score.js, 6)))
                feature_drift.append((metric_labels(**model, feature=feature), int(score.drifting)))
            top += [(metric_labels(**model, feature=f, rank=str(rank)), 1) for rank, f in enumerate(judged["top_features"], 1)]
        stats = self.outbox.stats()
        uploader = self.uploader.stats if self.uploader is not None else UploaderStats()
        lines: list[str] = []
        lines += metric_family("edgekit_drift_psi", "gauge", "PSI of each feature in the last judged window", psi_samples)
        lines += metric_family("edgekit_drift_js_distance", "gauge", "Jensen-Shannon distance (base 2) of each feature in the last judged window", js_samples)
        lines += metric_family("edgekit_drift_feature_drifting", "gauge", "1 when the feature passed its threshold in the last judged window", feature_drift)
        lines += metric_family("edgekit_drift_window_drifting", "gauge", "1 when the last judged window drifted", window_drift)
        lines += metric_family("edgekit_drift_alert", "gauge", "1 while k consecutive judged windows drift", alert)
        lines += metric_family("edgekit_drift_top_feature_info", "gauge", "The most drifting features of the last judged window, by rank", top)
        lines += metric_family("edgekit_drift_outbox_windows", "gauge", "Windows in the telemetry outbox, not yet acknowledged", [("", stats.rows)])
        lines += metric_family("edgekit_drift_outbox_bytes", "gauge", "Bytes of the windows in the telemetry outbox", [("", stats.bytes)])
        lines += metric_family("edgekit_drift_outbox_evicted_total", "counter", "Windows evicted unsent because the outbox was full", [("", stats.evicted_total)])
        lines += metric_family("edgekit_drift_outbox_rejected_total", "counter",
                         "Windows the collector refused on their own (kept in the outbox's rejected table, not resent)",
                         [("", stats.rejected_total)])
        lines += metric_family("edgekit_drift_uploaded_total", "counter", "Windows the collector acknowledged (since the agent started)", [("", uploader.uploaded)])
        lines += metric_family("edgekit_drift_upload_failures_total", "counter", "Failed upload attempts (since the agent started)", [("", uploader.failures)])
        return lines


def _parse_reference(reference: dict | None, name: str, version: str) -> DriftReference | None:
    if reference is None:
        return None
    try:
        return DriftReference.model_validate(reference)
    except ValueError as error:
        # The bundle is signed, so this is a build from another edgekit version: serve, but without drift scores.
        log.warning("%s %s carries a drift reference this agent cannot read (%s); windows carry no drift scores", name, version, error)
        return None

