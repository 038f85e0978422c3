"""``edgekit retrain``: a challenger built from the champion's config, with newly labelled samples merged into its data."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.output import console, print_json


def retrain(
    from_: Path = typer.Option(..., "--from", metavar="OUT_DIR|CONFIG.yaml", help=(
        "The champion: the folder `edgekit build --out` wrote (its build-config.yaml: the config the bundles were built "
        "from, the search's choice included) or a build config YAML.")),
    add_data: Path = typer.Option(..., "--add-data", metavar="LABELLED", help=(
        "The labelled samples: the JSONL `edgekit fleet export-samples` wrote, once a person has set each row's label, "
        "or a CSV/TSV, JSONL or Parquet file with the champion's text and label columns (and optionally split).")),
    out: Path | None = typer.Option(None, "--out", help=(
        "The challenger's output folder (default: <OUT_DIR>-challenger, or out-challenger): new or empty, not the "
        "champion's output, not holding its data, not its config's folder.")),
    force: bool = typer.Option(False, "--force", help=(
        "Build into an --out that already holds files (an earlier challenger's bundles of the same version are "
        "replaced).")),
    version: str | None = typer.Option(None, "--version", help="The challenger's model.version (default: the champion's with its last number plus one)."),
    target: list[str] = typer.Option([], "--target", help="A built-in target name or a profile YAML; repeat for several (default: the champion's)."),
    new_classes: bool = typer.Option(False, "--new-classes", help=(
        "Accept labels the champion does not know: the head and outputs change, so the challenger is a different model "
        "to devices, compare and rollouts. It still starts from the champion's trained encoder (when in the cache), "
        "with a new head initialised for the new classes.")),
    search: bool = typer.Option(False, "--search", help="Search the training again on the merged data (default: the champion's recipe)."),
    key: Path | None = typer.Option(None, "--key", help="Signing key (edgekit.key); default: a development key in the cache dir."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Pass cache (default: $XDG_CACHE_HOME/edgekit)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"retrain": what the merge did, "reports": the build\'s reports} as JSON.'),
) -> None:
    """Build a challenger: the champion's config (same targets, budgets and recipe) with labelled samples merged into its data.

    Merge rule: the champion's rows keep the split they had in its build, so its test split stays comparable. New
    rows keep their own split column, else they are split by the build's rule for data without one (stratified
    70/10/20 per label by a content hash) over the new rows alone. A new text the champion already has with the same
    label is dropped as a duplicate; with another label the new label wins and the row keeps its split. Unlabelled
    rows, repeats and texts given two labels are dropped and counted. The merged rows go to
    OUT/data/retrain-data.jsonl (with a split column), which the challenger's data.path names; what was added and
    dropped is printed and kept in OUT/data/retrain-summary.json.

    Labels must be the champion's: new classes change the model's head and outputs (--new-classes allows them).

    Training: from the champion's trained weights when its build output still links them in the pass cache (copied
    to OUT/champion-model; the head refitted on the merged data, or initialised afresh and fitted when the classes
    change, then LoRA with the champion's finetune settings and adapters on the token embeddings too, so words the
    drift brought can move), else as the champion's config says. The challenger keeps the model name with a higher
    version. OUT must be new or empty (--force builds into a used one). Text classification only so far. Exits 1
    when a target fails its gates, 2 on bad input.
    """
    from edgekit.cli.build import build_bundles
    from edgekit.retrain import prepare_challenger

    challenger = prepare_challenger(from_, add_data, out_dir=out, version=version, targets=target,
                                    new_classes=new_classes, search=search, force=force)
    if not as_json:
        _print_summary(challenger.summary)
    reports, passed = build_bundles(challenger.config, challenger.out_dir, cache_dir, key, searching=search, quiet=as_json)
    if as_json:
        print_json({"retrain": challenger.summary, "reports": reports})
    else:
        from edgekit.report import render

        render(reports, console)
    if not passed:
        raise typer.Exit(1)


def _print_summary(summary: dict) -> None:
    champion, challenger, merge = summary["champion"], summary["challenger"], summary["merge"]

    def counts(mapping: dict[str, int]) -> str:
        return " · ".join(f"{name} {count}" for name, count in mapping.items() if count) or "none"

    per_label: dict[str, int] = {}
    for labels in merge["added"].values():
        for label, count in labels.items():
            per_label[label] = per_label.get(label, 0) + count
    lines = [
        f"champion: {champion['model']} {champion['version']} ({champion['from']}): {len(champion['labels'])} classes, "
        f"rows {counts(champion['rows'])}",
        f"added {merge['added_rows']} of {merge['rows_read']} labelled rows: "
        f"{counts({split: sum(labels.values()) for split, labels in merge['added'].items()})}; by label: {counts(per_label)}",
        f"relabelled {merge['relabelled']} of the champion's rows (the new label wins; they keep their split)",
        "dropped: " + (", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in merge["dropped"].items() if count) or "none"),
        *[f"warning: {warning}" for warning in merge["warnings"]],
        *([f"new classes: {', '.join(merge['new_labels'])} (new classes change the head: the challenger's outputs differ "
            "from the champion's)"] if merge["new_labels"] else []),
        f"challenger: {challenger['model']} {challenger['version']} → {challenger['out']} (data: {challenger['data']})",
        f"training: {challenger['training']}",
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False)
