"""``edgekit build``: turn a model and data into a signed, verified bundle per target."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from edgekit.cli.output import console, print_json


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgekit"


def build(
    config_file: Path | None = typer.Argument(None, help="Build config YAML; omit it to build the embedded demo.", metavar="[CONFIG.yaml]"),
    model: str | None = typer.Option(None, "--model", help="Model source: a Hugging Face folder, a .onnx file, or embedded:all-minilm-l6-v2."),
    task: str | None = typer.Option(None, "--task", help="Task kind (text-classification, image-classification); must match the config."),
    data: Path | None = typer.Option(None, "--data", help="Labelled JSONL (text, label, split columns)."),
    target: list[str] = typer.Option([], "--target", help="A built-in target name or a profile YAML; repeat for several."),
    out: Path = typer.Option(Path("out"), "--out", help="Where bundles, reports and pass outputs go."),
    key: Path | None = typer.Option(None, "--key", help="Signing key (edgekit.key); default: a development key in the cache dir."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Pass cache (default: $XDG_CACHE_HOME/edgekit)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each target's pass plan and what is cached; build nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
) -> None:
    """Build signed bundles: load → export → per target: optimize → quantize → compile → evaluate → gates → package.

    Without CONFIG and --model this builds the embedded demo (all-MiniLM-L6-v2 with a head fitted on WordNet
    glosses) for x86-64-cpu. Exits 1 when any target fails its gates (the report says which), 2 on bad input.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from device_agent.keys import generate_keypair
    from edgekit.config import load_build_config
    from edgekit.errors import EdgekitError
    from edgekit.pipeline import Build
    from edgekit.report import render, write_reports
    from edgekit.tasks import KINDS, load_task_data

    config = load_build_config(config_file)
    updates = {}
    if model:
        updates["model"] = config.model.model_copy(update={"source": model})
    if data:
        updates["data"] = config.data.model_copy(update={"path": data, "calibration_path": None})
    if target:
        updates["targets"] = target
    if task and task not in KINDS:
        raise EdgekitError(f"unknown task {task!r}; known: {', '.join(KINDS)}")
    if task and task != config.task.kind:
        raise EdgekitError(f"--task {task} differs from the config's task.kind {config.task.kind}; set task.kind in the build config")
    config = config.model_copy(update=updates)

    cache = cache_dir or default_cache_dir()
    development_key = key is None
    if key is None:
        key = cache / "dev-key" / "edgekit.key"
        if not key.is_file():
            generate_keypair(key.parent)
        if not as_json:
            console.print(f"signing with the development key {key} (pass --key for a real one)", highlight=False)
    data_set = load_task_data(config)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console, transient=True, disable=as_json)
    say = (lambda message: None) if as_json else (lambda message: console.print(message, highlight=False))
    builder = Build(config, data_set, out, cache, key, progress, say)

    if dry_run:
        from edgekit.pipeline import cached

        prefix, suffixes = builder.plan()
        plan = {name: [{"step": p.label, "cached": cached(cache, p) is not None} for p in prefix + steps] for name, steps in suffixes.items()}
        if as_json:
            print_json(plan)
        else:
            for name, steps in plan.items():
                console.print(f"{name}: " + " → ".join(f"{s['step']}{' (cached)' if s['cached'] else ''}" for s in steps), highlight=False)
        return

    with progress:
        results = builder.run()
    reports = write_reports(results, out, signing={"key": str(key), "development_key": development_key, "key_id": builder.signer},
                            data=data_set.summary)
    if as_json:
        print_json(reports)
    else:
        render(reports, console)
    if not all(result.passed for result in results):
        raise typer.Exit(1)
