"""The closed drift loop with real processes: a device drifts on text of a new domain, its captured samples are exported
(with their attributions) and labelled, `edgekit retrain` builds a challenger, `edgekit compare` says promote with the
numbers, and the challenger is installed on the device, which then gets the new domain right.

The champion is the tiny BERT on the embedded demo data (WordNet glosses in eight classes), built head-only. The new
domain is a jargon the glosses never use: long texts of made-up words where a class's own terms make up a third of the
words (``_new_domain``); the champion cannot know them, a model trained on labelled examples of them can. The test plays
the person who labels the exported samples: it knows each text's class from the generator.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.config import BuildConfig
from edgekit.tasks.text_classification import load_task_data
from tests.fleet.conftest import collector_process
from tests.support.agent import AgentProcess
from tests.support.builds import relaxed_target, tiny_text_build_config

runner = CliRunner()
DEVICE = "kiosk-07"
WINDOW = 100

# Each class of the new domain has its own terms; the filler is shared by all of them.
TERMS = {
    "animal": ["vorkel", "snibbet", "gruntlow"],
    "food": ["plimsa", "trebbick", "quorndle"],
    "plant": ["feznock", "drumbly", "yarrowix"],
}
FILLER = ["zet", "quib", "lorvath", "mimsk", "tarrowe", "blenk", "ossip", "wendra", "clunth", "pivvy"]


def _new_domain(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """(text, label) pairs: 30 to 50 words, a third of them the label's terms, the rest shared filler."""
    labels = sorted(TERMS)
    rows = []
    for index in range(count):
        label = labels[index % len(labels)]
        length = int(rng.integers(30, 50))
        words = [rng.choice(TERMS[label]) if rng.random() < 1 / 3 else rng.choice(FILLER) for _ in range(length)]
        rows.append((" ".join(words), label))
    return rows


