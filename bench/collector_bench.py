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

Every configuration runs ``--rounds`` times on a fresh database; the row kept is
the median round, with all rounds' rates beside it. Each row also says where the
CPU went during the timed part: the collector process's CPU seconds (from
``/proc``, Linux) and the uploading client's, and the 1-minute load average
when the round started. On a shared VM the wall-clock rate moves with the other
jobs; ``collector_cpu_us_per_window`` moves much less, and ``1e6 / it`` is what
one collector process would ingest on a core of its own.

A second, smaller measurement, ``in_process``, leaves HTTP out: one thread
parses and validates the same bodies into ``UploadBatch`` and calls
``Store.ingest``, as the collector does after the token check. It is the
ceiling for one collector process on one core; the HTTP rows are what a user
gets.

Run: python bench/collector_bench.py [--windows N] [--rounds R] [--out bench/results/collector.json]
PostgreSQL: 127.0.0.1:5432, database ``test`` (a private schema, dropped afterwards);
skipped with a note when it does not answer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import socket
import statistics
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
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def _process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _documents(devices: int, per_device: int) -> dict[str, list[dict]]:
    rng = random.Random(0)
    return {f"bench-{i}": [_window(s, rng) for s in range(per_device)] for i in range(devices)}


def _bodies(documents: dict[str, list[dict]], batch: int) -> dict[str, list[bytes]]:
    return {device: [json.dumps({"device_id": device, "windows": windows[i:i + batch]}).encode()
                     for i in range(0, len(windows), batch)]
            for device, windows in documents.items()}


def _run(db_url: str, bodies: dict[str, list[bytes]], batch: int, collectors: int) -> dict:
    from edgekit.fleet.store import Store

    store = Store.open(db_url)
    tokens = {device: store.add_device(device) for device in bodies}
    sent = sum(len(json.loads(b)["windows"]) for bs in bodies.values() for b in bs)
    body_bytes = sum(len(b) for bs in bodies.values() for b in bs) / sent
    failures: list[str] = []
    load = os.getloadavg()[0]
    with ExitStack() as stack:
        servers = [stack.enter_context(_collector(db_url)) for _ in range(collectors)]

        def upload(device: str) -> None:
            url = servers[int(device.rsplit("-", 1)[1]) % len(servers)][0]
            headers = {"Authorization": f"Bearer {tokens[device]}", "Content-Type": "application/json"}
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                for body in bodies[device]:
                    response = client.post("/v1/telemetry", content=body)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                        return

        threads = [threading.Thread(target=upload, args=(device,)) for device in tokens]
        server_cpu = [_process_cpu_seconds(pid) for _, pid in servers]
        client_cpu = _own_cpu_seconds()
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        client_cpu = _own_cpu_seconds() - client_cpu
        after = [_process_cpu_seconds(pid) for _, pid in servers]
        server_cpu_total = None if None in server_cpu or None in after else sum(a - b for a, b in zip(after, server_cpu))
    stored = store.count_windows()
    store.close()
    if failures:
        raise RuntimeError(failures[0])
    if stored != sent:
        raise RuntimeError(f"stored {stored} windows of {sent} sent")
    row = {"batch": batch, "devices": len(bodies), "collectors": collectors, "windows": stored, "seconds": round(elapsed, 3),
           "windows_per_second": round(stored / elapsed, 1), "bytes_per_window": round(body_bytes),
           "client_cpu_seconds": round(client_cpu, 2), "load_1min_at_start": round(load, 2)}
    if server_cpu_total is not None:
        row["collector_cpu_seconds"] = round(server_cpu_total, 2)
        row["collector_cpu_us_per_window"] = round(1e6 * server_cpu_total / stored, 1)
    return row


