"""The fleet review's numbers on hand-made windows, fleet-wide drift from summed counts, and the report/alerts CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from device_agent.telemetry_schema import UploadBatch, reference_sha256
from edgekit.cli import app
from edgekit.fleet.report import AlertThresholds, alerts, build_report, parse_since
from edgekit.fleet.store import FleetError, Store
from tests.fleet.conftest import make_reference, make_window

runner = CliRunner()
T0 = 1_700_000_000.0
REFERENCE = make_reference(features=2, bins=20)
DIGEST = reference_sha256(REFERENCE)
UNIFORM = [10] * 21
SPIKE = [210] + [0] * 20
OK_SCORES = {"f0": {"psi": 0.01, "js": 0.01, "drifting": False}}
DRIFT_SCORES = {"f0": {"psi": 0.9, "js": 0.4, "drifting": True}, "f1": {"psi": 0.5, "js": 0.2, "drifting": True}}


def _w(sequence: int, **fields):  # type: ignore[no-untyped-def]
    return make_window(sequence, reference_sha256=DIGEST, **fields)


def _fill(store: Store) -> None:
    """dev-a: drifts into an alert; dev-b: healthy on another version; dev-c: registered, silent."""
    for name in ("dev-a", "dev-b", "dev-c"):
        store.add_device(name)
    hist_a = {"f0": SPIKE, "f1": UNIFORM}
    dev_a = [
        _w(0, requests=100, errors=1, latency={"p95_ms": 10.0}, scores=OK_SCORES, histograms=hist_a),
        _w(1, requests=200, errors=3, latency={"p95_ms": 30.0}, scores=DRIFT_SCORES, drifting=True, histograms=hist_a),
        _w(2, requests=100, errors=0, latency={"p95_ms": 20.0}, scores=DRIFT_SCORES, drifting=True, alert=True,
           top_features=["f0", "f1"], histograms=hist_a),
        # too small to judge: it neither breaks nor extends the alert run
        _w(3, requests=100, errors=1, latency={"p95_ms": 15.0}, histograms=hist_a),
        _w(4, requests=100, errors=0, latency={"p95_ms": 12.0}, scores=DRIFT_SCORES, drifting=True, alert=True,
           top_features=["f0"], evicted_total=3, histograms=hist_a),
        # sequence 5 never arrived
        _w(6, requests=100, errors=0, latency={"p95_ms": 11.0}, scores=DRIFT_SCORES, drifting=True, alert=True,
           top_features=["f0"], evicted_total=5, histograms=hist_a),
    ]
    store.ingest(UploadBatch(device_id="dev-a", windows=dev_a, references={DIGEST: REFERENCE}), received_at=T0 + 1000)
    dev_b = [_w(s, requests=50, errors=0, latency={"p95_ms": 4.0}, scores=OK_SCORES, histograms={"f0": UNIFORM, "f1": UNIFORM})
             for s in range(3)]
    store.ingest(UploadBatch(device_id="dev-b", windows=dev_b), received_at=T0 + 2000)


@pytest.fixture
def filled(store: Store) -> Store:
    _fill(store)
    return store


def test_per_device_numbers_on_hand_made_windows(filled: Store):
    report = build_report(filled, now=T0 + 3000)
    a, b, c = report.devices
    assert (a.device_id, a.model_name, a.model_version, a.windows) == ("dev-a", "clf", "1.0.0", 6)
    assert (a.requests, a.errors) == (700, 5)
    assert a.error_rate == pytest.approx(5 / 700)
    assert a.p95_ms == 30.0 and a.p95_ms_latest == 11.0
    assert a.status == "alert"
    assert a.status_since == make_window(2).started_at, "the alert run began at window 2 (window 3 was not judged)"
    assert a.top_features == ["f0"]
    assert (a.evicted_total, a.sequence_gaps, a.last_seen, a.last_window_end) == (5, 1, T0 + 1000, make_window(6).ended_at)
    assert (b.status, b.status_since, b.requests, b.error_rate, b.p95_ms, b.sequence_gaps) == ("ok", None, 150, 0.0, 4.0, 0)
    assert (c.status, c.requests, c.error_rate, c.p95_ms, c.last_seen) == ("unknown", 0, None, None, None)


def test_a_drifting_run_without_an_alert_starts_at_its_first_drifting_window(store: Store):
    store.add_device("dev-d")
    windows = [_w(0, scores=DRIFT_SCORES, drifting=True), _w(1, scores=OK_SCORES),
               _w(2, scores=DRIFT_SCORES, drifting=True), _w(3, scores=DRIFT_SCORES, drifting=True)]
    store.ingest(UploadBatch(device_id="dev-d", windows=windows))
    (device,) = build_report(store).devices
    assert (device.status, device.status_since) == ("drifting", windows[2].started_at)
    assert device.top_features == ["f0", "f1"], "ordered by PSI when the device sent no top features"


def _psi(reference: list[float], counts: list[int]) -> float:
    total = sum(counts)
    return sum((max(c / total, 1e-4) - max(p, 1e-4)) * math.log(max(c / total, 1e-4) / max(p, 1e-4)) for p, c in zip(reference, counts))


def test_fleet_wide_drift_is_scored_on_summed_counts(filled: Store):
    report = build_report(filled)
    (entry,) = report.fleet_drift
    assert (entry.model_name, entry.model_version, entry.devices, entry.windows, entry.requests) == ("clf", "1.0.0", 2, 9, 850)
    summed_f0 = [6 * s + 3 * u for s, u in zip(SPIKE, UNIFORM)]
    assert entry.scores["f0"].psi == pytest.approx(_psi(REFERENCE.features["f0"].proportions, summed_f0), rel=1e-9)
    assert entry.scores["f1"].psi == pytest.approx(0.0, abs=1e-12)
    assert entry.drifting and entry.top_features == ["f0"]
    mean_of_device_psis = (_psi(REFERENCE.features["f0"].proportions, SPIKE) + 0.0) / 2
    assert entry.scores["f0"].psi != pytest.approx(mean_of_device_psis), "summing counts is not averaging scores"


def test_since_keeps_only_the_windows_that_ended_after_it(filled: Store):
    report = build_report(filled, since=make_window(4).ended_at)
    a = report.devices[0]
    assert (a.windows, a.requests) == (2, 200)


def test_alerts_name_the_devices_past_thresholds(filled: Store):
    report = build_report(filled, now=T0 + 3000)
    found = {alert.subject: alert.reasons for alert in alerts(report, AlertThresholds())}
    assert set(found) == {"dev-a", "fleet:clf@1.0.0"}
    assert "drift alert since" in found["dev-a"][0] and "f0" in found["dev-a"][0]
    strict = {a.subject: a.reasons for a in alerts(report, AlertThresholds(max_error_rate=0.001, max_p95_ms=3.0, max_evictions=4,
                                                                           stale_after_s=1500, fleet_drift=False))}
    assert set(strict) == {"dev-a", "dev-b", "dev-c"}
    assert len(strict["dev-a"]) == 5 and any("evicted 5" in r for r in strict["dev-a"])
    assert strict["dev-c"] == ["not seen since never"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30m", 10_000 - 1800), ("2h", 10_000 - 7200), ("1d", 10_000 - 86400), ("1700000000", 1_700_000_000.0),
     ("2023-11-14T22:13:20+00:00", 1_700_000_000.0)],
)
def test_since_accepts_durations_dates_and_unix_seconds(text: str, expected: float):
    assert parse_since(text, now=10_000) == pytest.approx(expected)


def test_a_bad_since_says_what_is_accepted():
    with pytest.raises(FleetError, match="30m, 24h, 7d"):
        parse_since("yesterday")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def sqlite_filled(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(url)
    _fill(store)
    store.close()
    return url


def test_report_json_and_table(sqlite_filled: str):
    result = runner.invoke(app, ["fleet", "report", "--db", sqlite_filled, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [d["device_id"] for d in document["devices"]] == ["dev-a", "dev-b", "dev-c"]
    assert document["devices"][0]["status"] == "alert" and document["fleet_drift"][0]["drifting"] is True
    table = runner.invoke(app, ["fleet", "report", "--db", sqlite_filled, "--device", "dev-a"])
    assert table.exit_code == 0 and "dev-a" in table.stdout and "alert" in table.stdout and "dev-b" not in table.stdout


def test_alerts_exit_1_when_any_device_is_past_a_threshold_and_0_when_none(sqlite_filled: str, tmp_path):
    result = runner.invoke(app, ["fleet", "alerts", "--db", sqlite_filled])
    assert result.exit_code == 1
    assert result.stdout.startswith("dev-a: drift alert since") and "fleet:clf@1.0.0" in result.stdout
    calm = f"sqlite:///{tmp_path / 'calm.db'}"
    store = Store.open(calm)
    store.add_device("dev-b")
    store.ingest(UploadBatch(device_id="dev-b", windows=[_w(0, scores=OK_SCORES)]))
    store.close()
    result = runner.invoke(app, ["fleet", "alerts", "--db", calm])
    assert (result.exit_code, result.stdout.strip()) == (0, "no alerts")
    assert runner.invoke(app, ["fleet", "alerts", "--db", calm, "--max-p95-ms", "1"]).exit_code == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fleet", "report", "--db", "sqlite:///{tmp}/absent.db"], "no fleet database at"),
        (["fleet", "report", "--db", "{db}", "--device", "ghost"], "unknown device 'ghost'; known: dev-a, dev-b, dev-c"),
        (["fleet", "report", "--db", "{db}", "--since", "last tuesday"], "--since 'last tuesday' is not a time"),
        (["fleet", "alerts", "--db", "{db}", "--stale-after", "soon"], "--stale-after 'soon' is not a duration"),
        (["fleet", "report", "--db", "postgres ql://x"], "is not a database URL"),
        (["fleet", "devices", "add", "dev-a", "--db", "{db}"], "already registered"),
        (["fleet", "devices", "rotate-token", "ghost", "--db", "{db}"], "unknown device 'ghost'"),
        (["fleet", "devices", "remove", "ghost", "--db", "{db}"], "unknown device 'ghost'"),
        (["fleet", "deploy", "{tmp}/x.ekb", "--db", "{db}"], "exactly one of --all, --devices a,b or --group G"),
        (["fleet", "deploy", "{tmp}/x.ekb", "--db", "{db}", "--all"], "is not an edgekit bundle"),
        (["fleet", "deploy", "{tmp}/x.ekb", "--db", "{db}", "--all", "--gate", "latency<=3"], "unknown gate 'latency'"),
        (["fleet", "rollout", "show", "99", "--db", "{db}"], "no rollout 99"),
        (["fleet", "rollout", "abort", "99", "--db", "{db}"], "no rollout 99"),
        (["fleet", "export-samples", "--device", "dev-b", "--out", "{tmp}/x.jsonl", "--db", "{db}"], "no captured samples"),
    ],
)
def test_user_errors_are_one_line_with_the_fix_and_exit_2(sqlite_filled: str, tmp_path, args: list[str], expected: str):
    argv = [a.format(db=sqlite_filled, tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, "-m", "edgekit", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_fleet_help_teaches_the_workflow():
    result = runner.invoke(app, ["fleet", "--help"])
    assert result.exit_code == 0
    for word in ("serve", "devices", "report", "alerts", "export-samples", "--device-token-file", "deploy", "rollouts"):
        assert word in result.stdout
