"""``edgekit targets``: list, show and validate target profiles."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.output import console, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Target profiles: the device classes a build is made for.")


@app.command("list")
def list_targets(as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table.")) -> None:
    """List the built-in target profiles."""
    from edgekit.targets import load_builtin_targets

    profiles = load_builtin_targets()
    if as_json:
        print_json([{**profile.model_dump(mode="json"), "sha256": profile.sha256()} for profile in profiles])
        return
    rows = [
        [
            profile.name,
            f"{profile.cpu_arch} {profile.accelerator}"
            + (f" {profile.gpu_compute_capability}" if profile.gpu_compute_capability else ""),
            profile.runtime.engine,
            "→".join([profile.precision.preferred, *profile.precision.fallback]),
            profile.quantization.scheme,
        ]
        for profile in profiles
    ]
    print_table(
        "Built-in targets (--target NAME, or --target your.yaml; details: edgekit targets show NAME)",
        ["name", "hardware", "runtime", "precision", "quantization"],
        rows,
    )


@app.command("show")
def show_target(
    name: str = typer.Argument(..., help="A built-in target name, or a path to a YAML profile."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Show one target profile with every field, its source file and its SHA-256."""
    import yaml

    from edgekit.targets import load_target, resolve_target_file

    path = resolve_target_file(name)
    profile = load_target(name)
    document = profile.model_dump(mode="json")
    if as_json:
        print_json({**document, "sha256": profile.sha256(), "source": str(path)})
        return
    console.print(f"# source: {path}\n# sha256: {profile.sha256()}", highlight=False, markup=False)
    console.print(yaml.safe_dump(document, sort_keys=False), highlight=False, markup=False, end="")


@app.command("validate")
def validate_targets(files: list[Path] = typer.Argument(..., help="One or more YAML files to check.")) -> None:
    """Check target profile files; report every problem of every file, exit 2 if any is broken."""
    from device_agent.validation import ConfigError
    from edgekit.targets import TargetProfile
    from device_agent.validation import load_yaml_model

    failures = []
    for path in files:
        try:
            profile = load_yaml_model(path, TargetProfile)
        except ConfigError as error:
            failures.append(error)
            continue
        typer.echo(f"ok: {path} defines target {profile.name!r} (sha256 {profile.sha256()[:12]})")
    for failure in failures:
        typer.echo(f"error: {failure}", err=True)
    if failures:
        raise typer.Exit(2)
