"""The HTML report (self-contained; rendered by headless Chromium) and export-samples read back by the build's readers."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from device_agent.telemetry_schema import UploadBatch
from edgekit.cli import app
from edgekit.fleet.store import Store
from tests.fleet.conftest import make_window
from tests.support.browser import screenshot

runner = CliRunner()


def _fleet(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(url)
    rng = np.random.default_rng(0)
    for index, device in enumerate(("jetson-01", "jetson-02", "pi-07")):
        store.add_device(device)
        windows = []
        for sequence in range(40):
            drifting = device == "jetson-02" and sequence >= 30
            windows.append(make_window(
                sequence,
                model={"name": "clf", "version": "1.1.0" if index < 2 else "1.0.0"},
                latency={"p50_ms": 2.0, "p95_ms": float(5 + index + rng.random())},
                scores={"f0": {"psi": 0.6 if drifting else float(rng.random() * 0.05), "js": 0.05, "drifting": drifting}},
                drifting=drifting, alert=drifting and sequence >= 31, top_features=["f0"] if drifting else [],
            ))
        store.ingest(UploadBatch(device_id=device, windows=windows))
    store.close()
    return url


def test_the_html_report_is_one_self_contained_file_with_three_plots(tmp_path):
    url = _fleet(tmp_path)
    page = tmp_path / "fleet.html"
    result = runner.invoke(app, ["fleet", "report", "--db", url, "--html", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert not re.search(r'(src|href)="(https?:)?//', html), "nothing is fetched from the network"
    assert "jetson-02" in html and "alert" in html and "clf 1.1.0" in html.replace("\n", " ").replace("  ", " ")


@pytest.mark.browser
def test_headless_chromium_renders_the_html_report(tmp_path):
    url = _fleet(tmp_path)
    page = tmp_path / "fleet.html"
    assert runner.invoke(app, ["fleet", "report", "--db", url, "--html", str(page)]).exit_code == 0
    image = screenshot(page, tmp_path)
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "a rendered page with tables and plots, not a blank one"
    # The drift plot sits below the tables: the lower half of the page is drawn on too.
    lower = image.crop((0, 1000, 1280, 2000)).getcolors(maxcolors=1 << 20)
    assert lower is not None and len(lower) > 20


def _ingest_samples(url: str, device: str, samples: list[dict]) -> None:
    store = Store.open(url)
    store.add_device(device)
    for start in range(0, len(samples), 10):
        store.ingest(UploadBatch(device_id=device, windows=[make_window(start, samples=samples[start:start + 10])]))
    store.close()


def test_exported_text_samples_are_a_dataset_the_build_reads(tmp_path):
    from edgekit.tasks.text_data import load_dataset

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    samples = [{"captured_at": float(i), "text": f"sample text number {i}", "predicted": "pos" if i % 2 else "neg"} for i in range(40)]
    samples.append({"captured_at": 99.0, "text": "nobody labelled me"})
    _ingest_samples(url, "dev-1", samples)
    out = tmp_path / "retrain.jsonl"
    result = runner.invoke(app, ["fleet", "export-samples", "--device", "dev-1", "--out", str(out), "--db", url])
    assert result.exit_code == 0, result.output
    assert "41 samples" in result.stdout and "1 without a predicted label" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["text"] for row in rows] == [s["text"] for s in samples]
    dataset = load_dataset(out)
    assert dataset.labels == ("neg", "pos")
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 40
    again = runner.invoke(app, ["fleet", "export-samples", "--device", "dev-1", "--out", str(out), "--db", url])
    assert again.exit_code == 2 and "--force" in again.stderr


def test_exported_image_samples_are_one_folder_of_pngs_per_label(tmp_path):
    from PIL import Image

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8) for _ in range(4)] + [rng.integers(0, 256, size=(5, 5), dtype=np.uint8)]
    labels = ["shirt", "shoe", "shirt", "bag/../x", None]
    samples = [
        {"captured_at": 1.0, "predicted": label,
         "image": {"shape": list(picture.shape), "data_base64": base64.b64encode(picture.tobytes()).decode()}}
        for picture, label in zip(pictures, labels)
    ]
    _ingest_samples(url, "cam-1", samples)
    out = tmp_path / "images"
    result = runner.invoke(app, ["fleet", "export-samples", "--device", "cam-1", "--out", str(out), "--db", url])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["_unlabelled", "bag_.._x", "shirt", "shoe"], "a label never becomes a path"
    assert np.array_equal(np.asarray(Image.open(out / "shirt" / "000000.png")), pictures[0])
    assert np.array_equal(np.asarray(Image.open(out / "shirt" / "000001.png")), pictures[2])
    assert np.array_equal(np.asarray(Image.open(out / "_unlabelled" / "000000.png")), pictures[4])
