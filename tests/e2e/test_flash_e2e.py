"""Build side to device: `edgekit flash` to a real agent process, predictions over tritonclient, refusals, rollback."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from device_agent.bundle import write_bundle
from edgekit.cli import app
from tests.support.agent import ADMIN_TOKEN, MODEL, AgentProcess
from tests.support.bundles import (
    LABELS, build_corpus, tiny_manifest, tiny_payload, write_golden, write_tiny_bundle, write_tiny_classifier,
)

runner = CliRunner()


@pytest.fixture
def agent(tmp_path, keyring_dir):
    process = AgentProcess(tmp_path, keyring_dir).start()
    yield process
    process.stop()


def _flash(bundle: Path, agent: AgentProcess, *extra: str):
    token = agent.workdir / "admin.token"
    return runner.invoke(app, ["flash", str(bundle), "--device", agent.url, "--token-file", str(token), *extra])


def _predict(agent: AgentProcess, x: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    client = triton.InferenceServerClient(agent.url.removeprefix("http://"))
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary, tritonclient's default
    logits = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits")]).as_numpy("logits")
    top = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits", class_count=1)]).as_numpy("logits")
    return logits, [row[0] for row in top]


@pytest.mark.slow
def test_flash_serve_refuse_and_roll_back(tmp_path, agent, signing_key):
    v1 = tmp_path / "v1" / "tiny.ekb"
    write_tiny_bundle(v1, signing_key, "1.0.0")
    result = _flash(v1, agent)
    assert result.exit_code == 0, result.output
    assert f"now serves {MODEL} 1.0.0" in result.stdout

    x = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    reference = onnxruntime.InferenceSession(str(tmp_path / "v1" / "tiny-payload" / "model.onnx")).run(None, {"x": x})[0]
    logits, top = _predict(agent, x)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)
    assert [entry.decode().split(":")[2] for entry in top] == [LABELS[i] for i in reference.argmax(1)]

    # A tampered bundle and one whose golden vectors fail here are refused; 1.0.0 keeps serving.
    tampered = {case.name: case for case in build_corpus(tmp_path / "corpus", signing_key, Ed25519PrivateKey.generate())}
    for name in ("model-byte-flip", "untrusted-key", "dotdot-entry"):
        refused = _flash(tampered[name].path, agent)
        assert refused.exit_code == 2 and "refused the bundle" in refused.stderr, refused.output
    payload = tiny_payload(tmp_path / "bad-golden")
    with np.load(payload["golden.npz"]) as data:
        arrays = dict(data)
    np.savez(payload["golden.npz"], **{**arrays, "output:logits": arrays["output:logits"] + 1.0})
    bad_golden = tmp_path / "bad-golden.ekb"
    write_bundle(bad_golden, tiny_manifest("1.1.0"), payload, signing_key)
    refused = _flash(bad_golden, agent)
    assert refused.exit_code == 2 and "golden" in refused.stderr
    np.testing.assert_allclose(_predict(agent, x)[0], reference, rtol=1e-5, atol=1e-6)

    # Upgrade, then roll back through the admin API.
    v2_dir = tmp_path / "v2"
    v2_dir.mkdir()
    model = write_tiny_classifier(v2_dir, seed=5)  # other weights: predictions change visibly
    v2_payload = {"model.onnx": model, "golden.npz": write_golden(v2_dir, model)}
    v2 = v2_dir / "tiny-2.ekb"
    write_bundle(v2, tiny_manifest("2.0.0"), v2_payload, signing_key)
    assert _flash(v2, agent).exit_code == 0
    assert not np.allclose(_predict(agent, x)[0], reference)
    rolled = httpx.post(f"{agent.url}/admin/models/{MODEL}/rollback", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert rolled.status_code == 200, rolled.text
    np.testing.assert_allclose(_predict(agent, x)[0], reference, rtol=1e-5, atol=1e-6)
    shutil.rmtree(tmp_path / "corpus")
