"""Rollout benchmark: 100 simulated devices against one collector, on SQLite and on PostgreSQL.

For each database: one ``edgekit fleet serve --rollout-interval 1`` process on a fresh database, and ``--devices``
registered devices, each a lightweight poller (``tests/support/fleet_devices.py``: GET its desired state, download
and sha256-check a new bundle, POST a report, then POST one telemetry window of the version it serves). A pool of
``--threads`` threads polls every device every ``--poll-seconds``, at evenly staggered phases, as a fleet does.
Three rollouts of the tiny test classifier, in order:

1. **v1** to every device in one wave, soak 0: every device then serves the model and has an earlier version to go
   back to. Its time is recorded, not studied. Then ``--steady-seconds`` of polling with nothing to install: the
   collector's CPU for a fleet that only polls and sends telemetry.
2. **v2** in waves ``1,25%,100%`` (1, 24, 75 devices), soak ``--soak-seconds``, gate ``p95_ms<=--gate-p95-ms``:
   the time of each wave (from the rollout's own events) and the whole rollout, the collector's CPU seconds (from
   ``/proc``) over the rollout, per poll and per request, requests served, bytes downloaded. Every device must
   download and install v2 exactly once.
3. **v3**, same waves and gate, where the canary (wave 1's one device) reports p95 ``--canary-p95-ms`` once it runs
   v3: the rollout must halt in wave 1. Recorded: the time from the canary's breaching window to the halt, and from
   the halt to the canary serving v2 again (its local copy, no download). No device outside the canary may download
   or install v3, checked after two more poll periods.

CPU is read from ``/proc`` (Linux): the collector process's, the bench's own (the pollers), and on PostgreSQL the
database server's (every ``postgres`` process on the host, so other clients' too, and the bench's own look at the
rollout twice a second), because there the database's work is not in the collector's process.

The checks are recorded in the results; a failed one makes the exit status 1 (after the results are written).
The simulated devices do not verify signatures or run a model (tests/e2e/test_rollout_e2e.py runs real agents).

Run: python bench/rollout_bench.py [--devices 100] [--poll-seconds 2] [--out bench/results/rollouts.json]
PostgreSQL: 127.0.0.1:5432, database ``test`` (a private schema, dropped afterwards); skipped with a note when it
does not answer.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.build_bench import _cpu_model  # noqa: E402
from bench.collector_bench import _own_cpu_seconds, _process_cpu_seconds  # noqa: E402

MODEL = "tiny-classifier"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
WAVES = "1,25%,100%"
ROLLOUT_INTERVAL_S = 1.0


# --------------------------------------------------------------------------- the simulated fleet


@dataclass
class Fleet:
    """Simulated devices polled on a schedule by a pool of threads, with a log of what each did."""

    devices: list  # SimulatedDevice
    threads: int
    poll_seconds: float
    slow: dict[tuple[str, str], float] = field(default_factory=dict)  # (device, version) -> p95 it reports
    normal_p95_ms: float = 5.0
    polls: list[tuple[float, float, float]] = field(default_factory=list)  # (ended at, seconds, behind schedule s)
    installs: list[tuple[str, str, str, float]] = field(default_factory=list)  # (device, version, outcome, at)
    windows: list[tuple[str, str, float, float]] = field(default_factory=list)  # (device, version, p95, sent at)
    requests: Counter = field(default_factory=Counter)  # (route, status)
    downloads: Counter = field(default_factory=Counter)  # (device, sha256), 200 answers
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for device in self.devices:
            device._client = httpx.Client(base_url=device.url, headers={"Authorization": f"Bearer {device.token}"},
                                          timeout=60, event_hooks={"response": [self._counter(device.device_id)]})
        begin = time.monotonic()
        for worker in range(self.threads):
            mine = [(begin + self.poll_seconds * index / len(self.devices), index)
                    for index in range(worker, len(self.devices), self.threads)]
            thread = threading.Thread(target=self._run, args=(mine,), name=f"fleet-{worker}", daemon=True)
            self._workers.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=120)
        for device in self.devices:
            device.close()

    def _counter(self, device_id: str):  # type: ignore[no-untyped-def]
        def count(response: httpx.Response) -> None:
            path = response.request.url.path
            route = path.rsplit("/", 1)[-1] if path.startswith("/v1/devices/") else path.split("/")[2]
            with self._lock:
                self.requests[(route, response.status_code)] += 1
                if route == "bundles" and response.status_code == 200:
                    self.downloads[(device_id, path.rsplit("/", 1)[-1])] += 1
        return count

    def _run(self, schedule: list[tuple[float, int]]) -> None:
        heapq.heapify(schedule)
        while not self._stop.is_set():
            due, index = heapq.heappop(schedule)
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            started = time.monotonic()
            self._poll(self.devices[index], behind=started - due)
            heapq.heappush(schedule, (due + self.poll_seconds, index))

    def _poll(self, device, behind: float) -> None:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            outcomes = device.poll()
            version = device.serving.get(MODEL)
            if version is not None:
                device.p95_ms = self.slow.get((device.device_id, version), self.normal_p95_ms)
                device.send_window(MODEL)
        except httpx.HTTPError as error:
            with self._lock:
                self.errors.append(f"{device.device_id}: {type(error).__name__}: {error}"[:300])
            return
        with self._lock:
            self.polls.append((time.time(), time.perf_counter() - started, behind))
            self.installs.extend((device.device_id, o.version, o.outcome, o.at) for o in outcomes)
            if version is not None:
                self.windows.append((device.device_id, version, device.p95_ms, time.time()))

    def snapshot(self, pid: int) -> dict:
        with self._lock:
            return {"at": time.time(), "collector_cpu_s": _process_cpu_seconds(pid), "bench_cpu_s": _own_cpu_seconds(),
                    "postgres_cpu_s": _postgres_cpu_seconds(),
                    "polls": len(self.polls), "requests": sum(self.requests.values()),
                    "bytes": sum(device.downloaded_bytes for device in self.devices), "load_1min": os.getloadavg()[0]}


def _postgres_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL process on this host, the exited backends (reaped by the postmaster) included.

    On PostgreSQL the database's work runs in these processes, not the collector's; on a shared host they also
    serve other clients.
    """
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
        if name == "postgres":
            total += sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


