"""``edgekit fleet report --html F --bundle B``: what a drifting device's drifted traffic leans on, beside its reference."""

from __future__ import annotations

import base64
import html as html_text
import json
import re
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from device_agent.telemetry_schema import UploadBatch
from edgekit.cli import app
from edgekit.fleet.store import Store
from tests.fleet.conftest import make_window

runner = CliRunner()
SECTION = "What drifting devices' traffic leans on"
CALM = ["the garden was calm and green this morning", "quiet rain over the garden pond", "green leaves and calm water"]
DRIFTED = ["urgent refund for the broken invoice", "invoice overdue send the refund now", "broken parcel urgent refund"]


def _window(sequence: int, drifting: bool, samples: list[dict], version: str = "1.0.0", model: str = "tiny-text"):
    return make_window(sequence, model={"name": model, "version": version},
                       scores={"f0": {"psi": 0.6 if drifting else 0.01, "js": 0.05, "drifting": drifting}},
                       drifting=drifting, alert=drifting and sequence % 2 == 1, top_features=["f0"] if drifting else [],
                       samples=samples)


def _texts(texts: list[str]) -> list[dict]:
    return [{"captured_at": 1.0, "text": text, "predicted": "cat"} for text in texts]


def _fleet(tmp_path: Path) -> str:
    """dev-drift: calm traffic, then drifted traffic; dev-ok never drifts; dev-noref drifts from its first window;
    dev-other drifts with samples of another model version."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(url)
    devices = {
        "dev-drift": [_window(s, False, _texts(CALM)) for s in range(3)] + [_window(s, True, _texts(DRIFTED)) for s in range(3, 6)],
        "dev-ok": [_window(s, False, _texts(CALM)) for s in range(4)],
        "dev-noref": [_window(s, True, _texts(DRIFTED)) for s in range(3)],
        "dev-other": [_window(s, s >= 2, _texts(DRIFTED), version="0.9.0") for s in range(4)],
    }
    for device, windows in devices.items():
        store.add_device(device)
        store.ingest(UploadBatch(device_id=device, windows=windows))
    store.close()
    return url


def _section(page: str) -> str:
    start = page.index(SECTION)
    return page[start:page.index("<h2>", start)]


def _words_of(table_title: str, section: str) -> list[str]:
    table = section[section.index(table_title):]
    table = table[:table.index("</table>")]
    return [html_text.unescape(word) for word in re.findall(r"<tr><td>([^<]*)</td>", table)]


def test_the_html_shows_the_words_drifted_and_reference_traffic_lean_on(tmp_path: Path, signed):
    url = _fleet(tmp_path)
    page_file = tmp_path / "fleet.html"
    result = runner.invoke(app, ["fleet", "report", "--db", url, "--html", str(page_file),
                                 "--bundle", str(signed["text"]), "--keyring", str(signed["keyring"])])
    assert result.exit_code == 0, result.output
    section = _section(page_file.read_text())
    assert "(tiny-text 1.0.0)" in section
    devices = re.findall(r"<h3>([^<]+) <span", section)
    assert devices == ["dev-drift", "dev-noref", "dev-other"], "drifting devices only"

    drift = section[section.index("<h3>dev-drift"):section.index("<h3>dev-noref")]
    drifted_words = _words_of("drifted traffic (9 samples explained)", drift)
    reference_words = _words_of("reference traffic (9 samples explained)", drift)
    assert drifted_words and set(drifted_words) <= {w for text in DRIFTED for w in text.split()}
    assert reference_words and set(reference_words) <= {w for text in CALM for w in text.split()}

    noref = section[section.index("<h3>dev-noref"):section.index("<h3>dev-other")]
    assert "no reference" in noref and "drifted traffic (9 samples explained)" in noref
    other = section[section.index("<h3>dev-other"):]
    assert "no text samples of tiny-text 1.0.0 were captured in its drifting windows" in other and "<table>" not in other


def test_json_and_terminal_reports_do_not_change(tmp_path: Path, signed):
    url = _fleet(tmp_path)
    plain = runner.invoke(app, ["fleet", "report", "--db", url, "--json"])
    explained = runner.invoke(app, ["fleet", "report", "--db", url, "--json", "--html", str(tmp_path / "a.html"),
                                    "--bundle", str(signed["text"]), "--keyring", str(signed["keyring"])])
    assert plain.exit_code == explained.exit_code == 0, explained.output
    without_time = [{k: v for k, v in json.loads(r.stdout).items() if k != "generated_at"} for r in (plain, explained)]
    assert without_time[0] == without_time[1]

    table = runner.invoke(app, ["fleet", "report", "--db", url])
    table_explained = runner.invoke(app, ["fleet", "report", "--db", url, "--html", str(tmp_path / "b.html"),
                                          "--bundle", str(signed["text"]), "--keyring", str(signed["keyring"])])
    assert table_explained.stdout.startswith(table.stdout)
    assert "HTML report" in table_explained.stdout[len(table.stdout):]


def test_a_bundle_needs_the_html_report(tmp_path: Path, signed):
    result = runner.invoke(app, ["fleet", "report", "--db", _fleet(tmp_path), "--bundle", str(signed["text"])])
    assert result.exit_code == 2 and "pass --html FILE too" in result.stderr


def test_images_get_mean_heat_maps_of_both_sides(tmp_path: Path, signed):
    rng = np.random.default_rng(5)

    def images(count: int, bright: bool) -> list[dict]:
        pictures = [rng.integers(128 if bright else 0, 256 if bright else 128, size=(9, 11, 3), dtype=np.uint8) for _ in range(count)]
        return [{"captured_at": 1.0, "predicted": "a",
                 "image": {"shape": list(p.shape), "data_base64": base64.b64encode(p.tobytes()).decode()}} for p in pictures]

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(url)
    store.add_device("cam-1")
    windows = [_window(0, False, images(3, False), model="tiny-cnn"), _window(1, True, images(3, True), model="tiny-cnn")]
    store.ingest(UploadBatch(device_id="cam-1", windows=windows))
    store.close()
    page_file = tmp_path / "fleet.html"
    result = runner.invoke(app, ["fleet", "report", "--db", url, "--html", str(page_file),
                                 "--bundle", str(signed["image"]), "--keyring", str(signed["keyring"])])
    assert result.exit_code == 0, result.output
    section = _section(page_file.read_text())
    pictures = re.findall(r'<img alt="mean heat map of the (drifted|reference) traffic" src="data:image/png;base64,([^"]+)"', section)
    assert [side for side, _ in pictures] == ["drifted", "reference"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for _, data in pictures)
    assert "mean of 3 heat maps" in section


def test_a_corrupt_captured_image_is_skipped_and_counted_not_fatal(tmp_path: Path, signed):
    rng = np.random.default_rng(6)

    def image(picture: np.ndarray, shape: list[int] | None = None) -> dict:
        return {"captured_at": 1.0, "predicted": "a",
                "image": {"shape": shape or list(picture.shape), "data_base64": base64.b64encode(picture.tobytes()).decode()}}

    pictures = [rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8) for _ in range(4)]
    broken = image(pictures[0], shape=[10, 11, 3])  # its bytes do not fill its shape
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store.open(url)
    store.add_device("cam-1")
    store.ingest(UploadBatch(device_id="cam-1", windows=[
        _window(0, False, [image(p) for p in pictures[:2]], model="tiny-cnn"),
        _window(1, True, [image(pictures[2]), broken, image(pictures[3])], model="tiny-cnn")]))
    store.close()
    page_file = tmp_path / "fleet.html"
    result = runner.invoke(app, ["fleet", "report", "--db", url, "--html", str(page_file),
                                 "--bundle", str(signed["image"]), "--keyring", str(signed["keyring"])])
    assert result.exit_code == 0, result.output
    section = " ".join(_section(page_file.read_text()).split())
    assert "1 captured image could not be decoded and was skipped" in section and "holds 297 bytes" in section
    assert "drifted traffic: mean of 2 heat maps" in section and "reference traffic: mean of 2 heat maps" in section
