"""``edgekit keys``: the Ed25519 key pair that signs bundles."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Signing keys: devices install only bundles signed by a key in their keyring.")


@app.command("generate")
def generate(
    out: Path = typer.Option(..., "--out", help="Folder for edgekit.key (private, mode 0600) and edgekit.pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair in --out."),
) -> None:
    """Create a new signing key pair."""
    from device_agent.keys import generate_keypair, key_id, load_private_key

    key_path, pub_path = generate_keypair(out, overwrite=force)
    typer.echo(f"wrote {key_path} (private, mode 0600: keep it on the build host)")
    typer.echo(f"wrote {pub_path} (public key id {key_id(load_private_key(key_path).public_key())})")
    typer.echo(f"next: copy {pub_path.name} into each device's keyring folder, and sign builds with --key {key_path}")
