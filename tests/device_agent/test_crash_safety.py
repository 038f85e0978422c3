"""kill -9 during an install: after a restart exactly the old or the new version serves, never none, never half."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle import write_bundle
from device_agent.keys import Keyring
from device_agent.repository import Repository
from tests.support.bundles import tiny_manifest, tiny_payload, write_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 24


def _start_driver(state: Path, keyring: Path, bundle: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.install_driver", str(state), str(keyring), str(bundle)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process


def _assert_slots_complete(state: Path) -> None:
    from device_agent.bundle import Manifest

    for slot in (state / "models" / "tiny-classifier" / "slots").iterdir():
        manifest = Manifest.model_validate_json((slot / "manifest.json").read_bytes())
        for entry in manifest.files:
            assert (slot / entry.path).stat().st_size == entry.size, f"half-written slot {slot}"


@pytest.mark.slow
def test_kill_9_at_random_points_of_an_install(tmp_path, signing_key, keyring_dir):
    keyring = Keyring.load(keyring_dir)
    base = tmp_path / "base-state"
    seeded = Repository(base, keyring)
    seeded.start()
    write_tiny_bundle(tmp_path / "v1.ekb", signing_key, "1.0.0")
    seeded.install(tmp_path / "v1.ekb")
    host = seeded.host

    # The new version carries 24 MB more, so an install lasts long enough to be interrupted in every phase.
    payload = tiny_payload(tmp_path / "v2-payload")
    padding = tmp_path / "v2-payload" / "padding.bin"
    padding.write_bytes(np.random.default_rng(0).bytes(24 << 20))
    new_bundle = tmp_path / "v2.ekb"
    write_bundle(new_bundle, tiny_manifest("2.0.0"), {**payload, "padding.bin": padding}, signing_key)

    timing_state = tmp_path / "timing"
    shutil.copytree(base, timing_state)
    driver = _start_driver(timing_state, keyring_dir, new_bundle)
    started = time.perf_counter()
    assert driver.stdout.readline().strip() == "installed"
    install_seconds = time.perf_counter() - started
    driver.wait(timeout=30)

    rng = random.Random(20261127)
    delays = [rng.uniform(0, install_seconds * 1.3) for _ in range(TRIALS)]
    outcomes = []
    for trial, delay in enumerate(delays):
        state = tmp_path / f"trial-{trial}"
        shutil.copytree(base, state)
        driver = _start_driver(state, keyring_dir, new_bundle)
        time.sleep(delay)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)

        restarted = Repository(state, keyring, host=host)
        restarted.start()  # loads the active version and runs its golden check again
        served = restarted.served("tiny-classifier")
        assert served.version in ("1.0.0", "2.0.0"), f"trial {trial}: serves {served.version}"
        assert served.golden_error < 1e-4
        _assert_slots_complete(state)
        assert list(restarted.staging_dir.iterdir()) == [] and list(restarted.uploads_dir.iterdir()) == []
        outcomes.append(served.version)
        shutil.rmtree(state)

    print(f"install takes {install_seconds * 1000:.0f} ms; outcomes after kill -9: "
          f"{outcomes.count('1.0.0')} old, {outcomes.count('2.0.0')} new")
    assert "1.0.0" in outcomes
