"""The store on real SQLite and PostgreSQL: exactly-once upserts, references and samples once, migrations."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import sqlalchemy as sa

from device_agent.telemetry_schema import CapturedSample, reference_sha256
from edgekit.fleet.store import (
    LATEST_VERSION,
    FleetError,
    Store,
    create_engine,
    current_version,
    migrate,
)
from tests.fleet.conftest import make_batch, make_reference, make_window

Contender = TypeVar("Contender")
Result = TypeVar("Result")


def _race(work: Callable[[Contender], Result], contenders: list[Contender]) -> list[Result]:
    """``work(contender)`` for every contender at once (a thread each, released together); the results, in order.

    Fails the test with every exception raised, once all threads have finished.
    """
    results: list = [None] * len(contenders)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(contenders))

    def run(index: int, contender: Contender) -> None:
        barrier.wait()
        try:
            results[index] = work(contender)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_the_same_batch_twice_is_stored_once_and_both_acks_name_every_sequence(store: Store):
    store.add_device("dev-1")
    batch = make_batch("dev-1", range(10))
    first = store.ingest(batch)
    second = store.ingest(batch)
    assert first.stored == second.stored == list(range(10))
    assert (first.duplicates, second.duplicates) == (0, 10)
    assert store.count_windows("dev-1") == 10


def test_an_overlapping_batch_stores_only_the_new_windows_and_keeps_the_first_copy(store: Store):
    store.add_device("dev-1")
    store.ingest(make_batch("dev-1", range(5), requests=100))
    ack = store.ingest(make_batch("dev-1", range(3, 8), requests=999))
    assert ack.stored == [3, 4, 5, 6, 7] and ack.duplicates == 2
    stored = {w.sequence: w.requests for w in store.fetch_windows(device="dev-1")[0]}
    assert stored == {0: 100, 1: 100, 2: 100, 3: 100, 4: 100, 5: 999, 6: 999, 7: 999}


def test_a_sequence_twice_in_one_batch_is_stored_once(store: Store):
    store.add_device("dev-1")
    batch = make_batch("dev-1", [4, 4, 5])
    ack = store.ingest(batch)
    assert ack.stored == [4, 5] and ack.duplicates == 0
    assert store.count_windows() == 2


def test_windows_round_trip_every_field(store: Store):
    store.add_device("dev-1")
    reference = make_reference()
    window = make_window(
        7, reference_sha256=reference_sha256(reference), errors=3,
        histograms={"f0": [1] * 21}, scores={"f0": {"psi": 0.5, "js": 0.2, "drifting": True}},
        drifting=True, alert=True, top_features=["f0"], evicted_total=4,
    )
    from device_agent.telemetry_schema import UploadBatch

    store.ingest(UploadBatch(device_id="dev-1", windows=[window], references={reference_sha256(reference): reference}),
                 received_at=123.0)
    (stored,), skipped = store.fetch_windows()
    assert skipped == 0
    assert (stored.device_id, stored.sequence, stored.errors, stored.evicted_total) == ("dev-1", 7, 3, 4)
    assert (stored.model_name, stored.model_version, stored.p95_ms, stored.received_at) == ("clf", "1.0.0", 5.0, 123.0)
    assert stored.histograms == {"f0": [1] * 21} and stored.scores["f0"].psi == 0.5
    assert stored.drifting and stored.alert and stored.top_features == ["f0"]


def test_windows_without_model_or_latency_store_nulls(store: Store):
    """A column that is NULL in every row of a batch (PostgreSQL gets one typed array per column)."""
    store.add_device("dev-1")
    ack = store.ingest(make_batch("dev-1", range(3), model=None, latency={}))
    assert ack.stored == [0, 1, 2] and ack.duplicates == 0
    stored, _ = store.fetch_windows()
    assert {(w.model_name, w.model_version, w.reference_sha256, w.p50_ms, w.p99_ms) for w in stored} == {(None,) * 5}


def test_devices_own_their_sequences(store: Store):
    store.add_device("dev-1")
    store.add_device("dev-2")
    store.ingest(make_batch("dev-1", range(3)))
    ack = store.ingest(make_batch("dev-2", range(3)))
    assert ack.duplicates == 0 and store.count_windows() == 6


def test_a_reference_is_stored_once(store: Store, db_url: str):
    store.add_device("dev-1")
    reference = make_reference()
    for start in (0, 10, 20):
        store.ingest(make_batch("dev-1", range(start, start + 10), reference))
    digest = reference_sha256(reference)
    assert store.references() == {digest: reference}
    with store.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM drift_references")) == 1


def test_samples_are_stored_once_with_their_window(store: Store):
    store.add_device("dev-1")
    samples = [CapturedSample(captured_at=1.0, text=f"text {i}", predicted="a") for i in range(3)]
    batch = make_batch("dev-1", [0], samples=[s.model_dump() for s in samples])
    store.ingest(batch)
    store.ingest(batch)
    found, skipped = store.fetch_samples("dev-1")
    assert ([w.sample for w in found], skipped) == (samples, 0)


def test_concurrent_duplicate_ingests_store_each_window_once(db_url: str):
    """Four connections race the same 200 windows; exactly one of them stores each window."""
    stores = [Store.open(db_url) for _ in range(4)]
    stores[0].add_device("dev-1")
    batches = [make_batch("dev-1", range(start, start + 50)) for start in range(0, 200, 50)]
    acks = [ack for store_acks in _race(lambda store: [store.ingest(batch) for batch in batches], stores) for ack in store_acks]
    assert stores[0].count_windows() == 200
    assert sum(len(a.stored) - a.duplicates for a in acks) == 200, "each window is new to exactly one ingest"
    for s in stores:
        s.close()


def test_a_batch_split_over_several_statements_is_still_stored_once(store: Store, monkeypatch: pytest.MonkeyPatch):
    """With room for two windows per INSERT, a batch of seven spans four statements; RETURNING is summed over them."""
    import edgekit.fleet.store as store_module

    monkeypatch.setattr(store_module, "_MAX_PARAMETERS", 2 * len(store_module.windows.columns))
    store.add_device("dev-1")
    store.ingest(make_batch("dev-1", [1, 4]))
    samples = [CapturedSample(captured_at=1.0, text=f"text {i}") for i in range(5)]
    ack = store.ingest(make_batch("dev-1", range(7), samples=[s.model_dump() for s in samples]))
    assert ack.stored == list(range(7)) and ack.duplicates == 2
    assert [w.sequence for w in store.fetch_windows()[0]] == list(range(7))
    assert len(store.fetch_samples("dev-1")[0]) == 5 * 5, "samples of the five new windows only, each once"


def test_sqlite_commits_are_durable_before_the_ack(tmp_path):
    """WAL with synchronous=FULL: the ack lets the device delete its copy, so a commit must survive a power cut."""
    store = Store.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()


def test_token_checks_do_not_wait_for_a_writer_on_sqlite(tmp_path):
    """A reader takes no write lock: with another connection holding it, the token lookup still answers at once."""
    import sqlite3

    path = tmp_path / "fleet.db"
    store = Store.open(f"sqlite:///{path}")
    token = store.add_device("dev-1")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        answers: list[str | None] = []
        reader = threading.Thread(target=lambda: answers.append(store.device_for_token(token)))
        reader.start()
        reader.join(timeout=10)  # a lock wait would last the 30 s busy timeout
        assert answers == ["dev-1"]
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        store.close()


def test_device_tokens_are_stored_hashed_and_name_their_device(store: Store):
    token = store.add_device("dev-1")
    assert token.startswith("ekd_") and len(token) > 40
    assert store.device_for_token(token) == "dev-1"
    assert store.device_for_token(token + "x") is None
    with store.engine.connect() as conn:
        assert token not in json.dumps([list(r) for r in conn.execute(sa.text("SELECT * FROM devices"))])


def test_adding_a_device_twice_is_a_clear_error_and_rotate_replaces_the_token(store: Store):
    old = store.add_device("dev-1")
    with pytest.raises(FleetError, match="already registered.*devices rotate-token dev-1"):
        store.add_device("dev-1")
    new = store.rotate_token("dev-1")
    assert store.device_for_token(old) is None and store.device_for_token(new) == "dev-1"


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 129, "dev/1"])
def test_bad_device_names_are_refused(store: Store, name: str):
    with pytest.raises(FleetError, match="not allowed"):
        store.add_device(name)


# --------------------------------------------------------------------------- migrations


def _tables(engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_migrations_run_twice_safely(db_url: str):
    engine = create_engine(db_url)
    assert current_version(engine) == 0
    assert migrate(engine) == LATEST_VERSION
    assert migrate(engine) == LATEST_VERSION
    assert {"devices", "windows", "drift_references", "samples", "edgekit_schema_version"} <= _tables(engine)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM edgekit_schema_version")) == 1
    engine.dispose()


def test_concurrent_migrations_migrate_once(db_url: str):
    engines = [create_engine(db_url) for _ in range(4)]
    assert _race(migrate, engines) == [LATEST_VERSION] * 4
    for engine in engines:
        engine.dispose()


def test_an_old_version_database_is_upgraded_and_keeps_its_data(db_url: str):
    engine = create_engine(db_url)
    assert migrate(engine, up_to=1) == 1
    assert "samples" not in _tables(engine)
    assert "received_at" not in {c["name"] for c in sa.inspect(engine).get_columns("windows")}
    with engine.begin() as conn:  # a version-1 collector's data
        conn.execute(sa.text("INSERT INTO devices (id, token_sha256, created_at) VALUES ('old', :h, 1.0)"), {"h": "0" * 64})
        conn.execute(sa.text(
            "INSERT INTO windows (device_id, sequence, started_at, ended_at, requests, errors, histograms, scores, "
            "drifting, alert, top_features, evicted_total) VALUES ('old', 0, 1.0, 2.0, 10, 1, '{}', '{}', false, false, '[]', 0)"
        ))
    engine.dispose()

    store = Store.open(db_url)
    assert current_version(store.engine) == LATEST_VERSION
    (window,), _ = store.fetch_windows(device="old")
    assert (window.requests, window.errors, window.received_at) == (10, 1, 0.0)
    store.ingest(make_batch("old", [0, 1], samples=[{"captured_at": 1.0, "text": "hi"}]))
    assert store.count_windows("old") == 2 and len(store.fetch_samples("old")[0]) == 1
    store.close()


def test_a_database_from_a_newer_edgekit_is_refused(db_url: str):
    engine = create_engine(db_url)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE edgekit_schema_version SET version = 99"))
    with pytest.raises(FleetError, match="newer than this edgekit"):
        migrate(engine)
    engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://u@h/db", "not supported"),
        ("sqlite://", "names no file"),
        ("sqlite:////no/such/folder/fleet.db", "does not exist"),
        ("postgresql://nobody@127.0.0.1:1/none", "cannot open the fleet database"),
    ],
)
def test_bad_database_urls_are_user_errors_that_say_what_to_use(url: str, expected: str):
    with pytest.raises(FleetError, match=expected) as caught:
        create_engine(url)
    assert "sqlite:///" in str(caught.value) or "create it" in str(caught.value)
