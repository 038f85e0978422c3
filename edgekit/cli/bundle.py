"""``edgekit bundle``: look into and verify signed bundles (.ekb)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.output import console, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Signed bundles (.ekb): what a build produces and a device installs.")


def _summary_rows(manifest) -> list[list[str]]:
    target = manifest.target
    tensors = lambda specs: "; ".join(f"{t.name} {t.datatype}{t.shape}" for t in specs)  # noqa: E731
    return [
        ["model", f"{manifest.model.name} {manifest.model.version}"],
        ["created", manifest.created_at.isoformat()],
        ["target", f"{target.name} ({target.cpu_arch}, {target.accelerator}"
                   + (f", compute {target.gpu_compute_capability}" if target.gpu_compute_capability else "") + ")"],
        ["target profile sha256", target.profile_sha256],
        ["runtime", f"{manifest.runtime.engine}: {', '.join(manifest.runtime.execution_providers)}"],
        ["precision", manifest.precision],
        ["task", f"{manifest.task.kind}, {len(manifest.task.labels)} labels"],
        ["inputs", tensors(manifest.inputs)],
        ["outputs", tensors(manifest.outputs)],
        ["preprocessing", manifest.preprocessing.kind],
        ["golden vectors", f"{manifest.golden.file} (atol {manifest.golden.atol:g}, rtol {manifest.golden.rtol:g})"],
        ["drift reference", "present" if manifest.drift_reference else "none"],
        ["files", "\n".join(f"{entry.path}  {entry.size} B  {entry.sha256[:12]}…" for entry in manifest.files)],
    ]


@app.command("inspect")
def inspect(
    file: Path = typer.Argument(..., help="The .ekb bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a bundle's manifest WITHOUT checking its signature (use `verify` for that)."""
    from device_agent.bundle import read_manifest_unverified

    manifest, entries = read_manifest_unverified(file)
    if as_json:
        print_json({"verified": False, "entries": entries, "manifest": manifest.model_dump(mode="json")})
        return
    print_table(f"{file} (signature NOT checked)", ["field", "value"], _summary_rows(manifest))
    console.print(f"To check signature and hashes: edgekit bundle verify {file} --keyring DIR", highlight=False)


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="The .ekb bundle."),
    keyring: Path = typer.Option(..., "--keyring", help="Folder of trusted public keys (*.pub)."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON (also on failure)."),
) -> None:
    """Verify a bundle exactly as a device does: signature, hashes, sizes, archive safety. Exit 0 only if it passes."""
    from device_agent.bundle import BundleError, open_bundle
    from device_agent.keys import Keyring

    trusted = Keyring.load(keyring)
    try:
        with open_bundle(file, trusted) as bundle:
            manifest, signer = bundle.manifest, bundle.signer
    except BundleError as error:
        if as_json:
            print_json({"verified": False, "check": error.check.value, "error": error.detail})
        raise
    if as_json:
        print_json({"verified": True, "signer": signer, "manifest": manifest.model_dump(mode="json")})
        return
    total = sum(entry.size for entry in manifest.files)
    typer.echo(
        f"verified: {manifest.model.name} {manifest.model.version} for {manifest.target.name}, "
        f"signed by key {signer}; {len(manifest.files)} files ({total} bytes) match their hashes"
    )


def keyring_option():
    return typer.Option(None, "--keyring", help=(
        "Folder of trusted public keys (*.pub). Default: the development key that `edgekit build` signs with when no "
        "--key is given ($XDG_CACHE_HOME/edgekit/dev-key)."))


def open_trusted(file: Path, keyring: Path | None):
    """The bundle verified against ``keyring`` (default: the development key's folder), unpacked: a VerifiedBundle to
    use as a context manager. A bundle signed by another key fails with the check's message and the fix."""
    from device_agent.bundle import BundleError, Check, open_bundle
    from device_agent.keys import Keyring, KeyMaterialError
    from edgekit.cli.build import default_cache_dir

    folder = keyring if keyring is not None else default_cache_dir() / "dev-key"
    try:
        trusted = Keyring.load(folder)
    except KeyMaterialError as error:
        if keyring is not None:
            raise
        raise KeyMaterialError(f"no development key to check {file.name} against ({error}); pass --keyring DIR with the "
                               "public key that signed it") from None
    try:
        return open_bundle(file, trusted)
    except BundleError as error:
        if error.check is Check.UNTRUSTED_KEY and keyring is None:
            raise BundleError(error.check, f"{error.detail}; pass --keyring DIR with the public key that signed it") from None
        raise
