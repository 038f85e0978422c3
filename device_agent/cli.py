"""The ``edgekit-agent`` command line (the device side).

``doctor`` describes the host, ``verify`` checks a bundle against the keyring,
``serve`` runs the inference server (device_agent.server) and ``status`` asks a
running one what it serves. Heavy imports stay inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from device_agent.errors import UserErrorGroup

app = typer.Typer(
    name="edgekit-agent",
    cls=UserErrorGroup,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="The edgekit device agent: verifies bundles, serves models and describes this device.",
)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print a JSON report.")) -> None:
    """Describe this device: CPU, memory, disk, GPU and inference runtimes."""
    from device_agent.host import probe_host

    host = probe_host()
    if as_json:
        typer.echo(json.dumps(host.to_dict(), indent=2))
        return
    width = max(len(check) for check, _ in host.rows())
    for check, finding in host.rows():
        typer.echo(f"{check:<{width}}  {finding}")


@app.command()
def verify(
    file: Path = typer.Argument(..., help="The .ekb bundle."),
    keyring: Path = typer.Option(..., "--keyring", help="Folder of trusted public keys (*.pub)."),
) -> None:
    """Verify a bundle against this device's keyring without installing it."""
    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring

    with open_bundle(file, Keyring.load(keyring)) as bundle:
        manifest = bundle.manifest
        typer.echo(f"verified: {manifest.model.name} {manifest.model.version} for {manifest.target.name}, signed by key {bundle.signer}")


@app.command()
def serve(
    config: Path | None = typer.Option(None, "--config", help="YAML settings file (see deploy/agent.yaml)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Where models and their versions are kept."),
    keyring: Path | None = typer.Option(None, "--keyring", help="Folder of trusted public keys (*.pub)."),
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default: 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port to listen on (default: 8000)."),
    admin_token_file: Path | None = typer.Option(None, "--admin-token-file", help="File with the admin API's bearer token."),
    ssl_certfile: Path | None = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM); with --ssl-keyfile."),
    ssl_keyfile: Path | None = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM); with --ssl-certfile."),
    telemetry_url: str | None = typer.Option(None, "--telemetry-url", help="Fleet collector base URL; turns telemetry and drift monitoring on."),
    device_id: str | None = typer.Option(None, "--device-id", help="This device's name at the collector."),
    device_token_file: Path | None = typer.Option(None, "--device-token-file", help="File with this device's collector token."),
    window_size: int | None = typer.Option(None, "--window-size", help="Rows per drift window (default: the bundle's, 500)."),
    window_seconds: float | None = typer.Option(None, "--window-seconds", help="A window also closes after this many seconds (default: 300)."),
    poll_seconds: float | None = typer.Option(None, "--poll-seconds", help="Pull the desired state from the collector this often (default: 30)."),
    explain: bool = typer.Option(False, "--explain", help=(
        "Serve POST /v2/models/{name}/explain: which words, image regions or columns each prediction rests on "
        "(occlusion; one model row per word, patch or column, so off by default).")),
) -> None:
    """Serve the installed models over the Open Inference Protocol (flags override the --config file)."""
    from device_agent.config import load_settings

    flags = {
        "state_dir": state_dir, "keyring_dir": keyring, "host": host, "port": port,
        "admin_token_file": admin_token_file, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
        "telemetry_url": telemetry_url, "device_id": device_id, "device_token_file": device_token_file,
        "window_size": window_size, "window_seconds": window_seconds, "poll_seconds": poll_seconds,
        "explain": True if explain else None,  # without the flag, the --config file decides
    }
    settings = load_settings(config, {field: _absolute(value) for field, value in flags.items()})
    from device_agent.server import run_server

    run_server(settings)


def _absolute(value: object) -> object:
    # Paths on the command line are relative to where the command runs, not to --config.
    return value.absolute() if isinstance(value, Path) else value


@app.command()
def status(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The agent's base URL."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
) -> None:
    """Ask a running agent what it serves: server metadata, readiness and its repository index."""
    from device_agent.errors import UserError

    base = url.rstrip("/")
    try:
        server = _http_json(f"{base}/v2")
        ready_status, ready = _http_status(f"{base}/v2/health/ready")
        models = _http_json(f"{base}/v2/repository/index", data=b"")
    except OSError as exc:
        raise UserError(f"cannot reach the agent at {base} ({exc}); is `edgekit-agent serve` running there?") from None
    except ValueError:
        raise UserError(f"{base} does not answer JSON; is it an edgekit agent's URL?") from None
    if as_json:
        typer.echo(json.dumps({"server": server, "ready": ready_status == 200, "models": models}, indent=2))
        return
    state = "ready" if ready_status == 200 else f"NOT READY ({ready.get('error', ready_status)})"
    typer.echo(f"{server.get('name')} {server.get('version')} at {base}: {state}")
    rows = [("MODEL", "VERSION", "STATE", "REASON")] + [(m["name"], m["version"], m["state"], m.get("reason", "")) for m in models]
    widths = [max(len(str(row[column])) for row in rows) for column in range(3)]
    for row in rows:
        typer.echo(("  ".join(f"{cell!s:<{width}}" for cell, width in zip(row, widths)) + "  " + str(row[3])).rstrip())
    if not models:
        typer.echo(f"(no models installed; install one with `edgekit flash BUNDLE --device {base} --token-file FILE`)")


def _http_json(url: str, data: bytes | None = None):
    from urllib.request import Request, urlopen

    with urlopen(Request(url, data=data, method="POST" if data is not None else "GET"), timeout=10) as response:
        return json.loads(response.read())


def _http_status(url: str) -> tuple[int, dict]:
    """Status and JSON body, for a URL that answers 4xx as part of its meaning (readiness)."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def main() -> None:
    app()