def _between(first: dict, last: dict) -> dict:
    """What the collector and the fleet did between two snapshots."""
    seconds = last["at"] - first["at"]
    cpu = last["collector_cpu_s"] - first["collector_cpu_s"]
    polls = last["polls"] - first["polls"]
    requests = last["requests"] - first["requests"]
    return {"seconds": round(seconds, 2), "collector_cpu_s": round(cpu, 2),
            "collector_cpu_share_of_one_core": round(cpu / seconds, 3),
            "polls": polls, "requests": requests, "requests_per_s": round(requests / seconds, 1),
            "collector_cpu_ms_per_poll": round(1e3 * cpu / polls, 2) if polls else None,
            "collector_cpu_ms_per_request": round(1e3 * cpu / requests, 2) if requests else None,
            "bytes_downloaded": last["bytes"] - first["bytes"],
            "bench_cpu_s": round(last["bench_cpu_s"] - first["bench_cpu_s"], 2),
            "postgres_cpu_s": round(last["postgres_cpu_s"] - first["postgres_cpu_s"], 2),
            "load_1min": [round(first["load_1min"], 2), round(last["load_1min"], 2)]}


def _poll_times(fleet: Fleet, since: float, until: float) -> dict:
    with fleet._lock:
        rows = [(seconds, behind) for at, seconds, behind in fleet.polls if since <= at <= until]
    if not rows:
        return {}
    took = sorted(seconds for seconds, _ in rows)
    behind = sorted(lag for _, lag in rows)
    return {"poll_ms_p50": round(1e3 * statistics.median(took), 1), "poll_ms_p95": round(1e3 * took[int(0.95 * (len(took) - 1))], 1),
            "poll_ms_max": round(1e3 * took[-1], 1), "behind_schedule_s_max": round(behind[-1], 2)}


