"""A non-editable install carries every package and the built-in target profiles."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs() -> set[str]:
    found = set()
    for top in ("edgekit", "device_agent"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_wheel_installs_every_package_and_the_targets(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("edgekit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {str(Path(name).parent).replace("/", ".") for name in names if name.endswith("__init__.py")}
    missing = _package_dirs() - packaged
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    shipped = {Path(name).stem for name in names if name.startswith("edgekit/builtin_targets/") and name.endswith(".yaml")}
    assert shipped == {path.stem for path in (ROOT / "targets").glob("*.yaml")}
    assert {"edgekit/demo_data/data.jsonl", "edgekit/demo_data/calibration.jsonl"} <= set(names), "the embedded demo's data ships"

    # Install the wheel's files only (its dependencies are this environment's) and load the targets from there.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = "import edgekit, edgekit.targets as t; print(edgekit.__file__); print(','.join(t.builtin_target_names()))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout
    location, names_line = output.strip().splitlines()
    assert location.startswith(str(site)), "the probe must load the installed copy, not the source tree"
    assert set(names_line.split(",")) == shipped
