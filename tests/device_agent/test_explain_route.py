"""``POST /v2/models/{name}/explain`` on a real agent: off by default, the infer request's raw inputs, numpy only."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from device_agent.bundle import open_bundle
from device_agent.classifier import classifier_of_bundle
from device_agent.explain import explain, words
from device_agent.keys import Keyring, load_private_key
from device_agent.server import EXPLAIN_OFF, EXPLAIN_WAITING, MAX_EXPLAIN_ROWS
from tests.support.agent import MODEL, LiveAgent, live_agent
from tests.support.bundles import write_tiny_image_bundle, write_tiny_table_bundle, write_tiny_text_bundle

TEXTS = ["a quiet morning by the river", "the dog barked at the mail carrier, twice!"]
ROWS = [{"age": 63, "hours per week": 50.5, "job": "manager"}, {"age": 18.5, "job": "clerk"}]


def _install(agent: LiveAgent, bundle: Path) -> None:
    answer = httpx.post(f"{agent.url}/admin/models", content=bundle.read_bytes(), headers=agent.admin_headers, timeout=60)
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    """One agent with explanations on, serving a text, a table, an image and a raw-tensor model."""
    workdir = tmp_path_factory.mktemp("explaining-agent")
    with live_agent(workdir, explain=True) as running:
        key = load_private_key(workdir / "keys" / "edgekit.key")
        bundles = workdir / "bundles"
        bundles.mkdir()
        for name, write in (("text", write_tiny_text_bundle), ("table", write_tiny_table_bundle), ("image", write_tiny_image_bundle)):
            write(bundles / f"{name}.ekb", key)
            _install(running, bundles / f"{name}.ekb")
        assert running.install("1.0.0").status_code == 200  # the tiny raw-tensor classifier
        yield running


def _explain(agent: LiveAgent, model: str, body: dict, version: str | None = None) -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/explain"
    return httpx.post(f"{agent.url}{path}", json=body, timeout=60)


def _texts(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


def _in_process(agent: LiveAgent, bundle: str, item):
    """The same explanation computed here from the signed bundle: what the agent must answer."""
    with open_bundle(agent.workdir / "bundles" / f"{bundle}.ekb", Keyring.load(agent.settings.keyring_dir)) as opened:
        return explain(classifier_of_bundle(opened), item)


def _metric(agent: LiveAgent, line_start: str) -> float:
    found = [line for line in httpx.get(f"{agent.url}/metrics").text.splitlines() if line.startswith(line_start)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def test_texts_get_every_word_scored_as_the_bundle_scores_it(agent: LiveAgent):
    answer = _explain(agent, "tiny-text", {"id": "r1", **_texts(TEXTS)})
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert (document["model_name"], document["model_version"], document["id"]) == ("tiny-text", "1.0.0", "r1")
    assert len(document["explanations"]) == 2
    for text, got in zip(TEXTS, document["explanations"]):
        assert [token["token"] for token in got["tokens"]] == [word for word, _, _ in words(text)]
        expected = _in_process(agent, "text", text)
        assert got["label"] == expected.label and got["method"] == "occlusion"
        assert got["rows_run"] == len(words(text)) + 1
        assert [t["score"] for t in got["tokens"]] == pytest.approx([p.score for p in expected.pieces], abs=1e-4)


def test_an_explanation_counts_apart_from_inference(agent: LiveAgent):
    labels = 'model="tiny-text",version="1.0.0"'
    served_before = _metric(agent, f"nv_inference_request_success{{{labels}}}")
    explained_before = _metric(agent, f'edgekit_explain_requests_total{{{labels},result="success"}}')
    refused_before = _metric(agent, f'edgekit_explain_requests_total{{{labels},result="refused"}}')
    rows_before = _metric(agent, f"edgekit_explain_model_rows_total{{{labels}}}")
    assert _explain(agent, "tiny-text", _texts(["one two three"])).status_code == 200
    assert _explain(agent, "tiny-text", _texts([""])).status_code == 400
    assert _metric(agent, f'edgekit_explain_requests_total{{{labels},result="success"}}') == explained_before + 1
    assert _metric(agent, f'edgekit_explain_requests_total{{{labels},result="refused"}}') == refused_before + 1
    assert _metric(agent, f"edgekit_explain_model_rows_total{{{labels}}}") == rows_before + 4
    assert _metric(agent, f"nv_inference_request_success{{{labels}}}") == served_before, "not inference traffic"


def test_table_rows_get_every_column_scored(agent: LiveAgent):
    body = {"inputs": [{"name": "rows", "datatype": "BYTES", "shape": [2], "data": ROWS}]}
    answer = _explain(agent, "tiny-table", body, version="1.0.0")
    assert answer.status_code == 200, answer.text
    for row, got in zip(ROWS, answer.json()["explanations"]):
        assert [column["token"] for column in got["columns"]] == ["age", "hours per week", "job"]
        assert got["rows_run"] == 4
        expected = _in_process(agent, "table", row)
        assert [c["score"] for c in got["columns"]] == pytest.approx([p.score for p in expected.pieces], abs=1e-5)
    assert answer.json()["explanations"][0]["label"] == "high"  # the model leans on age


def test_images_get_a_heat_map_as_numbers_and_their_top_regions(agent: LiveAgent):
    images = np.random.default_rng(7).integers(0, 256, size=(2, 9, 11, 3), dtype=np.uint8)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}]}
    answer = _explain(agent, "tiny-cnn", body)
    assert answer.status_code == 200, answer.text
    for image, got in zip(images, answer.json()["explanations"]):
        heatmap = got["heatmap"]
        assert heatmap["shape"] == [8, 8] and np.asarray(heatmap["values"]).shape == (8, 8)
        expected = _in_process(agent, "image", image)
        np.testing.assert_allclose(heatmap["values"], np.round(expected.heatmap, 4), atol=2e-4)
        assert len(heatmap["top_regions"]) == 5 and set(heatmap["top_regions"][0]) == {"row", "col", "score"}


@pytest.mark.parametrize(("model", "body", "status", "message"), [
    ("tiny-text", _texts(["fine", ""]), 400, "input 1: the text holds no words"),
    ("tiny-text", _texts(["?!"] * 1 + ["word"] * MAX_EXPLAIN_ROWS), 413, f"at most {MAX_EXPLAIN_ROWS}"),
    ("tiny-text", {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [101, 7592, 102]},
                              {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]},
                              {"name": "token_type_ids", "datatype": "INT64", "shape": [1, 3], "data": [0, 0, 0]}]},
     400, "explanations take the raw 'text' input"),
    ("tiny-text", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}]}, 400, "must be strings"),
    ("tiny-table", {"inputs": [{"name": "rows", "datatype": "BYTES", "shape": [1], "data": ["{not json"]}]}, 400, "row 0 is not a JSON object"),
    (MODEL, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}, 400, "takes raw tensors"),
    ("no-such-model", _texts(["hello"]), 404, "unknown model"),
], ids=["empty-text", "too-many-rows", "tensors", "not-a-string", "bad-row", "tensor-bundle", "unknown-model"])
def test_bad_requests_get_a_clear_error(agent: LiveAgent, model: str, body: dict, status: int, message: str):
    answer = _explain(agent, model, body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_the_response_is_built_in_the_explain_thread_not_on_the_event_loop(agent: LiveAgent, monkeypatch: pytest.MonkeyPatch):
    import device_agent.server

    threads = []
    real = device_agent.server.explanation_json
    monkeypatch.setattr(device_agent.server, "explanation_json",
                        lambda explanation: threads.append(threading.current_thread().name) or real(explanation))
    images = np.random.default_rng(8).integers(0, 256, size=(2, 9, 11, 3), dtype=np.uint8)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}]}
    answer = _explain(agent, "tiny-cnn", body)
    assert answer.status_code == 200, answer.text
    assert len(threads) == 2 and all(name.startswith("edgekit-explain") for name in threads), threads


def test_explanations_queue_on_their_own_and_never_take_inferences_work_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two work slots for inference; explanations held in the explain thread: the running one and the
    ``EXPLAIN_WAITING`` behind it are admitted, /infer still answers, and one more explain request gets 503."""
    import device_agent.server

    release, admitted = threading.Event(), []
    real_explain, real_inputs = device_agent.server.explain_input, device_agent.server.raw_inputs

    def slow_explain(classifier, item):
        assert release.wait(30), "the test never released the explanations"
        return real_explain(classifier, item)

    def counted_inputs(decoded, classifier):  # called once a request holds an explain slot
        admitted.append(time.monotonic())
        return real_inputs(decoded, classifier)

    monkeypatch.setattr(device_agent.server, "explain_input", slow_explain)
    monkeypatch.setattr(device_agent.server, "raw_inputs", counted_inputs)
    rows = {"inputs": [{"name": "rows", "datatype": "BYTES", "shape": [1], "data": ROWS[:1]}]}
    infer_body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, 0.4]}]}
    labels = 'model="tiny-table",version="1.0.0"'
    with live_agent(tmp_path, explain=True, max_concurrent_requests=2) as running, ThreadPoolExecutor(1 + EXPLAIN_WAITING) as clients:
        write_tiny_table_bundle(tmp_path / "table.ekb", load_private_key(tmp_path / "keys" / "edgekit.key"))
        _install(running, tmp_path / "table.ekb")
        assert running.install("1.0.0").status_code == 200
        try:
            queued = [clients.submit(_explain, running, "tiny-table", rows) for _ in range(1 + EXPLAIN_WAITING)]
            deadline = time.monotonic() + 20
            while len(admitted) < 1 + EXPLAIN_WAITING and time.monotonic() < deadline and not any(f.done() for f in queued):
                time.sleep(0.01)
            assert len(admitted) == 1 + EXPLAIN_WAITING, [f.result().text for f in queued if f.done()]
            for _ in range(3):  # inference keeps its slots while explanations run and wait
                answer = httpx.post(f"{running.url}/v2/models/{MODEL}/infer", json=infer_body, timeout=10)
                assert answer.status_code == 200, answer.text
            beyond = _explain(running, "tiny-table", rows)
            assert beyond.status_code == 503 and beyond.headers["retry-after"] == "1"
            assert "explain queue limit" in beyond.json()["error"] and f"{EXPLAIN_WAITING} may wait" in beyond.json()["error"]
        finally:
            release.set()
        assert [f.result(timeout=30).status_code for f in queued] == [200] * (1 + EXPLAIN_WAITING)
        assert _metric(running, f'edgekit_explain_requests_total{{{labels},result="refused"}}') == 1
        assert _metric(running, f'edgekit_explain_requests_total{{{labels},result="error"}}') == 0
        assert _metric(running, f'edgekit_explain_requests_total{{{labels},result="success"}}') == 1 + EXPLAIN_WAITING


def test_explanations_are_off_by_default(tmp_path: Path):
    with live_agent(tmp_path) as running:
        assert running.install("1.0.0").status_code == 200
        for path in (f"/v2/models/{MODEL}/explain", f"/v2/models/{MODEL}/versions/1.0.0/explain"):
            answer = httpx.post(f"{running.url}{path}", json=_texts(["hello"]), timeout=30)
            assert (answer.status_code, answer.json()) == (404, {"error": EXPLAIN_OFF})
        assert "edgekit_explain" not in httpx.get(f"{running.url}/metrics").text


def test_serve_explain_flag_turns_them_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import device_agent.server
    from device_agent.cli import app

    started = []
    monkeypatch.setattr(device_agent.server, "run_server", started.append)
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    common = ["serve", "--state-dir", str(tmp_path / "state"), "--keyring", str(keyring)]
    for flags in ([], ["--explain"]):
        result = CliRunner().invoke(app, common + flags)
        assert result.exit_code == 0, result.output
    assert [settings.explain for settings in started] == [False, True]
    help_text = re.sub(r"\s+", " ", CliRunner().invoke(app, ["serve", "--help"]).output)
    assert "--explain" in help_text