# --------------------------------------------------------------------------- one backend


def _wait(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)
    return result


def _ended(store, rollout_id: int):  # type: ignore[no-untyped-def]
    from edgekit.fleet.rollouts import RUNNING, show_rollout

    view = show_rollout(store, rollout_id)
    return view if view.state != RUNNING else None


def _waves(view, installs: list[tuple[str, str, str, float]]) -> list[dict]:  # type: ignore[no-untyped-def]
    """Each wave's devices, its time from its start to the next wave's (or the end), and when its last device installed."""
    starts = [event["at"] for event in view.events if event["kind"] == "wave_started"]
    end = next(event["at"] for event in view.events if event["kind"] in ("completed", "halted", "aborted"))
    installed_at = {device: at for device, version, outcome, at in installs if version == view.model_version and outcome == "installed"}
    rows = []
    for wave, started in enumerate(starts):
        members = [d.device_id for d in view.devices if d.wave == wave]
        last = max((installed_at[m] for m in members if m in installed_at), default=None)
        rows.append({"wave": wave + 1, "devices": len(members),
                     "seconds": round((starts[wave + 1] if wave + 1 < len(starts) else end) - started, 2),
                     "last_install_after_s": round(last - started, 2) if last is not None else None})
    return rows


def run_backend(db_url: str, bundles: dict[str, Path], args: argparse.Namespace) -> dict:
    from edgekit.fleet.rollouts import Gate, Selection, deploy, show_rollout
    from edgekit.fleet.store import Store
    from tests.fleet.conftest import collector_process
    from tests.support.fleet_devices import SimulatedDevice
    from tests.support.limits import peak_memory

    shas = {version: _sha256(path) for version, path in bundles.items()}
    gates = [Gate("p95_ms", args.gate_p95_ms)]
    store = Store.open(db_url)
    names = [f"dev-{i:03d}" for i in range(args.devices)]
    tokens = {name: store.add_device(name) for name in names}
    result: dict = {"load_average_start": [round(v, 2) for v in os.getloadavg()]}
    checks: dict[str, bool] = {}
    with collector_process(db_url, "--rollout-interval", str(ROLLOUT_INTERVAL_S)) as collector:
        pid = collector.process.pid
        fleet = Fleet([SimulatedDevice(collector.url, name, tokens[name]) for name in names], args.threads, args.poll_seconds)
        fleet.start()
        try:
            # 1. v1 everywhere, then a fleet that only polls.
            first = fleet.snapshot(pid)
            v1 = deploy(store, bundles["1.0.0"], Selection(all=True), waves="100%", soak_s=0, gates=gates)
            view = _wait(lambda: _ended(store, v1), args.timeout, "v1 to reach every device")
            result["v1_everywhere"] = {"state": view.state, "seconds": round(view.ended_at - view.created_at, 2),
                                       **_between(first, fleet.snapshot(pid))}
            checks["v1 completed"] = view.state == "completed"
            time.sleep(args.poll_seconds)  # every device has sent its first window and settled
            first = fleet.snapshot(pid)
            time.sleep(args.steady_seconds)
            last = fleet.snapshot(pid)
            result["steady_polling"] = {**_between(first, last), **_poll_times(fleet, first["at"], last["at"])}

            # 2. v2 in three waves.
            first = fleet.snapshot(pid)
            v2 = deploy(store, bundles["2.0.0"], Selection(all=True), waves=WAVES, soak_s=args.soak_seconds, gates=gates)
            view = _wait(lambda: _ended(store, v2), args.timeout, "the v2 rollout to end")
            last = fleet.snapshot(pid)
            v2_installs = Counter(d for d, version, outcome, _ in fleet.installs if version == "2.0.0" and outcome == "installed")
            v2_downloads = Counter({d: n for (d, sha), n in fleet.downloads.items() if sha == shas["2.0.0"]})
            result["rollout_3_waves"] = {
                "state": view.state, "reason": view.reason,
                "seconds": round(view.ended_at - view.created_at, 2),
                "waves": _waves(view, fleet.installs),
                **_between(first, last), **_poll_times(fleet, first["at"], last["at"]),
                "devices_installed_once": sum(1 for d in names if v2_installs[d] == 1 and v2_downloads[d] == 1),
                "bundle_bytes": bundles["2.0.0"].stat().st_size,
            }
            checks["3-wave rollout completed"] = view.state == "completed"
            checks["every device downloaded and installed v2 exactly once"] = \
                result["rollout_3_waves"]["devices_installed_once"] == len(names) and set(v2_installs) == set(names)
            checks["every device serves v2 (collector's view)"] = all(d.serving_version == "2.0.0" for d in view.devices)

            # 3. v3, whose canary breaches the p95 gate.
            canary = names[0]  # waves take devices in name order: the canary is the first
            fleet.slow[(canary, "3.0.0")] = args.canary_p95_ms
            v2_downloads_before = fleet.downloads[(canary, shas["2.0.0"])]
            first = fleet.snapshot(pid)
            v3 = deploy(store, bundles["3.0.0"], Selection(all=True), waves=WAVES, soak_s=args.soak_seconds, gates=gates)
            view = _wait(lambda: _ended(store, v3), args.timeout, "the v3 rollout to end")
            halted_at = next((event["at"] for event in view.events if event["kind"] == "halted"), None)
            back = None
            if halted_at is not None:
                back = _wait(lambda: next((at for d, version, outcome, at in fleet.installs
                                           if d == canary and version == "2.0.0" and outcome == "rolled_back"), None),
                             args.timeout, "the canary to go back to v2")
            time.sleep(2 * args.poll_seconds)  # every device polls twice more after the halt
            last = fleet.snapshot(pid)
            view = show_rollout(store, v3)
            breach = min((at for d, version, _, at in fleet.windows if d == canary and version == "3.0.0"), default=None)
            outside = [d for d, version, _, _ in fleet.installs if version == "3.0.0" and d != canary]
            outside += [d for d, sha in fleet.downloads if sha == shas["3.0.0"] and d != canary]
            desired_back = {d.device_id: d.desired_version for d in view.devices if d.device_id == canary}
            result["canary_breach"] = {
                "state": view.state, "reason": view.reason, "canary": canary, "canary_p95_ms": args.canary_p95_ms,
                "deploy_to_halt_s": round(halted_at - view.created_at, 2) if halted_at else None,
                "breaching_window_to_halt_s": round(halted_at - breach, 2) if halted_at and breach else None,
                "halt_to_canary_serving_v2_s": round(back - halted_at, 2) if back else None,
                "canary_downloads_of_v3": fleet.downloads[(canary, shas["3.0.0"])],
                "canary_downloads_on_rollback": fleet.downloads[(canary, shas["2.0.0"])] - v2_downloads_before,
                "devices_outside_canary_with_v3": sorted(set(outside)),
                "started_devices_desired_after_halt": desired_back,
                "events": [f"{event['kind']}: {event['message']}" for event in view.events],
                **_between(first, last),
            }
            checks["canary breach halted the rollout in wave 1"] = view.state == "rolled_back" and view.wave == 0
            checks["zero devices outside the canary downloaded or installed v3"] = not outside
            checks["the canary's desired state went back to v2"] = desired_back == {canary: "2.0.0"}
            checks["the canary went back to v2 without a download"] = result["canary_breach"]["canary_downloads_on_rollback"] == 0
        finally:
            fleet.stop()
        result["collector_peak_rss_mb"] = round(peak_memory(pid) / (1 << 20), 1)
    store.close()
    result["requests_by_route"] = {f"{route} {status}": n for (route, status), n in sorted(fleet.requests.items())}
    result["poll_errors"] = fleet.errors[:20]
    checks["no failed request"] = not fleet.errors and all(status < 400 for _, status in fleet.requests)
    result["checks"] = checks
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return result


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def _database(kind: str, folder: Path):
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'fleet.db'}"
        return
    import pytest

    from tests.fleet.conftest import postgres_schema

    try:
        with postgres_schema() as url:
            yield url
    except pytest.skip.Exception as skipped:
        print(f"postgresql skipped: {skipped}", flush=True)
        yield None


