"""The ``edgekit-agent`` command line (the device side).

Serving (`serve`, `status`) arrives with the device-agent runtime; today the
agent can describe its host and verify a bundle against its keyring.
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
    help="The edgekit device agent: verifies bundles and describes this device.",
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


def main() -> None:
    app()
