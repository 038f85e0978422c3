"""The build report shows what each bundle leans on: per-class top words (text) and mean heat maps (images), computed
with occlusion on the test split, cheaply, and never failing the build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from device_agent.keys import generate_keypair
from edgekit.cli import app
from edgekit.explanations import MAX_ROWS, SECONDS, explain_test_split, report_explanations
from tests.support.builds import relaxed_target, tiny_text_build_config
from tests.support.images import build_tiny_cnn

LOOSE = {"max_accuracy_drop_points": 100.0, "min_top1_agreement": 0.0}


def _report(out: Path) -> dict:
    return json.loads((out / "x86-64-cpu-test" / "report.json").read_text())


@pytest.mark.slow
def test_a_text_report_lists_the_words_each_class_leans_on(tmp_path):
    from tests.support.tiny_bert import tiny_hf_folder

    config = tiny_text_build_config(tmp_path, tiny_hf_folder(tmp_path / "tiny-model"), [relaxed_target(tmp_path, "x86-64-cpu", **LOOSE)])
    built = CliRunner().invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert built.exit_code == 0, built.output
    report = _report(tmp_path / "out")
    explained = report["explanations"]
    assert explained["method"] == "occlusion" and explained["input_kind"] == "text"
    # Wall-clock bounds only: on a busy shared machine the time limit may stop it before MAX_ROWS.
    assert 0 < explained["rows"] <= MAX_ROWS["text"]
    assert explained["stopped_by_time"] or explained["rows"] == MAX_ROWS["text"]
    assert explained["seconds"] <= SECONDS + 5, "the time limit holds, give or take the row running when it passed"
    assert explained["execution_provider"] == "CPUExecutionProvider"
    assert explained["model_rows"] > explained["rows"], "one row per word plus one, per text"
    per_class = explained["per_class"]
    assert sum(view["rows"] for view in per_class.values()) == explained["rows"]
    listed = [word for view in per_class.values() for word in view["top_words"]]
    assert listed, per_class
    for word in listed:
        assert word["word"] == word["word"].lower() and word["count"] >= 2 and word["score"] > 0
    page = (tmp_path / "out" / "x86-64-cpu-test" / "report.html").read_text()
    assert "What the model leans on (test split)" in page and "top words" in page
    assert listed[0]["word"] in page


@pytest.mark.slow
def test_an_image_report_draws_a_mean_heat_map_per_class_in_the_page_only(tmp_path):
    build_tiny_cnn(tmp_path, ("x86-64-cpu",), classes=("horizontal", "vertical"), budgets=LOOSE,
                   train={"epochs": 8, "batch_size": 16, "learning_rate": 0.01, "augment": "none"})
    report = _report(tmp_path / "out")
    explained = report["explanations"]
    assert explained["input_kind"] == "image" and explained["rows"] == explained["rows_available"] > 0
    assert set(explained["per_class"]) <= {"horizontal", "vertical"}
    assert all(set(view) == {"rows"} for view in explained["per_class"].values()), "no pictures in report.json"
    page = (tmp_path / "out" / "x86-64-cpu-test" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(explained["per_class"])


def test_a_failure_is_reported_not_raised(tmp_path):
    from edgekit.data import Split

    key, _ = generate_keypair(tmp_path / "keys")
    (tmp_path / "broken.ekb").write_bytes(b"not a bundle")
    recorded, section = report_explanations(tmp_path / "broken.ekb", key, Split(("a text",), np.zeros(1, np.int64)))
    assert recorded is not None and recorded["error"].startswith("BundleError")
    assert "not computed" in section
    assert report_explanations(None, key, Split(("a text",), np.zeros(1, np.int64))) == (None, "")


def test_the_report_runs_the_bundle_on_the_cpu_provider_only(tmp_path, monkeypatch):
    """A bundle for a GPU target names TensorRT first: the report must not spend minutes building an engine."""
    import onnxruntime

    from device_agent.bundle import RuntimeInfo, write_bundle
    from device_agent.keys import load_private_key
    from edgekit.data import Split
    from tests.support.bundles import tiny_table_rows, write_tiny_table_bundle

    key_file, _ = generate_keypair(tmp_path / "keys")
    key = load_private_key(key_file)
    manifest = write_tiny_table_bundle(tmp_path / "cpu.ekb", key)
    gpu_providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    payload = tmp_path / "cpu-payload"
    write_bundle(tmp_path / "gpu.ekb", manifest.model_copy(update={"runtime": RuntimeInfo(
        engine="tensorrt", execution_providers=gpu_providers, model_file="model.onnx")}),
        {"model.onnx": payload / "model.onnx", "golden.npz": payload / "golden.npz"}, key)
    asked: list[list[str]] = []
    real_session = onnxruntime.InferenceSession

    def recording_session(path, sess_options=None, providers=()):  # as if this host had a GPU and TensorRT
        asked.append([name if isinstance(name, str) else name[0] for name in providers])
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: gpu_providers)
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    rows = tiny_table_rows(6)
    explained = explain_test_split(tmp_path / "gpu.ekb", key_file, Split(tuple(rows), np.zeros(len(rows), np.int64)))
    assert explained is not None and explained.rows == 6
    assert asked == [["CPUExecutionProvider"]]


def test_explain_out_writes_every_word_whatever_top_says(tmp_path):
    """--out is the JSON explanation: every word, with or without --json; --top shortens only what is printed."""
    from typer.testing import CliRunner

    from device_agent.explain import words
    from device_agent.keys import load_private_key
    from edgekit.cli import app
    from tests.support.bundles import write_tiny_text_bundle

    key_file, _ = generate_keypair(tmp_path / "keys")
    write_tiny_text_bundle(tmp_path / "text.ekb", load_private_key(key_file))
    text = "the small grey cat slept on the warm red mat all day"
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "text.ekb"), "--text", text, "--top", "2",
                                      "--out", str(tmp_path / "why.json"), "--keyring", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "why.json").read_text())
    assert [token["token"] for token in written["tokens"]] == [word for word, _, _ in words(text)]
    assert len([line for line in result.stdout.splitlines() if line.startswith("  ") and line.strip()[0] in "+-"]) == 2