def _label_of(text: str) -> str:
    """The person labelling an exported sample: the class whose terms it uses."""
    counts = {label: sum(text.split().count(term) for term in terms) for label, terms in TERMS.items()}
    return max(counts, key=counts.__getitem__)


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    return path


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _ask(agent_url: str, texts: list[str]) -> list[str]:
    """The served model's predicted labels, one request per text (so every text is captured)."""
    answers = []
    for text in texts:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}],
                "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}
        response = httpx.post(f"{agent_url}/v2/models/tiny/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        answers.append(response.json()["outputs"][0]["data"][0].split(":")[-1])
    return answers


@pytest.mark.slow
def test_a_drifting_device_gets_a_retrained_challenger_that_compare_promotes(tmp_path):
    from tests.support.tiny_bert import tiny_hf_folder

    cache = tmp_path / "cache"
    target = relaxed_target(tmp_path, "x86-64-cpu", max_accuracy_drop_points=100.0, min_top1_agreement=0.0)
    config = tiny_text_build_config(tmp_path, tiny_hf_folder(tmp_path / "tiny-model"), [target])
    built = runner.invoke(app, ["build", str(config), "--out", str(tmp_path / "champion"), "--cache-dir", str(cache)])
    assert built.exit_code == 0, built.output
    champion = tmp_path / "champion" / "x86-64-cpu-test" / "tiny-1.0.0.ekb"
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(cache / "dev-key" / "edgekit.pub", keyring / "build-host.pub")

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    added = runner.invoke(app, ["fleet", "devices", "add", DEVICE, "--db", db_url])
    assert added.exit_code == 0, added.output
    (tmp_path / "device.token").write_text(added.stdout.strip() + "\n")

    rng = np.random.default_rng(11)
    drifted_traffic = _new_domain(rng, 3 * WINDOW)
    held_out = _new_domain(np.random.default_rng(12), 240)  # the drifted slice compare judges on: never trained on
    demo = load_task_data(BuildConfig().data)
    original_test = _write_jsonl(tmp_path / "original-test.jsonl", list(zip(demo.test.texts, [demo.labels[i] for i in demo.test.labels])))
    drifted_slice = _write_jsonl(tmp_path / "drifted-slice.jsonl", held_out)

    with collector_process(db_url) as collector:
        (tmp_path / "device").mkdir()
        agent = AgentProcess(tmp_path / "device", keyring, telemetry_url=collector.url, device_id=DEVICE,
                             device_token_file=tmp_path / "device.token", window_size=WINDOW, window_seconds=3600,
                             capture_every=1, capture_max_samples=WINDOW).start()
        agent_url, admin_token = agent.url, tmp_path / "device" / "admin.token"
        try:
            flashed = runner.invoke(app, ["flash", str(champion), "--device", agent_url, "--token-file", str(admin_token)])
            assert flashed.exit_code == 0, flashed.output

            # The device meets the new domain: every window drifts, the second raises the alert.
            _ask(agent_url, [text for text, _ in drifted_traffic])
            report = None

            def alerted() -> bool:
                nonlocal report
                shown = runner.invoke(app, ["fleet", "report", "--db", db_url, "--json"])
                report = json.loads(shown.stdout)["devices"][0] if shown.exit_code == 0 else None
                return report is not None and report["windows"] >= 3

            _wait_for(alerted, 60, "three windows at the collector")
            assert report["status"] == "alert", report

            # Its samples are exported with the champion's attributions, and a person labels them.
            exported = tmp_path / "captured.jsonl"
            export = runner.invoke(app, ["fleet", "export-samples", "--device", DEVICE, "--out", str(exported), "--db", db_url,
                                         "--bundle", str(champion), "--keyring", str(keyring)])
            assert export.exit_code == 0, export.output
            captured = [json.loads(line) for line in exported.read_text().splitlines()]
            assert len(captured) == 3 * WINDOW, "capture kept every drifted request"
            leaning = [row for row in captured if row["attributions"]]  # positive scores only: a row may have none
            assert len(leaning) >= 0.9 * len(captured), "exported samples say which words the champion leaned on"
            assert all(row["explained_label"] for row in captured)
            labelled = tmp_path / "labelled.jsonl"
            labelled.write_text("".join(json.dumps({**row, "label": _label_of(row["text"])}) + "\n" for row in captured))

            # A challenger from the champion's own config, with the labelled samples merged in.
            retrained = runner.invoke(app, ["retrain", "--from", str(tmp_path / "champion"), "--add-data", str(labelled),
                                            "--out", str(tmp_path / "challenger"), "--cache-dir", str(cache)])
            assert retrained.exit_code == 0, retrained.output
            challenger = tmp_path / "challenger" / "x86-64-cpu-test" / "tiny-1.0.1.ekb"
            assert challenger.is_file(), retrained.output

            # Compare on the champion's test split and on held-out text of the new domain: promote.
            compared = runner.invoke(app, ["compare", str(champion), str(challenger), "--data", str(original_test),
                                           "--data", str(drifted_slice), "--keyring", str(keyring), "--json"])
            assert compared.exit_code == 0, compared.output
            verdict = json.loads(compared.stdout)
            assert verdict["verdict"] == "promote", verdict
            original, drifted = verdict["slices"]
            assert drifted["rows"] == len(held_out)
            assert drifted["challenger"]["accuracy"] >= drifted["champion"]["accuracy"] + 0.3, drifted
            assert drifted["p_value"] < 0.001, drifted
            assert not (original["significant"] and original["better"] == "champion"), original

            # The promoted challenger goes onto the device, which now gets the new domain right.
            flashed = runner.invoke(app, ["flash", str(challenger), "--device", agent_url, "--token-file", str(admin_token)])
            assert flashed.exit_code == 0, flashed.output
            assert "tiny 1.0.1" in flashed.output
            truth = [label for _, label in held_out]
            after = _ask(agent_url, [text for text, _ in held_out])
            # On the held-out slice: the champion as compare measured it (sending it to the device would capture it too).
            after_accuracy = np.mean([a == b for a, b in zip(after, truth)])
            assert after_accuracy >= drifted["champion"]["accuracy"] + 0.3, (drifted["champion"], after_accuracy)
            assert after_accuracy == pytest.approx(drifted["challenger"]["accuracy"], abs=0.02), "the device serves what compare judged"
        finally:
            agent.stop()
