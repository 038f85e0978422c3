"""The monitoring loop end to end, with real processes: build → flash → an agent serving with telemetry to a collector →
shifted traffic → a drift alert in `edgekit fleet alerts` and `edgekit fleet report`, and an HTML report Chromium draws.

The flow runs once per module (the `demo_flow` fixture) and needs no browser; only the screenshot test needs headless
Chromium (marked `browser`, skipped where it is absent), so a machine without Chromium still tests the whole loop.

The build is the tiny BERT on the embedded WordNet demo data (so it takes seconds, not minutes); the bundle carries the
drift reference the package pass computed from the validation and test rows. Traffic: first test-split glosses (the
reference's own population: no alert), then long strings of made-up words (more tokens, more truncation, unknown
word pieces, confused outputs: an alert after two drifting windows).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.config import BuildConfig
from edgekit.tasks.text_classification import load_task_data
from tests.fleet.conftest import collector_process
from tests.support.agent import ADMIN_TOKEN
from tests.support.builds import relaxed_target, tiny_text_build_config
from tests.support.network import free_port

runner = CliRunner()
DEVICE = "jetson-demo-01"
WINDOW = 100  # rows per window: the reference was calibrated at 500 rows, the device widens its thresholds to match
BATCH = 10  # rows per inference request


def _gibberish(rng: np.random.Generator, count: int) -> list[str]:
    letters = np.array(list("qxzjkvwyfhbg"))
    return [" ".join("".join(rng.choice(letters, size=rng.integers(6, 14))) for _ in range(rng.integers(40, 80)))
            for _ in range(count)]


def _send(agent_url: str, texts: list[str]) -> None:
    for start in range(0, len(texts), BATCH):
        rows = texts[start:start + BATCH]
        body = {"inputs": [{"name": "text", "shape": [len(rows)], "datatype": "BYTES", "data": rows}]}
        response = httpx.post(f"{agent_url}/v2/models/tiny/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text


def _stored_windows(db: Path) -> list[tuple[int, int, int]]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT sequence, drifting, alert FROM windows WHERE device_id = ? ORDER BY sequence",
                                  (DEVICE,)).fetchall()


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@dataclass(frozen=True)
class DemoFlow:
    db: Path
    db_url: str
    shifted_since: float  # when the shifted traffic began
    metrics: str  # the agent's /metrics after the shifted traffic


@pytest.fixture(scope="module")
def demo_flow(tmp_path_factory) -> DemoFlow:
    """Build, register, serve with telemetry, send unshifted then shifted traffic; the collector's database is the result."""
    from tests.support.tiny_bert import tiny_hf_folder

    tmp_path = tmp_path_factory.mktemp("demo-flow")
    # Build: the tiny BERT on the demo data, for a host profile with budgets a toy model can be judged by.
    target = relaxed_target(tmp_path, "x86-64-cpu", max_accuracy_drop_points=100.0, min_top1_agreement=0.0)
    config = tiny_text_build_config(tmp_path, tiny_hf_folder(tmp_path / "tiny-model"), [target])
    built = runner.invoke(app, ["build", str(config), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert built.exit_code == 0, built.output
    bundle = tmp_path / "out" / "x86-64-cpu-test" / "tiny-1.0.0.ekb"
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(tmp_path / "cache" / "dev-key" / "edgekit.pub", keyring / "build-host.pub")

    # The operator registers the device; the token is printed once, alone on stdout.
    db = tmp_path / "fleet.db"
    db_url = f"sqlite:///{db}"
    added = runner.invoke(app, ["fleet", "devices", "add", DEVICE, "--db", db_url])
    assert added.exit_code == 0, added.output
    device_token = tmp_path / "device.token"
    device_token.write_text(added.stdout.strip() + "\n")
    admin_token = tmp_path / "admin.token"
    admin_token.write_text(ADMIN_TOKEN + "\n")
    admin_token.chmod(0o600)

    with collector_process(db_url) as collector:
        port = free_port()
        agent = subprocess.Popen(
            [sys.executable, "-c", "from device_agent.cli import main; main()", "serve",
             "--state-dir", str(tmp_path / "state"), "--keyring", str(keyring), "--admin-token-file", str(admin_token),
             "--port", str(port), "--telemetry-url", collector.url, "--device-id", DEVICE,
             "--device-token-file", str(device_token), "--window-size", str(WINDOW), "--window-seconds", "3600"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        agent_url = f"http://127.0.0.1:{port}"
        try:
            def agent_up() -> bool:
                assert agent.poll() is None, f"edgekit-agent exited: {agent.stdout.read()}"
                try:
                    return httpx.get(f"{agent_url}/v2/health/live", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            _wait_for(agent_up, 60, "the agent to listen")
            flashed = runner.invoke(app, ["flash", str(bundle), "--device", agent_url, "--token-file", str(admin_token)])
            assert flashed.exit_code == 0, flashed.output

            # Unshifted: the demo's test glosses. Three windows, none of them an alert.
            texts = list(load_task_data(BuildConfig().data).test.texts)[:3 * WINDOW]
            _send(agent_url, texts)
            _wait_for(lambda: len(_stored_windows(db)) >= 3, 60, "three unshifted windows at the collector")
            assert not any(alert for _, _, alert in _stored_windows(db)), _stored_windows(db)
            quiet = runner.invoke(app, ["fleet", "alerts", "--db", db_url])
            assert quiet.exit_code == 0, quiet.output

            # Shifted: made-up words. Every window drifts; the second in a row raises the alert.
            shifted_since = time.time()
            _send(agent_url, _gibberish(np.random.default_rng(3), 3 * WINDOW))
            _wait_for(lambda: len(_stored_windows(db)) >= 6, 60, "three shifted windows at the collector")
            metrics = httpx.get(f"{agent_url}/metrics", timeout=10).text
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    return DemoFlow(db, db_url, shifted_since, metrics)


@pytest.mark.slow
def test_shifted_traffic_raises_a_drift_alert_the_operator_sees(demo_flow, tmp_path):
    db, db_url, shifted_since = demo_flow.db, demo_flow.db_url, demo_flow.shifted_since
    assert re.search(r'^edgekit_drift_alert\{model="tiny",version="1.0.0"\} 1$', demo_flow.metrics, re.M), demo_flow.metrics
    assert "edgekit_drift_psi{" in demo_flow.metrics

    windows = _stored_windows(db)
    assert [drifting for _, drifting, _ in windows[3:6]] == [1, 1, 1], windows
    assert [alert for _, _, alert in windows[3:6]] == [0, 1, 1], windows

    # The operator's view: `alerts` fails for cron, the report names the device, when the drift began, and why.
    alerts = subprocess.run([sys.executable, "-m", "edgekit", "fleet", "alerts", "--db", db_url],
                            capture_output=True, text=True, timeout=120, check=False)
    assert alerts.returncode == 1, alerts.stdout + alerts.stderr
    assert DEVICE in alerts.stdout and "drift alert" in alerts.stdout

    report = runner.invoke(app, ["fleet", "report", "--db", db_url, "--json"])
    assert report.exit_code == 0, report.output
    (device,) = json.loads(report.stdout)["devices"]
    assert device["device_id"] == DEVICE and device["status"] == "alert"
    assert (device["model_name"], device["model_version"]) == ("tiny", "1.0.0")
    assert device["requests"] == 6 * WINDOW // BATCH and device["windows"] == 6  # requests of BATCH rows each
    assert device["top_features"], "the report says which features drift"
    assert shifted_since - 5 <= device["status_since"] <= time.time()
    table = runner.invoke(app, ["fleet", "report", "--db", db_url])
    assert table.exit_code == 0 and DEVICE in table.stdout and "alert" in table.stdout

    page = tmp_path / "fleet.html"
    assert runner.invoke(app, ["fleet", "report", "--db", db_url, "--html", str(page)]).exit_code == 0
    html = page.read_text()
    assert DEVICE in html and html.count("data:image/png;base64,") >= 3, "self-contained, with its plots inline"


@pytest.mark.slow
@pytest.mark.browser
def test_chromium_draws_the_html_fleet_report(demo_flow, tmp_path):
    from tests.support.browser import screenshot

    page = tmp_path / "fleet.html"
    assert runner.invoke(app, ["fleet", "report", "--db", demo_flow.db_url, "--html", str(page)]).exit_code == 0
    image = screenshot(page, tmp_path)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "Chromium drew tables and plots, not a blank page"
