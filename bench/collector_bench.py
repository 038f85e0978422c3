"""Collector ingest benchmark: windows per second through the real HTTP collector, on SQLite and PostgreSQL.

Each run starts ``edgekit fleet serve`` as a subprocess on a fresh database,
registers devices, and posts batches of realistic window summaries: 20 numeric
features × 22 histogram bins (20 interior bins + 2 overflow), scores for every
feature, latency percentiles, as a device's outbox uploads them. Bodies are
serialised before the clock starts, so the number is the collector's (HTTP,
validation, exactly-once upsert, commit), not the client's. Each configuration
runs ``--devices`` concurrent uploaders (one per device, each with its own
token and keep-alive connection); after the run the stored count is checked
against what was sent.

Run: python bench/collector_bench.py [--windows N] [--out bench/results/collector.json]
PostgreSQL: 127.0.0.1:5432, database ``test`` (a private schema, dropped afterwards);
skipped with a note when it does not answer. Timing on shared VMs drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEATURES, BINS = 20, 22
BATCH_SIZES = (1, 100, 500)


def _window(sequence: int, rng: random.Random) -> dict:
    histograms = {f"input:f{i}": [rng.randint(0, 60) for _ in range(BINS)] for i in range(FEATURES)}
    return {
        "sequence": sequence,
        "started_at": 1_700_000_000.0 + 60 * sequence,
        "ended_at": 1_700_000_060.0 + 60 * sequence,
        "model": {"name": "demo-text", "version": "1.0.0"},
        "reference_sha256": "ab" * 32,
        "requests": 500,
        "errors": rng.randint(0, 2),
        "latency": {"p50_ms": 3.1, "p95_ms": 6.4, "p99_ms": 9.8},
        "histograms": histograms,
        "scores": {name: {"psi": rng.random() * 0.1, "js": rng.random() * 0.05, "drifting": False} for name in histograms},
        "drifting": False,
        "alert": False,
        "top_features": [],
        "evicted_total": 0,
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _collector(db_url: str):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "edgekit", "fleet", "serve", "--db", db_url, "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the collector exited: {process.stderr.read()}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the collector did not start")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _run(db_url: str, windows: int, batch: int, devices: int, collectors: int) -> dict:
    from edgekit.fleet.store import Store

    store = Store.open(db_url)
    tokens = {f"bench-{i}": store.add_device(f"bench-{i}") for i in range(devices)}
    rng = random.Random(0)
    per_device = windows // devices
    bodies: dict[str, list[bytes]] = {}
    for device in tokens:
        documents = [_window(s, rng) for s in range(per_device)]
        bodies[device] = [json.dumps({"device_id": device, "windows": documents[i:i + batch]}).encode()
                          for i in range(0, per_device, batch)]
    body_bytes = sum(len(b) for bs in bodies.values() for b in bs) / (per_device * devices)
    failures: list[str] = []
    with ExitStack() as stack:
        urls = [stack.enter_context(_collector(db_url)) for _ in range(collectors)]

        def upload(device: str) -> None:
            url = urls[int(device.rsplit("-", 1)[1]) % len(urls)]
            headers = {"Authorization": f"Bearer {tokens[device]}", "Content-Type": "application/json"}
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                for body in bodies[device]:
                    response = client.post("/v1/telemetry", content=body)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                        return

        threads = [threading.Thread(target=upload, args=(device,)) for device in tokens]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    stored = store.count_windows()
    store.close()
    if failures:
        raise RuntimeError(failures[0])
    if stored != per_device * devices:
        raise RuntimeError(f"stored {stored} windows of {per_device * devices} sent")
    return {"batch": batch, "devices": devices, "collectors": collectors, "windows": stored, "seconds": round(elapsed, 3),
            "windows_per_second": round(stored / elapsed, 1), "bytes_per_window": round(body_bytes)}


@contextmanager
def _postgres_url():
    import psycopg

    for user in ("postgres", os.environ.get("USER") or "root"):
        try:
            admin = psycopg.connect(host="127.0.0.1", port=5432, dbname="test", user=user, autocommit=True, connect_timeout=3)
            break
        except psycopg.Error:
            continue
    else:
        yield None
        return
    schema = f"ek_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20_000, help="windows per configuration (batch 1 sends a tenth)")
    parser.add_argument("--devices", type=int, default=4, help="concurrent uploading devices")
    parser.add_argument("--collectors", type=int, default=1, help="collector processes on the one database (round-robin)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "collector.json")
    args = parser.parse_args()
    results: dict = {
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "window": {"features": FEATURES, "bins": BINS},
        "sqlite": [], "postgresql": [],
    }
    for batch in BATCH_SIZES:
        count = args.windows // 10 if batch == 1 else args.windows
        with tempfile.TemporaryDirectory() as folder:
            row = _run(f"sqlite:///{folder}/fleet.db", count, batch, args.devices, args.collectors)
        results["sqlite"].append(row)
        print("sqlite", row, flush=True)
        with _postgres_url() as url:
            if url is None:
                results["postgresql_note"] = "PostgreSQL did not answer on 127.0.0.1:5432"
                continue
            row = _run(url, count, batch, args.devices, args.collectors)
        results["postgresql"].append(row)
        print("postgresql", row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
