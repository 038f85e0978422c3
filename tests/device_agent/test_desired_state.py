"""The desired-state puller against a real HTTP collector on loopback, real signed bundles and a real repository."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.desired_schema import MAX_OUTCOMES, MAX_REASON_CHARS, DeviceReport, InstallOutcome
from device_agent.desired_state import MAX_REPORT_BODY_BYTES, CollectorError, DesiredStatePuller, PullerMemory
from device_agent.errors import UserError
from device_agent.host import probe_host
from device_agent.repository import Repository
from tests.support.bundles import write_tiny_bundle
from tests.support.network import free_port

DEVICE = "jetson-01"
TOKEN = "device-token-0123456789abcdef"
MODEL = "tiny-classifier"


# --------------------------------------------------------------------------- a stand-in collector


@dataclass
class Bundle:
    path: Path
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def desired(self, version: str, *, sha256: str | None = None, size: int | None = None, name: str = MODEL) -> dict:
        return {"name": name, "version": version, "sha256": sha256 or self.sha256, "size": size or len(self.data)}


@dataclass
class Collector:
    """The three endpoints of the desired-state contract, served from dicts; records every request it sees."""

    port: int = 0
    desired: list[dict] = field(default_factory=list)
    bundles: dict[str, bytes] = field(default_factory=dict)  # by the sha256 the desired state names
    cut_first_download_after: int | None = None  # close the connection after this many bytes, once
    ignore_range: bool = False  # answer a Range request with the whole bundle (200)
    status: int | None = None  # answer every request with this status instead
    report_status: list[int] = field(default_factory=list)  # the next reports' statuses, then 200
    max_report_bytes: int | None = None  # answer a longer report with 413, as the real collector does
    before_first_bundle: Callable[[], None] | None = None  # called once, before the first bundle's bytes are sent
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    reports: list[DeviceReport] = field(default_factory=list)
    report_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bundle_requests(self) -> list[dict[str, str]]:
        return [headers for method, path, headers in self.requests if path.startswith("/v1/bundles/")]


def _handler(collector: Collector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
            if self._refused():
                return
            if self.path == f"/v1/devices/{DEVICE}/desired":
                return self._json(200, {"device_id": DEVICE, "models": collector.desired})
            sha = self.path.removeprefix("/v1/bundles/")
            if sha not in collector.bundles or sha not in {m["sha256"] for m in collector.desired}:
                return self._json(404, {"error": f"no bundle {sha} for this device"})
            self._bundle(collector.bundles[sha])

        def do_POST(self) -> None:  # noqa: N802
            if self._refused():
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if collector.max_report_bytes is not None and len(body) > collector.max_report_bytes:
                return self._json(413, {"error": "MAX_REPORT_BYTES: send fewer outcomes"})
            report = DeviceReport.model_validate_json(body)
            status = collector.report_status.pop(0) if collector.report_status else 200
            if status != 200:
                return self._json(status, {"error": "try later"})
            collector.reports.append(report)
            collector.report_sizes.append(len(body))
            self._json(200, {"recorded": len(report.outcomes)})

        def _refused(self) -> bool:
            collector.requests.append((self.command, self.path, dict(self.headers)))
            if collector.status is not None:
                self._json(collector.status, {"error": "scripted failure"})
                return True
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._json(401, {"error": "unknown device token"})
                return True
            return False

        def _bundle(self, data: bytes) -> None:
            hook, collector.before_first_bundle = collector.before_first_bundle, None
            if hook is not None:
                hook()
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(match.group(1)) if match and not collector.ignore_range else 0
            if start >= len(data):
                return self._json(416, {"error": "range not satisfiable"})
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            cut, collector.cut_first_download_after = collector.cut_first_download_after, None
            self.wfile.write(data[start:] if cut is None else data[start:start + cut])
            if cut is not None:
                self.close_connection = True  # the client sees the connection end short of Content-Length

        def _json(self, status: int, document: dict) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def host():
    return probe_host()


@pytest.fixture
def repository(tmp_path: Path, keyring, host) -> Repository:
    repo = Repository(tmp_path / "state", keyring, host=host)
    repo.start()
    return repo


@pytest.fixture
def collector():
    running = Collector()
    yield running
    running.stop()


@pytest.fixture
def bundle(tmp_path: Path, signing_key: Ed25519PrivateKey):
    """The tiny classifier at a version, signed by the trusted key (written once per version)."""
    def make(version: str, key: Ed25519PrivateKey = signing_key) -> Bundle:
        path = tmp_path / "bundles" / f"{version}-{id(key)}.ekb"
        if not path.exists():
            write_tiny_bundle(path, key, version=version)
        return Bundle(path, path.read_bytes())
    return make


def _puller(repository: Repository, collector: Collector, **options: object) -> tuple[DesiredStatePuller, list[str]]:
    changed: list[str] = []
    options = {"poll_seconds": 0.05, "timeout_s": 5.0, "on_change": changed.append, **options}
    return DesiredStatePuller(repository, collector.url, DEVICE, TOKEN, **options), changed  # type: ignore[arg-type]


def _offer(collector: Collector, bundle: Bundle, version: str, **desired: object) -> dict:
    model = bundle.desired(version, **desired)  # type: ignore[arg-type]
    collector.desired = [model]
    collector.bundles[model["sha256"]] = bundle.data
    return model


class _Clock:
    """A clock the test moves by hand: the puller's per-bundle backoff reads it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _serving(repository: Repository) -> str:
    return repository.served(MODEL).version


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --------------------------------------------------------------------------- installs


