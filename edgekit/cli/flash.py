"""``edgekit flash``: push a signed bundle to one device agent or to several."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.output import print_table


def flash(
    bundle: Path = typer.Argument(..., help="The signed .ekb bundle to install."),
    device: str | None = typer.Option(None, "--device", help="The agent's URL, e.g. http://jetson-01:8000."),
    token_file: Path | None = typer.Option(None, "--token-file", help="File holding the agent's admin token (with --device)."),
    devices: Path | None = typer.Option(None, "--devices", help="YAML file listing devices: {devices: [{name, url, token_file}]}."),
    force: bool = typer.Option(False, "--force", help="Go back to an older version the device still holds (a version below the highest it ever installed and no longer holds is refused, forced or not)."),
) -> None:
    """Install a bundle on device agents. Each agent verifies it, runs its golden vectors, then switches atomically."""
    from edgekit.errors import EdgekitError
    from edgekit.flash import flash as flash_one
    from edgekit.flash import flash_fleet, read_token

    if (device is None) == (devices is None):
        raise EdgekitError("name the target: either --device URL --token-file F, or --devices FILE")
    if device is not None:
        if token_file is None:
            raise EdgekitError("--device needs --token-file (the file with the agent's admin token)")
        answer = flash_one(bundle, device, read_token(token_file), force=force)
        typer.echo(f"{device} now serves {answer.get('name')} {answer.get('version')}")
        return
    results = flash_fleet(bundle, devices, force=force)
    print_table(f"flash {bundle.name}", ["device", "result", "detail"],
                [[r.device, "ok" if r.ok else "FAILED", r.detail] for r in results])
    failed = [r.device for r in results if not r.ok]
    if failed:
        typer.echo(f"error: {len(failed)} of {len(results)} devices failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
