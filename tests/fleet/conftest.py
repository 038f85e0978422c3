"""Real databases and real collectors for the fleet tests.

``db_url`` gives every test a fresh SQLite file, and a fresh schema in the
PostgreSQL database ``test`` on 127.0.0.1:5432 (skipped with the reason when
nothing answers there), dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from device_agent.telemetry_schema import (
    DriftReference,
    FeatureReference,
    Thresholds,
    UploadBatch,
    WindowSummary,
    reference_sha256,
)
from tests.support.limits import memory_capped
from tests.support.network import free_port, serving

PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
PG_USERS = ("postgres", os.environ.get("USER") or "root", "root")
_pg_user: str | None | bool = False  # False: not probed yet


def _postgres_user() -> str | None:
    """The first user PostgreSQL lets in, or None when it does not answer."""
    global _pg_user
    if _pg_user is False:
        _pg_user = None
        import psycopg

        for user in PG_USERS:
            try:
                with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, connect_timeout=3):
                    _pg_user = user
                    break
            except psycopg.Error:
                continue
    return _pg_user  # type: ignore[return-value]


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A database URL whose connections work in a new, private schema; the schema is dropped afterwards."""
    import psycopg

    user = _postgres_user()
    if user is None:
        pytest.skip(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} (database {PG_DATABASE!r}); CI's service provides it")
    schema = f"ek_fleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{PG_DATABASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture
def store(db_url: str):
    from edgekit.fleet.store import Store

    opened = Store.open(db_url)
    yield opened
    opened.close()


# --------------------------------------------------------------------------- documents


def make_reference(features: int = 3, bins: int = 20, *, task: str = "text-classification") -> DriftReference:
    """A reference of ``features`` numeric features with ``bins`` interior edges (bins + 1 counts), uniform."""
    edges = [float(i) for i in range(bins)]
    proportions = [1.0 / (bins + 1)] * (bins + 1)
    return DriftReference(
        task=task,
        features={
            f"f{i}": FeatureReference(kind="numeric", source="input", edges=edges, proportions=proportions,
                                      thresholds=Thresholds(psi=0.25, js=0.1))
            for i in range(features)
        },
        reference_rows=10_000,
        window_size=500,
    )


def make_window(sequence: int, **fields) -> WindowSummary:
    document = {
        "sequence": sequence,
        "started_at": 1_700_000_000.0 + 60 * sequence,
        "ended_at": 1_700_000_000.0 + 60 * sequence + 60,
        "model": {"name": "clf", "version": "1.0.0"},
        "requests": 500,
        "errors": 0,
        "latency": {"p50_ms": 2.0, "p95_ms": 5.0, "p99_ms": 8.0},
    }
    document.update(fields)
    return WindowSummary.model_validate(document)


def make_batch(device: str, sequences, reference: DriftReference | None = None, **fields) -> UploadBatch:
    digest = reference_sha256(reference) if reference is not None else None
    windows = [make_window(s, reference_sha256=digest, **fields) for s in sequences]
    return UploadBatch(device_id=device, windows=windows, references={digest: reference} if reference is not None else {})


# --------------------------------------------------------------------------- collectors


@contextmanager
def collector_in_thread(store, operator_token: str | None = None) -> Iterator[str]:
    """The collector app under uvicorn in this process, on a free loopback port; yields its base URL."""
    from edgekit.fleet.collector import create_app

    with serving(create_app(store, operator_token=operator_token)) as address:
        yield f"http://{address}"


@dataclass
class CollectorProcess:
    url: str
    process: subprocess.Popen


@contextmanager
def collector_process(db_url: str, *extra: str, memory_limit: int | None = None) -> Iterator[CollectorProcess]:
    """``edgekit fleet serve`` as a real subprocess on a free port; ``memory_limit`` caps its address space (bytes)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgekit", "fleet", "serve", "--db", db_url, "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **memory_capped(memory_limit),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"edgekit fleet serve exited {process.returncode}: {process.stdout.read()}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "edgekit fleet serve did not answer within 60 s"
            time.sleep(0.1)
        yield CollectorProcess(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(url: str, token: str | None, body) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if isinstance(body, UploadBatch):
        body = body.model_dump(mode="json")
    return httpx.post(f"{url}/v1/telemetry", json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A keyring, and the tiny text and image bundles (tests.support.bundles) signed by its key."""
    from device_agent.keys import generate_keypair, load_private_key
    from tests.support.bundles import write_tiny_image_bundle, write_tiny_text_bundle

    folder = tmp_path_factory.mktemp("bundles")
    generate_keypair(folder / "keys")
    key = load_private_key(folder / "keys" / "edgekit.key")
    write_tiny_text_bundle(folder / "text.ekb", key)
    write_tiny_image_bundle(folder / "image.ekb", key)
    return {"keyring": folder / "keys", "text": folder / "text.ekb", "image": folder / "image.ekb"}
