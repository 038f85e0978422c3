"""The collector over HTTP on loopback, on real SQLite and PostgreSQL: ingest, tokens, queries, two processes racing."""

from __future__ import annotations

import threading

import httpx
import pytest

from device_agent.telemetry_schema import UploadAck, reference_sha256
from edgekit.fleet.store import Store
from tests.fleet.conftest import (
    collector_in_thread,
    collector_process,
    make_batch,
    make_reference,
    post,
)

OPERATOR = "operator-token-0123456789abcdef"


@pytest.fixture
def collector(store: Store):
    with collector_in_thread(store, operator_token=OPERATOR) as url:
        yield url


def test_the_same_batch_posted_twice_is_stored_once_and_acked_fully(store: Store, collector: str):
    token = store.add_device("dev-1")
    reference = make_reference()
    batch = make_batch("dev-1", range(20), reference)
    first, second = post(collector, token, batch), post(collector, token, batch)
    assert first.status_code == second.status_code == 200
    assert UploadAck.model_validate(first.json()) == UploadAck(stored=list(range(20)), duplicates=0)
    assert UploadAck.model_validate(second.json()) == UploadAck(stored=list(range(20)), duplicates=20)
    assert store.count_windows("dev-1") == 20
    assert list(store.references()) == [reference_sha256(reference)]


def test_missing_or_wrong_tokens_get_401(store: Store, collector: str):
    token = store.add_device("dev-1")
    batch = make_batch("dev-1", [0])
    for bad in (None, "ekd_wrong", token[:-1], token.upper()):
        response = post(collector, bad, batch)
        assert response.status_code == 401, (bad, response.text)
        assert response.headers["www-authenticate"] == "Bearer" and "token" in response.json()["error"]
    response = httpx.post(f"{collector}/v1/telemetry", json=batch.model_dump(mode="json"), headers={"Authorization": f"Basic {token}"})
    assert response.status_code == 401
    garbage = httpx.post(f"{collector}/v1/telemetry", content=b"\x00", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 401, "the token is checked before the body is read"
    assert store.count_windows() == 0


def test_a_device_cannot_write_another_devices_records(store: Store, collector: str):
    token_1 = store.add_device("dev-1")
    store.add_device("dev-2")
    response = post(collector, token_1, make_batch("dev-2", [0, 1]))
    assert response.status_code == 403
    assert "dev-1" in response.json()["error"] and "dev-2" in response.json()["error"]
    assert store.count_windows() == 0


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b: b.update(windows=[]), "windows: List should have at least 1 item"),
        (lambda b: b["windows"][0].update(sequence=-1), "windows.0.sequence"),
        (lambda b: b["windows"][0].update(requests="many"), "windows.0.requests"),
        (lambda b: b["windows"][0].update(surprise=1), "windows.0.surprise: Extra inputs are not permitted"),
        (lambda b: b.pop("device_id"), "device_id: Field required"),
        (lambda b: b["windows"][0].update(histograms={"f0": [-1]}), "windows.0.histograms.f0.0"),
        # Found by schemathesis: a count past 64 bits reached the database (OverflowError / bigint out of range: 500).
        (lambda b: b["windows"][0].update(evicted_total=62587447670298254508032), "windows.0.evicted_total"),
        (lambda b: b["windows"][0].update(requests=2**63), "windows.0.requests"),
        # Also found by schemathesis: PostgreSQL text cannot hold NUL (CharacterNotInRepertoire: 500).
        (lambda b: b["windows"][0].update(model={"name": "clf\u0000", "version": "1.0.0"}), "windows.0.model.name"),
    ],
)
def test_a_body_that_breaks_the_contract_gets_422_naming_the_field(store: Store, collector: str, mutate, expected: str):
    token = store.add_device("dev-1")
    body = make_batch("dev-1", [0]).model_dump(mode="json")
    mutate(body)
    response = post(collector, token, body)
    assert response.status_code == 422
    assert expected in response.json()["error"]