def test_a_new_desired_version_is_downloaded_verified_installed_and_reported(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0")
    puller, changed = _puller(repository, collector)

    result = puller.poll_once()

    assert _serving(repository) == "1.0.0" and changed == [MODEL]
    assert [(o.model, o.version, o.sha256, o.outcome) for o in result.outcomes] == [(MODEL, "1.0.0", one.sha256, "installed")]
    (report,) = collector.reports
    assert report.serving == {MODEL: "1.0.0"} and [o.outcome for o in report.outcomes] == ["installed"]
    assert result.acknowledged == 1 and puller.memory.pending == []
    assert list(puller.downloads_dir.iterdir()) == [], "the downloaded bundle is deleted once installed"
    assert [h.get("Authorization") for h in collector.bundle_requests()] == [f"Bearer {TOKEN}"]

    # In sync: the next poll downloads nothing and still reports what serves, once.
    again = puller.poll_once()
    assert again.outcomes == [] and len(collector.bundle_requests()) == 1
    assert len(collector.reports) == 2 and collector.reports[1].serving == {MODEL: "1.0.0"} and collector.reports[1].outcomes == []
    assert 'edgekit_desired_installs_total{outcome="installed"} 1' in puller.metric_lines()


def test_a_cut_download_resumes_with_range_and_is_verified(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0")
    collector.cut_first_download_after = len(one.data) // 2
    puller, _ = _puller(repository, collector)

    result = puller.poll_once()

    assert [o.outcome for o in result.outcomes] == ["installed"] and _serving(repository) == "1.0.0"
    first, second = collector.bundle_requests()
    assert "Range" not in first and second["Range"] == f"bytes={len(one.data) // 2}-"


def test_a_part_left_by_an_earlier_run_resumes_after_a_restart(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0")
    puller, _ = _puller(repository, collector)
    (puller.downloads_dir / f"{one.sha256}.part").write_bytes(one.data[:1000])

    assert [o.outcome for o in puller.poll_once().outcomes] == ["installed"]
    assert [h.get("Range") for h in collector.bundle_requests()] == ["bytes=1000-"]


def test_a_whole_answer_to_a_range_request_starts_the_file_over(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0")
    collector.ignore_range = True
    puller, _ = _puller(repository, collector)
    (puller.downloads_dir / f"{one.sha256}.part").write_bytes(b"not the bundle's first bytes")

    assert [o.outcome for o in puller.poll_once().outcomes] == ["installed"] and _serving(repository) == "1.0.0"


def test_a_complete_part_is_checked_without_a_download(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0")
    puller, _ = _puller(repository, collector)
    (puller.downloads_dir / f"{one.sha256}.part").write_bytes(one.data)

    assert [o.outcome for o in puller.poll_once().outcomes] == ["installed"]
    assert collector.bundle_requests() == []


# --------------------------------------------------------------------------- failures and refusals


def test_a_bundle_that_does_not_match_its_sha256_fails_and_is_not_installed(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0", sha256="ab" * 32)  # the collector serves the bundle under a sha it does not have
    clock = _Clock()
    puller, changed = _puller(repository, collector, clock=clock)

    (outcome,) = puller.poll_once().outcomes

    assert outcome.outcome == "failed" and "does not match the desired state" in outcome.reason
    assert repository.model_names() == [] and changed == []
    assert list(puller.downloads_dir.iterdir()) == [], "the mismatching file is deleted"
    assert collector.reports[0].outcomes == [outcome]
    clock.advance(puller.poll_seconds)
    puller.poll_once()  # a failure may pass: the next try, after the first backoff of one poll, downloads again
    assert len(collector.bundle_requests()) == 2


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   UserError("the runtime could not load the model")], ids=["disk-full", "user-error"])
def test_a_failed_install_keeps_the_verified_bundle_and_installs_it_next_time_without_a_download(
        repository, collector, bundle, monkeypatch, error):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0")
    install, failures = repository.install, [error]

    def install_failing_once(path: Path, **options: object):
        if failures:
            raise failures.pop()
        return install(path, **options)

    monkeypatch.setattr(repository, "install", install_failing_once)
    clock = _Clock()
    puller, _ = _puller(repository, collector, clock=clock)
    part = puller.downloads_dir / f"{one.sha256}.part"

    (outcome,) = puller.poll_once().outcomes

    assert outcome.outcome == "failed" and str(error) in outcome.reason and repository.model_names() == []
    assert part.read_bytes() == one.data, "the complete, verified bundle is kept"
    clock.advance(puller.poll_seconds)
    assert [o.outcome for o in puller.poll_once().outcomes] == ["installed"] and _serving(repository) == "1.0.0"
    assert len(collector.bundle_requests()) == 1, "installed from the kept file, not downloaded again"
    assert not part.exists(), "deleted once installed"


def test_a_persistent_failure_is_reported_once_per_reason_and_tried_again_with_backoff(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0", sha256="ab" * 32)  # the same mismatch at every try
    clock = _Clock()
    puller, _ = _puller(repository, collector, clock=clock, poll_seconds=10.0, backoff_max_s=25.0)

    tries, start = [], clock.now
    # Tries at 0, 10 (+10), 30 (+20), 55 (+min(25, 40)); the polls before each find it backing off.
    for at in (0, 5, 9, 10, 29, 30, 54, 55):
        clock.now = start + at
        puller.poll_once()
        tries.append(len(collector.bundle_requests()))
    assert tries == [1, 1, 1, 2, 2, 3, 3, 4]
    reported = [outcome for report in collector.reports for outcome in report.outcomes]
    assert [outcome.outcome for outcome in reported] == ["failed"], "the same failure is reported once"
    assert puller.memory.pending == [] and 'edgekit_desired_installs_total{outcome="failed"} 1' in puller.metric_lines()

    del collector.bundles["ab" * 32]  # now it fails otherwise: that is news
    clock.advance(25)
    (outcome,) = puller.poll_once().outcomes
    assert outcome.outcome == "failed" and "HTTP 404" in outcome.reason and len(collector.bundle_requests()) == 5

    # Another desired sha256 is tried at once; back to the first one, its backoff and last reason are forgotten.
    first = collector.desired
    _offer(collector, one, "1.0.0", sha256="cd" * 32)
    assert [o.outcome for o in puller.poll_once().outcomes] == ["failed"] and len(collector.bundle_requests()) == 6
    collector.desired = first
    (again,) = puller.poll_once().outcomes
    assert again.reason == outcome.reason and len(collector.bundle_requests()) == 7


@pytest.mark.parametrize("moved_on", ["to-another-version", "to-nothing"])
def test_a_bundle_no_longer_desired_when_its_download_ends_is_not_installed(repository, collector, bundle, moved_on):
    one, two = bundle("1.0.0"), bundle("2.0.0")
    _offer(collector, one, "1.0.0")
    later = [two.desired("2.0.0")] if moved_on == "to-another-version" else []
    collector.bundles[two.sha256] = two.data
    collector.before_first_bundle = lambda: setattr(collector, "desired", later)  # the rollout moves on meanwhile
    puller, changed = _puller(repository, collector)

    result = puller.poll_once()

    assert result.outcomes == [] and collector.reports[0].outcomes == []
    assert repository.model_names() == [] and changed == []
    assert list(puller.downloads_dir.iterdir()) == [], "the part of a bundle no longer desired is dropped"
    outcomes = puller.poll_once().outcomes
    assert [(o.version, o.outcome) for o in outcomes] == ([("2.0.0", "installed")] if later else [])


def test_a_downloaded_bundle_waits_while_the_collector_cannot_confirm_it_is_still_desired(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0")
    collector.before_first_bundle = lambda: setattr(collector, "status", 503)  # down once the bytes are on their way
    puller, changed = _puller(repository, collector)

    with pytest.raises(CollectorError, match="503"):
        puller.poll_once()  # the report cannot go either

    assert repository.model_names() == [] and changed == [] and puller.memory.pending == []
    assert (puller.downloads_dir / f"{one.sha256}.part").read_bytes() == one.data, "the verified bundle is kept"
    collector.status = None
    assert [o.outcome for o in puller.poll_once().outcomes] == ["installed"] and _serving(repository) == "1.0.0"
    assert len(collector.bundle_requests()) == 1


def test_more_bytes_than_the_desired_state_announces_are_discarded(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0", size=len(one.data) - 10)
    puller, _ = _puller(repository, collector)

    (outcome,) = puller.poll_once().outcomes

    assert outcome.outcome == "failed" and "more than" in outcome.reason
    assert repository.model_names() == [] and list(puller.downloads_dir.iterdir()) == []


def test_an_untrusted_signature_is_refused_once_and_never_downloaded_again(repository, collector, bundle):
    untrusted = bundle("1.0.0", Ed25519PrivateKey.generate())
    _offer(collector, untrusted, "1.0.0")
    puller, changed = _puller(repository, collector)

    (outcome,) = puller.poll_once().outcomes

    assert (outcome.outcome, outcome.check) == ("refused", "untrusted-key") and "untrusted-key" in outcome.reason
    assert repository.model_names() == [] and changed == []
    assert list(puller.downloads_dir.iterdir()) == [], "a refused bundle is deleted"
    assert puller.poll_once().outcomes == [] and len(collector.bundle_requests()) == 1
    restarted, _ = _puller(repository, collector)
    assert restarted.poll_once().outcomes == [] and len(collector.bundle_requests()) == 1, "the refusal survives a restart"


def test_a_desired_lower_version_still_held_is_activated_without_a_download(repository, collector, bundle):
    old, new = bundle("1.0.0"), bundle("2.0.0")
    repository.install(old.path)
    repository.install(new.path)
    collector.desired = [old.desired("1.0.0")]  # the collector does not even offer the bytes
    puller, changed = _puller(repository, collector)

    (outcome,) = puller.poll_once().outcomes

    assert (outcome.outcome, outcome.version) == ("rolled_back", "1.0.0") and _serving(repository) == "1.0.0"
    assert collector.bundle_requests() == [] and changed == [MODEL]
    assert collector.reports[0].serving == {MODEL: "1.0.0"}


def test_a_bundle_named_otherwise_than_the_desired_state_is_refused(repository, collector, bundle):
    one = bundle("1.0.0")
    _offer(collector, one, "1.0.0", name="another-model")
    puller, _ = _puller(repository, collector)

    (outcome,) = puller.poll_once().outcomes

    assert (outcome.outcome, outcome.check) == ("refused", "desired-state") and "tiny-classifier 1.0.0" in outcome.reason
    assert repository.model_names() == []


# --------------------------------------------------------------------------- the collector's troubles


def test_outcomes_outlive_a_collector_outage_and_a_restart(repository, bundle, tmp_path):
    port = free_port()
    collector = Collector(port=port, report_status=[503])
    _offer(collector, bundle("1.0.0"), "1.0.0")
    first, _ = _puller(repository, collector)
    with pytest.raises(CollectorError, match="503"):
        first.poll_once()  # installed, but the report failed: the outcome waits on disk
    assert _serving(repository) == "1.0.0" and [o.outcome for o in first.memory.pending] == ["installed"]
    desired = collector.desired
    collector.stop()

    restarted, _ = _puller(repository, collector, backoff_max_s=0.2)
    with pytest.raises(CollectorError, match="cannot reach the collector"):
        restarted.poll_once()
    restarted.start()  # the collector is down: the thread backs off and retries; nothing crashes
    try:
        _wait(lambda: restarted.stats.failures >= 2)
        back = Collector(port=port, desired=desired)
        try:
            _wait(lambda: back.reports)
            assert [(o.version, o.outcome) for o in back.reports[0].outcomes] == [("1.0.0", "installed")]
            assert back.reports[0].serving == {MODEL: "1.0.0"}
            _wait(lambda: restarted.memory.pending == [])
        finally:
            back.stop()
    finally:
        restarted.stop()
    assert not restarted._thread.is_alive()


def test_a_refused_token_is_logged_with_the_fix_and_the_puller_keeps_going(repository, collector, caplog):
    puller = DesiredStatePuller(repository, collector.url, DEVICE, "wrong-token", poll_seconds=0.05, backoff_max_s=0.05)
    with pytest.raises(CollectorError, match="401"):
        puller.poll_once()
    with caplog.at_level(logging.ERROR, logger="edgekit.agent.desired"):
        puller.start()
        try:
            _wait(lambda: puller.stats.failures >= 2)
            assert puller._thread.is_alive()
        finally:
            puller.stop()
    assert any("edgekit fleet devices add jetson-01" in record.getMessage() for record in caplog.records)


def test_a_report_over_the_collectors_limit_sends_the_oldest_outcomes_that_fit_and_the_rest_next_time(repository, collector):
    from edgekit.fleet.collector import MAX_REPORT_BYTES

    assert MAX_REPORT_BODY_BYTES < MAX_REPORT_BYTES
    collector.max_report_bytes = MAX_REPORT_BYTES
    puller, _ = _puller(repository, collector)
    outcomes = [InstallOutcome(model=MODEL, version="1.0.0", sha256=f"{at:064x}", outcome="failed",
                               reason="\U0001d11e" * MAX_REASON_CHARS, at=float(at))  # 4 bytes a character
                for at in range(1, MAX_OUTCOMES + 1)]
    for outcome in outcomes:
        puller.memory.record(outcome)

    acknowledged = [puller.poll_once().acknowledged for _ in range(3)]

    assert sum(acknowledged) == MAX_OUTCOMES and puller.memory.pending == []
    assert acknowledged[0] == acknowledged[1] > 1 and all(size <= MAX_REPORT_BODY_BYTES for size in collector.report_sizes)
    assert [outcome for report in collector.reports for outcome in report.outcomes] == outcomes, "oldest first"
    one_more = DeviceReport(device_id=DEVICE, outcomes=outcomes[:acknowledged[0] + 1]).model_dump_json().encode()
    assert len(one_more) > MAX_REPORT_BODY_BYTES, "each report carries as many as fit"


def test_pending_outcomes_are_bounded_and_the_oldest_go(tmp_path, caplog):
    memory = PullerMemory(tmp_path / "state.json", ["key"])
    outcomes = [InstallOutcome(model=MODEL, version="1.0.0", sha256="ab" * 32, outcome="failed", at=float(at))
                for at in range(MAX_OUTCOMES + 3)]
    with caplog.at_level(logging.WARNING, logger="edgekit.agent.desired"):
        for outcome in outcomes:
            memory.record(outcome)
    assert memory.pending == outcomes[3:] and "dropped" in caplog.text
    assert PullerMemory(tmp_path / "state.json", ["key"]).pending == outcomes[3:], "kept on disk"


def test_an_unreadable_state_file_is_logged_and_started_afresh(tmp_path, caplog):
    (tmp_path / "state.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="edgekit.agent.desired"):
        memory = PullerMemory(tmp_path / "state.json", ["key"])
    assert memory.pending == [] and memory.refused == {} and "cannot read" in caplog.text


def test_refusals_are_forgotten_when_the_keyring_changes(tmp_path):
    memory = PullerMemory(tmp_path / "state.json", ["old-key"])
    memory.refuse("ab" * 32, "untrusted-key")
    assert PullerMemory(tmp_path / "state.json", ["old-key"]).refused == {"ab" * 32: "untrusted-key"}
    assert PullerMemory(tmp_path / "state.json", ["old-key", "new-key"]).refused == {}


# --------------------------------------------------------------------------- in the agent


def test_the_agent_pulls_installs_and_counts_a_rollout(tmp_path, collector):
    from device_agent.keys import load_private_key
    from tests.support.agent import live_agent

    token_file = tmp_path / "device.token"
    token_file.write_text(TOKEN)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    with live_agent(workdir, telemetry_url=collector.url, device_id=DEVICE, device_token_file=token_file,
                    poll_seconds=0.1) as agent:
        path = agent.bundle("1.0.0")
        assert load_private_key(workdir / "keys" / "edgekit.key")  # the agent's keyring trusts this key
        _offer(collector, Bundle(path, path.read_bytes()), "1.0.0")
        _wait(lambda: httpx.get(f"{agent.url}/v2/models/{MODEL}/ready").status_code == 200)
        _wait(lambda: any(r.outcomes for r in collector.reports))
        metrics = httpx.get(f"{agent.url}/metrics").text
        assert 'edgekit_desired_installs_total{outcome="installed"} 1' in metrics
        assert re.search(r"^edgekit_desired_polls_total [1-9]", metrics, re.MULTILINE)
