"""``edgekit fleet export-samples --bundle``: each exported sample with the words or regions its prediction rests on."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from device_agent.telemetry_schema import UploadBatch
from edgekit.cli import app
from edgekit.fleet.store import Store
from tests.fleet.conftest import make_window
from tests.support.bundles import LABELS

runner = CliRunner()
TEXT_MODEL = {"name": "tiny-text", "version": "1.0.0"}


def _store_with(tmp_path: Path, device: str, windows: list) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(url)
    store.add_device(device)
    store.ingest(UploadBatch(device_id=device, windows=windows))
    store.close()
    return url


def _text_samples(texts: list[str], label: str = "dog") -> list[dict]:
    return [{"captured_at": float(index), "text": text, "predicted": label} for index, text in enumerate(texts)]


def _export(url: str, device: str, out: Path, *extra: str):
    return runner.invoke(app, ["fleet", "export-samples", "--device", device, "--out", str(out), "--db", url, *extra])


def test_text_rows_carry_their_top_words_and_still_build(tmp_path: Path, signed):
    from edgekit.config import BuildConfig
    from edgekit.retrain import read_labelled
    from edgekit.tasks.text_data import load_dataset

    current = [f"the {animal} slept in the sun number {i}" for i, animal in enumerate(["cat", "dog", "bird"] * 4)]
    older = ["captured by the previous version"]
    url = _store_with(tmp_path, "dev-1", [
        make_window(0, model=TEXT_MODEL, samples=_text_samples(current[:6], "cat")),
        make_window(1, model={"name": "tiny-text", "version": "0.9.0"}, samples=_text_samples(older)),
        make_window(2, model=TEXT_MODEL, samples=_text_samples(current[6:], "dog") + _text_samples([""], "bird")),
    ])
    out = tmp_path / "retrain.jsonl"
    result = _export(url, "dev-1", out, "--bundle", str(signed["text"]), "--keyring", str(signed["keyring"]))
    assert result.exit_code == 0, result.output
    said = re.sub(r"\s+", " ", result.stdout)
    assert "attributions from tiny-text 1.0.0 for 12 of 14" in said
    assert "1 were captured with another model or version" in said and "1 had nothing the model could explain" in said
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["text"] for row in rows] == current[:6] + older + current[6:] + [""]
    explained = [row for row in rows if "attributions" in row]
    assert [row["text"] for row in explained] == current
    for row in explained:
        scores = [item["score"] for item in row["attributions"]]
        assert len(scores) <= 5 and scores == sorted(scores, reverse=True) and all(score > 0 for score in scores)
        assert all(item["token"] in row["text"].split() for item in row["attributions"])
        assert row["explained_label"] in LABELS, "the class the bundle explained"
    # The build's reader and retrain --add-data's take the rows as they are: the extra key is ignored.
    dataset = load_dataset(out)
    assert dataset.labels == ("cat", "dog")
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == len(rows) - 1, "all but the empty text"
    examples, _ = read_labelled(out, BuildConfig().data)
    assert len(examples) == len(rows) - 1


def test_only_supporting_words_are_written_with_the_class_the_bundle_explained(tmp_path: Path):
    """Fewer than five words support the prediction: the others (against it, neutral, past max_length) are not
    support. The bundle may explain another class than the device predicted: the row says which."""
    from collections import Counter
    from types import SimpleNamespace

    from device_agent.explain import Explanation, Piece
    from device_agent.telemetry_schema import CapturedSample
    from edgekit.fleet.export import export_samples
    from edgekit.fleet.store import WindowedSample

    words = [("urgent", 0.30), ("refund", -0.10), ("for", 0.0), ("the", 0.05), ("invoice", -0.40), ("now", 0.0, False)]
    explanation = Explanation("billing", 1, 0.6, "occlusion", 7, 1.0,
                              [Piece(word, score, 0, 1, *rest) for word, score, *rest in words])

    class OneAnswer:  # what SampleExplainer offers export_samples, answering with ``explanation``
        classifier = SimpleNamespace(input_kind="text")
        counts: Counter = Counter(explained=1)
        first_problem = None

        def explain(self, windowed, item):
            return explanation

    sample = CapturedSample(captured_at=1.0, text="urgent refund for the invoice now", predicted="shipping")
    out = tmp_path / "rows.jsonl"
    export_samples([WindowedSample(sample, 0, "tiny-text", "1.0.0", True, True)], out, device="dev-1", explainer=OneAnswer())
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["attributions"] == [{"token": "urgent", "score": 0.3}, {"token": "the", "score": 0.05}]
    assert (row["label"], row["explained_label"]) == ("shipping", "billing")


def test_without_a_bundle_no_attributions_are_written(tmp_path: Path):
    url = _store_with(tmp_path, "dev-1", [make_window(0, model=TEXT_MODEL, samples=_text_samples(["a plain text"]))])
    out = tmp_path / "plain.jsonl"
    result = _export(url, "dev-1", out)
    assert result.exit_code == 0, result.output
    assert "attributions" not in out.read_text() and "attributions" not in result.stdout
    wide = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}  # no option row wraps
    help_text = re.sub(r"\s+", " ", runner.invoke(app, ["fleet", "export-samples", "--help"], env=wide).output)
    assert "Without it, no attributions are written" in help_text


def test_images_get_attributions_jsonl_beside_the_class_folders(tmp_path: Path, signed):
    from edgekit.config import ImageSection
    from edgekit.tasks.image_data import _folder_dataset

    rng = np.random.default_rng(2)
    pictures = [rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8) for _ in range(8)]
    samples = [{"captured_at": 1.0, "predicted": "a" if index % 2 else "b",
                "image": {"shape": list(picture.shape), "data_base64": base64.b64encode(picture.tobytes()).decode()}}
               for index, picture in enumerate(pictures)]
    url = _store_with(tmp_path, "cam-1", [make_window(0, model={"name": "tiny-cnn", "version": "1.0.0"}, samples=samples)])
    out = tmp_path / "images"
    result = _export(url, "cam-1", out, "--bundle", str(signed["image"]), "--keyring", str(signed["keyring"]))
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["a", "attributions.jsonl", "b"]
    lines = [json.loads(line) for line in (out / "attributions.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    for line in lines:
        assert (out / line["file"]).is_file() and line["label"] in ("a", "b", "c")
        assert line["view"] == [8, 8] and len(line["top_regions"]) <= 5
        assert all(region["score"] > 0 for region in line["top_regions"]), "supporting regions only"
    # The image reader takes class folders only: the file at the root is not a training image.
    splits, cleaning, _ = _folder_dataset(out, ImageSection(size=(8, 8)))
    assert cleaning["rows_read"] == cleaning["rows_kept"] == 8 and not cleaning["dropped"]


def test_a_bundle_of_another_kind_is_refused(tmp_path: Path, signed):
    url = _store_with(tmp_path, "dev-1", [make_window(0, model=TEXT_MODEL, samples=_text_samples(["some words"]))])
    result = _export(url, "dev-1", tmp_path / "out", "--bundle", str(signed["image"]), "--keyring", str(signed["keyring"]))
    assert result.exit_code == 2
    assert "tiny-cnn 1.0.0 takes image input, but 'dev-1' captured texts" in re.sub(r"\s+", " ", result.stderr)


def test_samples_come_with_their_windows_model_and_drift_verdict(store):
    """On SQLite and PostgreSQL: the filters the export and the HTML report use."""

    def window(sequence: int, version: str, drifting: bool | None):  # None: too small to judge
        scores = {} if drifting is None else {"f0": {"psi": 0.6 if drifting else 0.01, "js": 0.05, "drifting": drifting}}
        return make_window(sequence, model={"name": "tiny-text", "version": version}, scores=scores, drifting=bool(drifting),
                           alert=False, samples=_text_samples([f"window {sequence} sample {i}" for i in range(2)]))

    store.add_device("dev-1")
    store.ingest(UploadBatch(device_id="dev-1", windows=[window(0, "1.0.0", False), window(1, "1.0.0", None),
                                                         window(2, "0.9.0", True), window(3, "1.0.0", True)]))
    every, skipped = store.fetch_samples("dev-1")
    assert skipped == 0 and [(s.sequence, s.model_version, s.drifting, s.judged) for s in every[::2]] == [
        (0, "1.0.0", False, True), (1, "1.0.0", False, False), (2, "0.9.0", True, True), (3, "1.0.0", True, True)]
    texts = lambda found: [s.sample.text for s in found[0]]  # noqa: E731
    current = ("tiny-text", "1.0.0")
    assert texts(store.fetch_samples("dev-1", model=current, drifting=True)) == ["window 3 sample 0", "window 3 sample 1"]
    assert texts(store.fetch_samples("dev-1", model=current, drifting=False)) == ["window 0 sample 0", "window 0 sample 1"]
    assert texts(store.fetch_samples("dev-1", drifting=True, newest=3)) == ["window 2 sample 1", "window 3 sample 0", "window 3 sample 1"]
    assert texts(store.fetch_samples("dev-1", since=1_700_000_000.0 + 60 * 3 + 60)) == ["window 3 sample 0", "window 3 sample 1"]
