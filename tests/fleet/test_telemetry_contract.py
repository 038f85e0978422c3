"""Hostile telemetry: what the contract refuses at the collector (422), and readers that survive what older
collectors stored anyway. Real collector on loopback, real SQLite and PostgreSQL, the real command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from device_agent.drift import CaptureSettings, DriftMonitor, MonitorSettings
from device_agent.telemetry_schema import (
    MAX_BINS,
    CapturedSample,
    ModelRef,
    UploadBatch,
    WindowSummary,
    escape_unprintable,
    reference_sha256,
)
from edgekit.cli import app
from edgekit.fleet.report import build_report
from edgekit.fleet.store import Store, drift_references, samples, windows
from tests.fleet.conftest import collector_in_thread, make_batch, make_reference, make_window, post

runner = CliRunner()
OPERATOR = "operator-token-0123456789abcdef"
REFERENCE = make_reference(features=2, bins=20)  # 21 counts per feature
DIGEST = reference_sha256(REFERENCE)
SPIKE = [210] + [0] * 20
NOW = time.time()


@pytest.fixture
def collector(store: Store):
    with collector_in_thread(store, operator_token=OPERATOR) as url:
        yield url


def _post_raw(url: str, token: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/telemetry", content=body, timeout=120,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def _body(batch: UploadBatch, mutate) -> bytes:  # type: ignore[no-untyped-def]
    document = batch.model_dump(mode="json")
    mutate(document)
    return json.dumps(document, allow_nan=True).encode()  # NaN and Infinity as JSON literals, as an attacker sends them


def _refused(response: httpx.Response, *expected: str) -> None:
    assert response.status_code == 422, response.text
    message = response.json()["error"]
    for part in expected:
        assert part in message, message


# --------------------------------------------------------------------------- the contract at the collector


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b: b["windows"][0]["latency"].update(p95_ms=math.nan), "windows.0.latency.p95_ms: Input should be a finite number"),
        (lambda b: b["windows"][0].update(ended_at=math.inf), "windows.0.ended_at: Input should be a finite number"),
        (lambda b: b["windows"][0].update(scores={"f0": {"psi": math.nan, "js": 0.1, "drifting": True}}), "windows.0.scores.f0.psi"),
        (lambda b: next(iter(b["references"].values()))["features"]["f0"]["thresholds"].update(psi=math.inf),
         "thresholds.psi: Input should be a finite number"),
        (lambda b: next(iter(b["references"].values()))["features"]["f0"]["edges"].__setitem__(0, -math.inf),
         "edges.0: Input should be a finite number"),
    ],
)
def test_nan_and_infinity_literals_get_422(store: Store, collector: str, mutate, expected: str):
    token = store.add_device("dev-1")
    _refused(_post_raw(collector, token, _body(make_batch("dev-1", [0], REFERENCE), mutate)), expected)
    assert store.count_windows() == 0


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"requests": 5, "errors": 6}, "errors (6) must be at most requests (5)"),
        ({"started_at": 1_700_000_100.0, "ended_at": 1_700_000_000.0}, "started_at (1700000100.0) must be at or before ended_at"),
        ({"started_at": 1e18, "ended_at": 1e18}, "windows.0.started_at: Input should be less than or equal to 4102444800"),
        ({"started_at": 1_500_000_000.0, "ended_at": 1_500_000_060.0},
         "windows.0.started_at (sequence 3): 1500000000.0 is outside [1577836800 (2020-01-01T00:00:00Z)"),
        ({"started_at": NOW + 2 * 86400, "ended_at": NOW + 2 * 86400 + 60}, "(the collector's clock + 1 day)]; set the device's clock"),
        ({"latency": {"p99_ms": 1e300}}, "windows.0.latency.p99_ms: Input should be less than or equal to 86400000"),
    ],
)
def test_a_window_that_contradicts_itself_or_the_clock_gets_422(store: Store, collector: str, fields: dict, expected: str):
    token = store.add_device("dev-1")
    body = make_batch("dev-1", [3]).model_dump(mode="json")
    body["windows"][0].update(fields)
    _refused(post(collector, token, body), expected)
    assert store.count_windows() == 0


@pytest.mark.parametrize("character", ["\u202e", "\u009b", "\u2066", "\u061c", "\u200f", "\x7f"])
@pytest.mark.parametrize(
    ("place", "expected"),
    [
        (lambda b, text: b["windows"][0].update(model={"name": f"clf{text}", "version": "1.0.0"}), "windows.0.model.name"),
        (lambda b, text: b["windows"][0].update(model={"name": "clf", "version": f"1{text}"}), "windows.0.model.version"),
        (lambda b, text: b["windows"][0].update(samples=[{"captured_at": 1.7e9, "text": "hi", "predicted": f"cat{text}"}]),
         "windows.0.samples.0.predicted"),
    ],
)
def test_names_with_control_or_bidi_characters_get_422(store: Store, collector: str, character: str, place, expected: str):
    token = store.add_device("dev-1")
    body = make_batch("dev-1", [0]).model_dump(mode="json")
    place(body, character)
    _refused(post(collector, token, body), expected)


def test_category_names_with_bidi_characters_and_proportions_that_do_not_sum_to_one_get_422(store: Store, collector: str):
    token = store.add_device("dev-1")
    categorical = {"kind": "categorical", "source": "output", "categories": ["yes", "no\u202e"], "proportions": [0.5, 0.5],
                   "thresholds": {"psi": 0.2, "js": 0.1}}
    body = make_batch("dev-1", [0], REFERENCE).model_dump(mode="json")
    next(iter(body["references"].values()))["features"]["output.predicted_class"] = categorical
    _refused(post(collector, token, body), "output.predicted_class.categories.1")
    body = make_batch("dev-1", [0], REFERENCE).model_dump(mode="json")
    next(iter(body["references"].values()))["features"]["f0"]["proportions"] = [1.0] * 21
    _refused(post(collector, token, body), "proportions sum to 21.0; they must sum to 1 (within 1e-06)")
    body = make_batch("dev-1", [0], REFERENCE).model_dump(mode="json")
    next(iter(body["references"].values()))["features"]["f0"]["proportions"][:2] = [-0.1, 0.1 + 2 / 21]
    _refused(post(collector, token, body), "f0.proportions.0: Input should be greater than or equal to 0")


def test_a_huge_histogram_is_refused_quickly(store: Store, collector: str):
    """3 million bins (6 MB, under MAX_BODY_BYTES; 10 million took 542 MB of the old collector's memory)."""
    token = store.add_device("dev-1")
    body = make_batch("dev-1", [0]).model_dump(mode="json")
    body["windows"][0]["histograms"] = {"f0": [0]}
    head, tail = json.dumps(body).encode().split(b'"f0": [0]')
    huge = head + b'"f0": [' + b"1," * 3_000_000 + b"1]" + tail
    started = time.perf_counter()
    response = _post_raw(collector, token, huge)
    _refused(response, f"windows.0.histograms.f0: List should have at most {MAX_BINS} items")
    assert time.perf_counter() - started < 10
    assert store.count_windows() == 0


def test_a_histogram_longer_than_max_bins_is_refused_by_the_schema_too(store: Store, collector: str):
    token = store.add_device("dev-1")
    body = make_batch("dev-1", [1]).model_dump(mode="json")
    body["windows"][0]["histograms"] = {"f0": [1] * (MAX_BINS + 1)}
    _refused(post(collector, token, body), f"windows.0.histograms.f0: List should have at most {MAX_BINS} items")
    body["windows"][0]["histograms"] = {f"f{i}": [1] for i in range(513)}
    _refused(post(collector, token, body), "windows.0.histograms: Dictionary should have at most 512 items")


@pytest.mark.parametrize("reference_sent", ["in the batch", "stored before"])
def test_a_histogram_must_have_its_references_bin_count_and_features(store: Store, collector: str, reference_sent: str):
    token = store.add_device("dev-1")
    if reference_sent == "stored before":
        assert post(collector, token, make_batch("dev-1", [0], REFERENCE)).status_code == 200
    references = {DIGEST: REFERENCE.model_dump(mode="json")} if reference_sent == "in the batch" else {}

    def batch(**fields) -> dict:  # type: ignore[no-untyped-def]
        window = make_window(5, reference_sha256=DIGEST).model_dump(mode="json") | fields
        return {"device_id": "dev-1", "windows": [window], "references": references}

    _refused(post(collector, token, batch(histograms={"f0": [1] * 12})),
             "windows.0.histograms.f0 (sequence 5): the window's reference", "has 21 bins for it, not 12: send exactly 21 counts")
    _refused(post(collector, token, batch(histograms={"f9": [1] * 21})), "windows.0.histograms.f9 (sequence 5)", "has no feature 'f9'; its features: f0, f1")
    _refused(post(collector, token, batch(scores={"f9": {"psi": 0.1, "js": 0.1, "drifting": False}})), "windows.0.scores.f9 (sequence 5)")
    assert post(collector, token, batch(histograms={"f0": SPIKE, "f1": SPIKE})).status_code == 200


def test_a_window_whose_reference_is_unknown_is_bounded_by_max_bins_only(store: Store, collector: str):
    token = store.add_device("dev-1")
    window = make_window(0, reference_sha256="ab" * 32, histograms={"anything": [1] * 12})
    assert post(collector, token, UploadBatch(device_id="dev-1", windows=[window])).status_code == 200


def test_the_device_monitor_never_produces_what_the_contract_refuses():
    """NaN or absurd latencies and a label with a bidi character still give a window the collector accepts."""
    clock = iter(np.arange(1.7e9, 1.8e9, 1.0).tolist())
    monitor = DriftMonitor(REFERENCE, ModelRef(name="clf", version="1.0.0"),
                           MonitorSettings(window_size=4, min_window_size=1, capture=CaptureSettings(every=1)),
                           clock=lambda: next(clock))
    assert monitor.add_sample(text="hello", predicted="cat\u202e")
    for latency in (math.nan, math.inf, 1e12):
        assert monitor.observe({"f0": np.array([0.5])}, 1, latency) is None
    window = monitor.observe({"f0": np.array([0.5])}, 1, 2.0)
    summary = WindowSummary(**window, sequence=0)
    assert summary.samples[0].predicted is None and summary.latency.p99_ms <= 86_400_000.0
    assert WindowSummary.model_validate_json(summary.model_dump_json()) == summary


# --------------------------------------------------------------------------- readers of what older collectors stored


def _row(device: str, sequence: int, **fields) -> dict:
    row = {
        "device_id": device, "sequence": sequence, "started_at": 1_700_000_000.0 + 60 * sequence,
        "ended_at": 1_700_000_060.0 + 60 * sequence, "model_name": "clf", "model_version": "1.0.0",
        "reference_sha256": DIGEST, "requests": 500, "errors": 0, "p50_ms": 2.0, "p95_ms": 5.0, "p99_ms": 8.0,
        "histograms": json.dumps({"f0": SPIKE, "f1": SPIKE}), "scores": "{}", "drifting": False, "alert": False,
        "top_features": "[]", "evicted_total": 0, "received_at": 1_700_100_000.0,
    }
    return row | fields


# What collectors before this contract let through, written as they stored it (NaN became null in the JSON columns).
BAD_ROWS = {
    # PostgreSQL keeps these NaNs; SQLite cannot hold one and stores NULL: a window without that percentile (readable).
    "nan p95": {"p95_ms": math.nan},
    "a NaN as text": {"p50_ms": "NaN"},
    "infinite p99": {"p99_ms": math.inf},
    "histograms that do not parse": {"histograms": '{"f0": [1, 2'},
    "null psi": {"scores": '{"f0": {"psi": null, "js": 0.1, "drifting": true}}'},
    "time at 1e18": {"started_at": 1e18, "ended_at": 1e18},
    "started after it ended": {"started_at": 1_800_000_000.0},
    "errors over requests": {"errors": 501},
}


def _insert_bad_rows(store: Store) -> int:
    """Rows written past the schema, as an older collector stored them; how many the readers must skip."""
    store.add_device("dev-bad")
    with store.engine.begin() as conn:
        for sequence, fields in enumerate(BAD_ROWS.values()):
            conn.execute(windows.insert().values(**_row("dev-bad", sequence, **fields)))
        # Readable: a histogram of the wrong length (left out of the fleet-wide sums) and names with bidi characters.
        conn.execute(windows.insert().values(**_row("dev-bad", 100, histograms=json.dumps({"f0": [1] * 12}))))
        conn.execute(windows.insert().values(**_row("dev-bad", 101, model_name="evil\u202egnp.exe", model_version="1\u009b2")))
    return len(BAD_ROWS) - (2 if store.engine.dialect.name == "sqlite" else 0)


@pytest.fixture
def damaged(store: Store) -> tuple[Store, int]:
    store.add_device("dev-good")
    store.ingest(UploadBatch(device_id="dev-good", windows=[make_window(0, reference_sha256=DIGEST, histograms={"f0": SPIKE})],
                             references={DIGEST: REFERENCE}))
    return store, _insert_bad_rows(store)


def test_the_report_skips_and_counts_rows_that_do_not_read_as_windows(damaged):
    store, bad = damaged
    report = build_report(store)
    assert report.skipped_windows == bad
    readable = {(w.device_id, w.sequence) for w in report.windows}
    assert {("dev-bad", 100), ("dev-bad", 101), ("dev-good", 0)} <= readable
    json.dumps(report.to_dict(), allow_nan=False)  # no NaN reaches a JSON answer
    assert report.to_dict()["skipped_windows"] == bad
    (versions,) = [entry for entry in report.fleet_drift if entry.model_name == "clf"]
    assert versions.scores and versions.drifting, "the histogram of the wrong length is left out; the others still count"


def test_the_collector_and_the_command_line_read_a_damaged_database(damaged, db_url: str, tmp_path):
    store, bad = damaged
    with collector_in_thread(store, operator_token=OPERATOR) as url:
        operator = {"Authorization": f"Bearer {OPERATOR}"}
        report = httpx.get(f"{url}/v1/report", headers=operator, timeout=60)
        assert report.status_code == 200 and report.json()["skipped_windows"] == bad
        listed = httpx.get(f"{url}/v1/devices/dev-bad/windows", headers=operator, timeout=60)
        assert listed.status_code == 200 and {w["sequence"] for w in listed.json()} >= {100, 101}
        assert httpx.get(f"{url}/v1/devices", headers=operator, timeout=60).status_code == 200
    as_json = runner.invoke(app, ["fleet", "report", "--db", db_url, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["skipped_windows"] == bad
    table = runner.invoke(app, ["fleet", "report", "--db", db_url, "--html", str(tmp_path / "fleet.html")])
    assert table.exit_code == 0, table.output
    assert f"warning: {bad} stored windows could not be read" in " ".join(table.stdout.split())
    html = (tmp_path / "fleet.html").read_text()
    assert f"{bad} stored windows could not be read" in html and "\u202e" not in html and "evil\\u202egnp.exe" in html
    found = runner.invoke(app, ["fleet", "alerts", "--db", db_url])
    assert found.exit_code == 1 and "fleet:clf@1.0.0" in found.stdout, found.output
    assert f"warning: {bad} stored windows could not be read" in found.stderr


def test_names_with_control_characters_in_the_database_are_printed_escaped(damaged, db_url: str):
    store, _ = damaged
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO devices (id, token_sha256, created_at) VALUES (:id, :h, 1.0)"),
                     {"id": "dev\u009b31m", "h": "1" * 64})
    outputs = {
        command: subprocess.run([sys.executable, "-m", "edgekit", "fleet", *command.split(), "--db", db_url],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
        for command in ("alerts", "report", "devices list")
    }
    assert "fleet:evil\\u202egnp.exe@1\\u009b2" in outputs["alerts"].stdout
    assert "evil\\u202egnp.exe 1\\u009b2" in outputs["report"].stdout
    assert "dev\\u009b31m" in outputs["report"].stdout and "dev\\u009b31m" in outputs["devices list"].stdout
    for command, result in outputs.items():
        assert result.returncode in (0, 1), (command, result.stderr)
        assert not any(character in result.stdout + result.stderr for character in ("\u202e", "\u009b")), command


def test_escape_unprintable_writes_each_refused_character_as_an_escape():
    assert escape_unprintable("a\u202eb\x1bc\u009bd\u2066é") == "a\\u202eb\\u001bc\\u009bd\\u2066é"


def test_unreadable_references_and_samples_are_skipped(damaged):
    store, _ = damaged
    with store.engine.begin() as conn:
        conn.execute(drift_references.insert().values(sha256="cd" * 32, document='{"format": 1, "features": NaN}', stored_at=1.0))
        conn.execute(samples.insert().values(device_id="dev-bad", sequence=0, position=0, captured_at=1.0,
                                             document='{"captured_at": NaN, "text": "x"}', predicted=None))
        conn.execute(samples.insert().values(device_id="dev-bad", sequence=0, position=1, captured_at=1.0,
                                             document='{"captured_at": 1.0, "text": "y"}', predicted=None))
    assert set(store.references()) == {DIGEST}
    found, skipped = store.fetch_samples("dev-bad")
    assert ([w.sample for w in found], skipped) == ([CapturedSample(captured_at=1.0, text="y")], 1)


# --------------------------------------------------------------------------- fleet alerts: exit 2 on its own failure


def _garbage(path) -> str:  # type: ignore[no-untyped-def]
    path.write_bytes(b"this is not a database" * 100)
    return f"sqlite:///{path}"


def _without_windows_table(path) -> str:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{path}"
    store = Store.open(url)
    store.add_device("dev-1")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE windows")
    store.close()
    return url


@pytest.mark.parametrize(
    ("make_db", "expected"),
    [
        (lambda path: f"sqlite:///{path}", "error: no fleet database at"),
        (_garbage, "error: cannot open the fleet database"),
        (_without_windows_table, "error: fleet alerts failed (OperationalError)"),
    ],
    ids=["missing", "not a database", "a table dropped"],
)
def test_fleet_alerts_exits_2_with_one_error_line_when_its_database_is_missing_or_broken(tmp_path, make_db, expected: str):
    url = make_db(tmp_path / "fleet.db")
    result = subprocess.run([sys.executable, "-m", "edgekit", "fleet", "alerts", "--db", url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_fleet_alerts_help_states_its_exit_codes():
    result = runner.invoke(app, ["fleet", "alerts", "--help"])
    assert result.exit_code == 0
    assert "0 no alerts, 1 alerts found, 2 the check itself failed" in " ".join(result.stdout.split())