def test_a_reference_under_the_wrong_digest_is_refused(store: Store, collector: str):
    token = store.add_device("dev-1")
    body = make_batch("dev-1", [0], make_reference()).model_dump(mode="json")
    body["references"] = {"0" * 64: next(iter(body["references"].values()))}
    response = post(collector, token, body)
    assert response.status_code == 422 and "sha256" in response.json()["error"]
    assert store.count_windows() == 0


def test_not_json_gets_422(store: Store, collector: str):
    token = store.add_device("dev-1")
    response = httpx.post(f"{collector}/v1/telemetry", content=b"{not json", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert response.status_code == 422 and "error" in response.json()


def test_the_query_api_needs_the_operator_token(store: Store, collector: str):
    token = store.add_device("dev-1")
    post(collector, token, make_batch("dev-1", range(5)))
    for headers in ({}, {"Authorization": f"Bearer {token}"}, {"Authorization": "Bearer wrong"}):
        assert httpx.get(f"{collector}/v1/devices", headers=headers).status_code == 401
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    (device,) = httpx.get(f"{collector}/v1/devices", headers=operator).json()
    assert (device["id"], device["windows"]) == ("dev-1", 5)
    windows = httpx.get(f"{collector}/v1/devices/dev-1/windows", params={"since": 1_700_000_000 + 60 * 3}, headers=operator).json()
    assert [w["sequence"] for w in windows] == [2, 3, 4]
    assert httpx.get(f"{collector}/v1/devices/ghost/windows", headers=operator).status_code == 404
    report = httpx.get(f"{collector}/v1/report", headers=operator).json()
    assert report["devices"][0]["requests"] == 5 * 500


def test_without_an_operator_token_the_query_api_is_off(store: Store):
    with collector_in_thread(store) as url:
        response = httpx.get(f"{url}/v1/devices", headers={"Authorization": "Bearer anything-at-all-123"})
    assert response.status_code == 403 and "--operator-token-file" in response.json()["error"]


def test_two_collector_processes_racing_the_same_batches_store_each_window_once(db_url: str):
    """Two `edgekit fleet serve` processes on one database; every batch is posted to both at the same moment."""
    store = Store.open(db_url)
    token = store.add_device("dev-1")
    batches = [make_batch("dev-1", range(start, start + 100), make_reference()) for start in range(0, 1000, 100)]
    with collector_process(db_url) as one, collector_process(db_url) as two:
        acks: list[dict] = []
        failures: list[str] = []

        def send(url: str, batch) -> None:  # type: ignore[no-untyped-def]
            response = post(url, token, batch)
            if response.status_code != 200:
                failures.append(f"{url}: {response.status_code} {response.text}")
            else:
                acks.append(response.json())

        for batch in batches:
            threads = [threading.Thread(target=send, args=(url, batch)) for url in (one.url, two.url)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert not failures, failures
    assert len(acks) == 20 and all(len(ack["stored"]) == 100 for ack in acks)
    assert sum(ack["duplicates"] for ack in acks) == 1000, "each window is new to exactly one of the two posts"
    assert store.count_windows("dev-1") == 1000
    assert [w.sequence for w in store.fetch_windows(device="dev-1")[0]] == list(range(1000))
    assert len(store.references()) == 1
    store.close()


def test_fleet_serve_refuses_an_unreachable_database_without_a_traceback():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "edgekit", "fleet", "serve", "--db", "postgresql://nobody@127.0.0.1:1/x"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot open the fleet database") and "Traceback" not in result.stderr


def test_the_collector_tunes_garbage_collection_while_it_serves_and_restores_it(tmp_path):
    """Start-up objects frozen out of full collections and a large young generation, only while the app runs."""
    import gc

    from edgekit.fleet.collector import _GC_THRESHOLDS

    before = gc.get_threshold()
    store = Store.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        with collector_in_thread(store) as url:
            assert gc.get_threshold() == _GC_THRESHOLDS and gc.get_freeze_count() > 0
            token = store.add_device("dev-1")
            assert post(url, token, make_batch("dev-1", range(3))).status_code == 200
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    finally:
        store.close()