# --------------------------------------------------------------------------- report


def print_table(document: dict) -> None:
    print(f"\n{document['settings']['devices']} devices, poll every {document['settings']['poll_seconds']:g} s, "
          f"soak {document['settings']['soak_seconds']:g} s, waves {WAVES}; load {document['host']['load_average_start']} → "
          f"{document['host']['load_average_end']}")
    header = ("backend", "rollout s", "waves s", "last install s", "collector CPU s", "CPU ms/poll", "postgres CPU s",
              "req/s", "idle ms/poll", "installed once", "halt s", "outside canary")
    print(" | ".join(header))
    for kind, row in document["backends"].items():
        if "rollout_3_waves" not in row:
            print(f"{kind} | {row.get('note', 'no result')}")
            continue
        rollout, breach, steady = row["rollout_3_waves"], row["canary_breach"], row["steady_polling"]
        print(" | ".join(str(cell) for cell in (
            kind, rollout["seconds"], "/".join(str(w["seconds"]) for w in rollout["waves"]),
            "/".join(str(w["last_install_after_s"]) for w in rollout["waves"]),
            rollout["collector_cpu_s"], rollout["collector_cpu_ms_per_poll"],
            rollout["postgres_cpu_s"] if kind == "postgresql" else "-", rollout["requests_per_s"],
            steady["collector_cpu_ms_per_poll"], f"{rollout['devices_installed_once']}/{document['settings']['devices']}",
            breach["breaching_window_to_halt_s"], len(breach["devices_outside_canary_with_v3"]))))
        failed = [name for name, ok in row["checks"].items() if not ok]
        print(f"  checks: {'all passed' if not failed else 'FAILED: ' + '; '.join(failed)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--threads", type=int, default=20, help="polling threads shared by the devices")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="each device polls this often")
    parser.add_argument("--soak-seconds", type=float, default=5.0)
    parser.add_argument("--steady-seconds", type=float, default=10.0, help="polling with nothing to install, measured")
    parser.add_argument("--gate-p95-ms", type=float, default=50.0)
    parser.add_argument("--canary-p95-ms", type=float, default=100.0, help="the canary's p95 once it runs v3")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a rollout may take before the bench gives up")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollouts.json")
    args = parser.parse_args()

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tests.support.bundles import write_tiny_bundle

    started = time.time()
    document: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                 "python": platform.python_version(), "load_average_start": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"devices": args.devices, "threads": args.threads, "poll_seconds": args.poll_seconds,
                     "soak_seconds": args.soak_seconds, "steady_seconds": args.steady_seconds, "waves": WAVES,
                     "gates": [f"p95_ms<={args.gate_p95_ms:g}"], "canary_p95_ms": args.canary_p95_ms,
                     "rollout_interval_s": ROLLOUT_INTERVAL_S, "first": "v1 to every device in one wave (soak 0)"},
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        key = Ed25519PrivateKey.generate()
        bundles = {}
        for version in VERSIONS:
            bundles[version] = Path(folder) / f"v{version}.ekb"
            write_tiny_bundle(bundles[version], key, version)
        for kind in args.backends.split(","):
            with _database(kind, Path(folder)) as url:
                if url is None:
                    document["backends"][kind] = {"note": "PostgreSQL did not answer on 127.0.0.1:5432"}
                    continue
                print(f"{kind}: running", flush=True)
                document["backends"][kind] = run_backend(url, bundles, args)
    document["host"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    document["total_seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print_table(document)
    print(f"wrote {args.out} in {document['total_seconds']:.0f} s")
    if any(not ok for row in document["backends"].values() for ok in row.get("checks", {}).values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
