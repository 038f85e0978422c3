"""``edgekit build``: turn a model and data into a signed, verified bundle per target."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgekit.cli.output import console, print_json

if TYPE_CHECKING:  # imported in the functions at run time, so that --help stays instant
    from rich.progress import Progress

    from edgekit.config import BuildConfig
    from edgekit.pipeline import Build


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgekit"


def build(
    config_file: Path | None = typer.Argument(None, help="Build config YAML; omit it to build the embedded demo.", metavar="[CONFIG.yaml]"),
    model: str | None = typer.Option(None, "--model", help="Model source: a Hugging Face folder, a .onnx file, or embedded:all-minilm-l6-v2."),
    task: str | None = typer.Option(None, "--task", help="Task kind (text-classification, image-classification); must match the config."),
    data: Path | None = typer.Option(None, "--data", help=(
        "Labelled data (sets data.path): CSV/TSV, JSONL, Parquet or a Hugging Face save_to_disk folder with text, label "
        "and optional split columns; for image-classification, a folder of class sub-folders (optionally under "
        "train/, val/, test/). IDX files are set by data.idx in the config, which then wins over --data.")),
    target: list[str] = typer.Option([], "--target", help="A built-in target name or a profile YAML; repeat for several."),
    out: Path = typer.Option(Path("out"), "--out", help="Where bundles, reports and pass outputs go."),
    key: Path | None = typer.Option(None, "--key", help="Signing key (edgekit.key); default: a development key in the cache dir."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Pass cache (default: $XDG_CACHE_HOME/edgekit)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each target's pass plan and what is cached; build nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
    search: bool | None = typer.Option(None, "--search/--no-search", help=(
        "Search customizations (head only, LoRA, full fine-tuning and their hyper-parameters; image, time-series and "
        "table training settings) on the validation split and build the best (search.enabled). Default: on when you "
        "give your own data and the config says nothing about head, finetune, train or model.trees.")),
    search_budget: float | None = typer.Option(None, "--search-budget", metavar="MINUTES", help=(
        "Minutes of trial time for the search, summed over its trials (search.budget_minutes; default 10). A rerun of a "
        "finished search trains nothing; an interrupted one goes on with what is left.")),
    study_db: str | None = typer.Option(None, "--study-db", metavar="URL", help=(
        "Optuna storage for the search (search.storage): default sqlite:///<out>/search/study.db; a postgresql:// URL "
        "lets several build hosts share one study.")),
) -> None:
    """Build signed bundles: load → (finetune) → (prune) → export → per target: (qat) → optimize → quantize → compile → evaluate → gates → package.

    Without CONFIG and --model this builds the embedded demo (all-MiniLM-L6-v2 with a head fitted on WordNet
    glosses) for x86-64-cpu. Exits 1 when any target fails its gates (the report says which), 2 on bad input.

    With your own data (--data, or data.path in the config) and no head, finetune or train section, the build first
    searches for the best customization within --search-budget minutes (Optuna; trials compared on the validation
    split, the test split judges only the model that ships) and builds the most accurate trial within the targets'
    size budgets and, where this host is the target, latency budgets. The trials, the chosen one and the
    accuracy-vs-latency front are in report.json and report.html. Search keys a config may tune (search.space):
    text: finetune.method (none, lora, full), finetune.learning_rate, finetune.head_learning_rate, finetune.epochs,
    finetune.batch_size, finetune.warmup_ratio, finetune.schedule, finetune.weight_decay, finetune.label_smoothing, finetune.lora_r,
    finetune.lora_alpha, finetune.lora_dropout, head.learning_rate, head.pooling, finetune.max_train_rows, prune.ratio;
    images and time series: train.learning_rate, train.epochs, train.batch_size, train.weight_decay, train.augment
    (images), model.widths, prune.ratio; tables: those train keys and model.widths (builtin:mlp), model.trees.learning_rate,
    model.trees.max_depth, model.trees.min_samples_leaf, model.trees.subsample (builtin:gbt); any task: model.source (or
    list candidates in search.models).
    """
    config = _config_with_overrides(config_file, model=model, task=task, data=data, targets=target)
    config = _search_overrides(config, search=search, budget=search_budget, storage=study_db)
    searching = _searching(config, data)
    if dry_run:
        _dry_run(config, out, cache_dir, key, searching=searching, as_json=as_json)
        return
    reports, passed = build_bundles(config, out, cache_dir, key, searching=searching, quiet=as_json)
    _print_reports(reports, as_json=as_json)
    if not passed:
        raise typer.Exit(1)


def build_bundles(config: BuildConfig, out: Path, cache_dir: Path | None, key: Path | None, *, searching: bool,
                  quiet: bool, federated: dict | None = None) -> tuple[list[dict], bool]:
    """The build once its config is settled (``edgekit build``, ``edgekit retrain``, ``edgekit federated``): the search
    when ``searching``, the passes, report.json and report.html per target (with ``federated``, the record of the
    federation that trained the model), and ``<out>/build-config.yaml`` (the config the bundles were built from).
    Returns the reports and whether every target passed its gates; prints nothing of the reports."""
    from edgekit.pipeline import Build
    from edgekit.report import write_reports
    from edgekit.config import save_build_config
    from edgekit.tasks import load_task_data

    cache = cache_dir or default_cache_dir()
    key, development_key = _signing_key(key, cache, quiet=quiet)
    data_set = load_task_data(config)
    progress = _progress_bars(quiet=quiet)
    say = _say(quiet=quiet)
    outcome = _search(config, data_set, out, cache, key, progress, say) if searching else None
    built = outcome.config if outcome else config
    builder = Build(built, data_set, out, cache, key, progress, say)
    with progress:
        results = builder.run()
    reports = write_reports(results, out, signing={"key": str(key), "development_key": development_key, "key_id": builder.signer},
                            data=data_set.summary, search=outcome.report() if outcome else None, test=data_set.test,
                            federated=federated)
    save_build_config(built, out)
    return reports, all(result.passed for result in results)


def _dry_run(config: BuildConfig, out: Path, cache_dir: Path | None, key: Path | None, *, searching: bool, as_json: bool) -> None:
    """--dry-run: the plan of the config as written, and what the cache holds of it."""
    from edgekit.pipeline import Build
    from edgekit.tasks import load_task_data

    cache = cache_dir or default_cache_dir()
    key, _ = _signing_key(key, cache, quiet=as_json)
    say = _say(quiet=as_json)
    if searching:
        say("--dry-run: a search would run first and choose the training; this is the plan of the config as written")
    _print_plan(Build(config, load_task_data(config), out, cache, key, _progress_bars(quiet=as_json), say), cache, as_json=as_json)


def _say(*, quiet: bool):
    return (lambda message: None) if quiet else (lambda message: console.print(message, highlight=False))


def _config_with_overrides(config_file: Path | None, *, model: str | None, task: str | None, data: Path | None,
                           targets: list[str]) -> BuildConfig:
    """The build config (CONFIG, or the embedded demo's) with --model, --data and --target applied.

    --task changes nothing: it is checked against the config's task.kind, and an unknown or different kind is an
    EdgekitError (the task's settings live in the config, so the flag alone could not switch it).
    """
    from edgekit.config import load_build_config
    from edgekit.errors import EdgekitError
    from edgekit.tasks import task_for

    config = load_build_config(config_file)
    updates = {}
    if model:
        updates["model"] = config.model.model_copy(update={"source": model})
    if data:
        updates["data"] = config.data.model_copy(update={"path": data, "calibration_path": None})
    if targets:
        updates["targets"] = targets
    if task:
        task_for(task)  # an unknown kind is an error naming the known ones
    if task and task != config.task.kind:
        raise EdgekitError(f"--task {task} differs from the config's task.kind {config.task.kind}; set task.kind in the build config")
    return config.model_copy(update=updates)


def _search_overrides(config: BuildConfig, *, search: bool | None, budget: float | None, storage: str | None) -> BuildConfig:
    """The config with --search/--no-search, --search-budget and --study-db applied to its search section."""
    from edgekit.config import MIN_SEARCH_MINUTES
    from edgekit.errors import EdgekitError

    if budget is not None and not budget >= MIN_SEARCH_MINUTES:
        raise EdgekitError(f"--search-budget {budget:g} is below the minimum of {MIN_SEARCH_MINUTES:g} minute(s); "
                           "give the search more time, or build without it (--no-search)")
    updates = {name: value for name, value in (("enabled", search), ("budget_minutes", budget), ("storage", storage)) if value is not None}
    return config.model_copy(update={"search": config.search.model_copy(update=updates)}) if updates else config


def _searching(config: BuildConfig, data_flag: Path | None) -> bool:
    from edgekit.config import DEMO_DATA
    from edgekit.search import wanted

    own_data = data_flag is not None or config.data.path != DEMO_DATA or config.data.idx is not None
    return wanted(config, own_data)


def _search(config, data_set, out: Path, cache: Path, key: Path, progress, say):
    """Run (or resume) the build's search; its outcome carries the chosen trial's config."""
    from edgekit.search import run_search

    with progress:
        outcome = run_search(config, data_set, out, cache, key, progress, say)
    say(f"search: building trial {outcome.chosen} ({len(outcome.trials)} trials, {outcome.spent_minutes:.1f} min)")
    if not outcome.within_budgets:
        chosen = next(t for t in outcome.trials if t.number == outcome.chosen)
        say(f"search: warning: no trial met every target budget; trial {outcome.chosen} is the closest "
            f"({', '.join(chosen.over_budget)}). Relax the target's budgets, add smaller candidates (search.models, "
            "prune.ratio in search.space) or give the search more time; the evaluate pass judges the bundle itself")
    return outcome


def _signing_key(key: Path | None, cache: Path, *, quiet: bool) -> tuple[Path, bool]:
    """The key to sign with and whether it is the development key, which is made in ``cache`` on first use."""
    if key is not None:
        return key, False
    from device_agent.keys import generate_keypair

    key = cache / "dev-key" / "edgekit.key"
    if not key.is_file():
        generate_keypair(key.parent)
    if not quiet:
        console.print(f"signing with the development key {key} (pass --key for a real one)", highlight=False)
    return key, True


def _progress_bars(*, quiet: bool) -> Progress:
    """The passes' progress display on the console; ``quiet`` (--json) keeps it off so stdout stays JSON."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True, disable=quiet)


def _print_plan(builder: Build, cache: Path, *, as_json: bool) -> None:
    """--dry-run: each target's steps in order, and whether the cache already holds each one's result."""
    from edgekit.pipeline import cached

    prefix, suffixes = builder.plan()
    plan = {name: [{"step": p.label, "cached": cached(cache, p) is not None} for p in prefix + steps] for name, steps in suffixes.items()}
    if as_json:
        print_json(plan)
        return
    for name, steps in plan.items():
        console.print(f"{name}: " + " → ".join(f"{s['step']}{' (cached)' if s['cached'] else ''}" for s in steps), highlight=False)


def _print_reports(reports: list[dict], *, as_json: bool) -> None:
    from edgekit.report import render

    if as_json:
        print_json(reports)
    else:
        render(reports, console)
