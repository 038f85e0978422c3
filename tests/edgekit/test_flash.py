"""edgekit flash: clear errors when the device is unreachable or the command is incomplete."""

from __future__ import annotations


from typer.testing import CliRunner

from edgekit.cli import app
from tests.support.bundles import write_tiny_bundle
from tests.support.network import free_port

runner = CliRunner()


def test_dead_device_is_named_with_the_fix(tmp_path, signing_key):
    bundle = tmp_path / "tiny.ekb"
    write_tiny_bundle(bundle, signing_key)
    token = tmp_path / "token"
    token.write_text("secret\n")
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["flash", str(bundle), "--device", url, "--token-file", str(token)])
    assert result.exit_code == 2
    assert f"cannot reach {url}" in result.stderr and "edgekit-agent serve" in result.stderr


def test_fleet_flash_reports_every_device_and_fails_if_any_failed(tmp_path, signing_key):
    bundle = tmp_path / "tiny.ekb"
    write_tiny_bundle(bundle, signing_key)
    (tmp_path / "token").write_text("secret")
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "devices:\n"
        f"  - {{name: a, url: 'http://127.0.0.1:{free_port()}', token_file: token}}\n"
        f"  - {{name: b, url: 'http://127.0.0.1:{free_port()}', token_file: missing-token}}\n"
    )
    result = runner.invoke(app, ["flash", str(bundle), "--devices", str(devices)])
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "2 of 2 devices failed" in result.stderr


def test_command_needs_exactly_one_way_to_name_devices(tmp_path):
    result = runner.invoke(app, ["flash", str(tmp_path / "x.ekb")])
    assert result.exit_code == 2 and "--device URL --token-file F, or --devices FILE" in result.stderr
    result = runner.invoke(app, ["flash", str(tmp_path / "x.ekb"), "--device", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "--token-file" in result.stderr


def test_devices_file_with_unknown_keys_is_refused(tmp_path):
    devices = tmp_path / "devices.yaml"
    devices.write_text("devices:\n  - {name: a, url: 'http://x', token: t}\n")
    result = runner.invoke(app, ["flash", str(tmp_path / "x.ekb"), "--devices", str(devices)])
    assert result.exit_code == 2 and "token: unknown field" in result.stderr
