"""The edgekit command line: JSON outputs, exit codes, one-line user errors, and an instant --help."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from tests.support.bundles import write_tiny_bundle

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_targets_list_json_prints_the_six_profiles():
    result = invoke("targets", "list", "--json")
    assert result.exit_code == 0, result.output
    profiles = json.loads(result.stdout)
    names = {profile["name"] for profile in profiles}
    assert {"x86-64-cpu", "x86-64-cpu-openvino", "arm64-cpu", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "x86-64-nvidia-gpu"} <= names
    for profile in profiles:
        assert profile["accelerator"] in ("cpu", "cuda")
        assert profile["runtime"]["engine"] in ("onnxruntime", "tensorrt", "openvino")


def test_targets_list_table_names_every_target():
    result = invoke("targets", "list")
    assert result.exit_code == 0
    assert "jetson-orin-nano-8gb" in result.stdout


def test_targets_show_prints_source_digest_and_fields():
    result = invoke("targets", "show", "jetson-orin-nano-8gb")
    assert result.exit_code == 0
    assert "# sha256:" in result.stdout and "gpu_compute_capability: '8.7'" in result.stdout
    shown = json.loads(invoke("targets", "show", "x86-64-cpu", "--json").stdout)
    assert shown["name"] == "x86-64-cpu" and len(shown["sha256"]) == 64


def test_targets_validate_broken_file_exits_2_naming_the_field(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text((Path(__file__).resolve().parents[2] / "targets" / "x86-64-cpu.yaml").read_text().replace("opset: 17", "opset: seventeen"))
    result = invoke("targets", "validate", str(broken))
    assert result.exit_code == 2
    assert "opset" in result.stderr and "seventeen" in result.stderr and str(broken) in result.stderr


def test_targets_validate_good_file_exits_0():
    good = Path(__file__).resolve().parents[2] / "targets" / "arm64-cpu.yaml"
    result = invoke("targets", "validate", str(good))
    assert result.exit_code == 0 and "ok:" in result.stdout


def test_keys_generate_then_verify_a_bundle_signed_with_that_key(tmp_path):
    result = invoke("keys", "generate", "--out", str(tmp_path / "keys"))
    assert result.exit_code == 0, result.output
    key_path = tmp_path / "keys" / "edgekit.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    from device_agent.keys import load_private_key

    bundle = tmp_path / "tiny.ekb"
    write_tiny_bundle(bundle, load_private_key(key_path))
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(tmp_path / "keys" / "edgekit.pub", keyring)

    result = invoke("bundle", "verify", str(bundle), "--keyring", str(keyring))
    assert result.exit_code == 0, result.output
    assert "verified: tiny-classifier 1.0.0 for x86-64-cpu" in result.stdout
    report = json.loads(invoke("bundle", "verify", str(bundle), "--keyring", str(keyring), "--json").stdout)
    assert report["verified"] is True and report["manifest"]["model"]["name"] == "tiny-classifier"


def test_keys_generate_refuses_to_overwrite(tmp_path):
    assert invoke("keys", "generate", "--out", str(tmp_path)).exit_code == 0
    result = invoke("keys", "generate", "--out", str(tmp_path))
    assert result.exit_code == 2 and "--force" in result.stderr


def test_verify_json_reports_the_failed_check(tmp_path, signing_key):
    bundle = tmp_path / "tiny.ekb"
    write_tiny_bundle(bundle, signing_key)
    other = tmp_path / "other-keyring"
    invoke("keys", "generate", "--out", str(other))
    (other / "edgekit.key").unlink()
    result = invoke("bundle", "verify", str(bundle), "--keyring", str(other), "--json")
    assert result.exit_code == 2
    outcome = json.loads(result.stdout)
    assert (outcome["verified"], outcome["check"]) == (False, "untrusted-key")
    assert "not in keyring" in outcome["error"]


def test_bundle_inspect_shows_the_manifest_and_says_it_is_unverified(tmp_path, signing_key):
    bundle = tmp_path / "tiny.ekb"
    write_tiny_bundle(bundle, signing_key)
    result = invoke("bundle", "inspect", str(bundle))
    assert result.exit_code == 0
    assert "tiny-classifier 1.0.0" in result.stdout and "NOT checked" in result.stdout
    document = json.loads(invoke("bundle", "inspect", str(bundle), "--json").stdout)
    assert document["verified"] is False and document["manifest"]["target"]["name"] == "x86-64-cpu"


def test_bundle_verify_with_missing_keyring_is_a_user_error(tmp_path, signing_key):
    bundle = tmp_path / "tiny.ekb"
    write_tiny_bundle(bundle, signing_key)
    result = invoke("bundle", "verify", str(bundle), "--keyring", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "keyring" in result.stderr


def test_doctor_json_describes_this_host():
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["host"]["cpu_arch"] in ("x86_64", "aarch64")
    assert report["host"]["accelerator"] in ("cpu", "cuda")
    assert "torch" in report["libraries"]
    if report["host"]["accelerator"] == "cpu":
        assert all(not name.startswith("jetson") for name in report["matching_targets"])


def test_version():
    from edgekit import __version__

    result = invoke("version")
    assert result.stdout.strip() == f"edgekit {__version__}"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, timeout=60)


def test_user_errors_print_one_line_and_exit_2_without_traceback():
    result = _run("targets", "show", "orin-nano")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown target 'orin-nano'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_help_imports_no_heavy_library():
    probe = (
        "import sys, json\n"
        "from edgekit.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    modules = set(json.loads(result.stderr.strip().splitlines()[-1]))
    heavy = {"torch", "transformers", "onnxruntime", "onnx", "tensorrt", "optimum", "peft", "numpy"}
    assert not heavy & {name.split(".")[0] for name in modules}


@pytest.mark.parametrize("command", [["targets"], ["keys"], ["bundle"]])
def test_every_group_teaches_its_commands(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Commands" in result.stdout