def _run_in_process(db_url: str, bodies: dict[str, list[bytes]], batch: int) -> dict:
    """The collector's work after the token check, without HTTP: parse and validate each body, then ``Store.ingest``.

    Wall-clock and this thread's CPU time; on PostgreSQL the server's own CPU is not in the latter.
    """
    from device_agent.telemetry_schema import UploadBatch
    from edgekit.fleet.collector import gc_tuned_for_ingest
    from edgekit.fleet.store import Store

    store = Store.open(db_url)
    for device in bodies:
        store.add_device(device)
    validating = ingesting = validating_cpu = ingesting_cpu = 0.0
    count = 0
    with gc_tuned_for_ingest():  # as the collector's lifespan does
        for device_bodies in zip(*bodies.values()):  # the devices take turns, as concurrent uploads would interleave
            for body in device_bodies:
                start, start_cpu = time.perf_counter(), time.thread_time()
                upload = UploadBatch.model_validate_json(body)
                validated, validated_cpu = time.perf_counter(), time.thread_time()
                ack = store.ingest(upload)
                ingesting += time.perf_counter() - validated
                ingesting_cpu += time.thread_time() - validated_cpu
                validating += validated - start
                validating_cpu += validated_cpu - start_cpu
                count += len(ack.stored)
    stored = store.count_windows()
    store.close()
    if stored != count:
        raise RuntimeError(f"stored {stored} windows of {count} sent")
    elapsed = validating + ingesting
    return {"batch": batch, "windows": stored, "seconds": round(elapsed, 3), "windows_per_second": round(stored / elapsed, 1),
            "validate_us_per_window": round(1e6 * validating / stored, 1), "ingest_us_per_window": round(1e6 * ingesting / stored, 1),
            "validate_cpu_us_per_window": round(1e6 * validating_cpu / stored, 1),
            "ingest_cpu_us_per_window": round(1e6 * ingesting_cpu / stored, 1),
            "load_1min_at_start": round(os.getloadavg()[0], 2)}


def _median_round(rounds: list[dict]) -> dict:
    rates = [row["windows_per_second"] for row in rounds]
    median = sorted(rounds, key=lambda row: row["windows_per_second"])[(len(rounds) - 1) // 2]
    return {**median, "windows_per_second_rounds": rates, "windows_per_second_median": statistics.median(rates)}


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


@contextmanager
def _database(kind: str):
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/fleet.db"
    else:
        with _postgres_url() as url:
            yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20_000, help="windows per configuration (batch 1 sends a tenth)")
    parser.add_argument("--devices", type=int, default=4, help="concurrent uploading devices")
    parser.add_argument("--collectors", type=int, default=1, help="collector processes on the one database (round-robin)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration; the median is kept")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=list(BATCH_SIZES),
                        help="comma-separated batch sizes (default: 1,100,500)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "collector.json")
    args = parser.parse_args()
    results: dict = {
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "window": {"features": FEATURES, "bins": BINS},
        "rounds": args.rounds,
        "sqlite": [], "postgresql": [], "in_process": {"sqlite": [], "postgresql": []},
    }
    # Every body is serialised before anything is timed; the documents are then dropped, so that the bench's own
    # millions of objects do not slow the garbage collector of the in-process runs.
    documents = _documents(args.devices, args.windows // args.devices)
    all_bodies = {batch: _bodies({device: windows[:len(windows) // 10] if batch == 1 else windows
                                  for device, windows in documents.items()}, batch)
                  for batch in args.batches}
    del documents
    gc.collect()
    for batch, bodies in all_bodies.items():
        for kind in ("sqlite", "postgresql"):
            rounds = []
            for _ in range(args.rounds):
                with _database(kind) as url:
                    if url is None:
                        results["postgresql_note"] = "PostgreSQL did not answer on 127.0.0.1:5432"
                        break
                    rounds.append(_run(url, bodies, batch, args.collectors))
            if rounds:
                results[kind].append(_median_round(rounds))
                print(kind, "http", results[kind][-1], flush=True)
            if batch == 1:
                continue  # one window per call says nothing about the store that batch 100 does not
            with _database(kind) as url:
                if url is not None:
                    results["in_process"][kind].append(_run_in_process(url, bodies, batch))
                    print(kind, "in-process", results["in_process"][kind][-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
