"""``edgekit compare``: a champion bundle against a challenger on labelled slices, with a promote-or-keep verdict."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.bundle import keyring_option
from edgekit.cli.output import print_json, print_table


def compare(
    champion: Path = typer.Argument(..., help="The bundle in service now (.ekb)."),
    challenger: Path = typer.Argument(..., help="The bundle that would replace it (.ekb)."),
    data: list[Path] = typer.Option(..., "--data", help=(
        "Labelled data, one slice per --data (repeat it: the original test split, a drifted slice, ...). Text: CSV, "
        "TSV, JSONL or Parquet with a text and a label column; images: a folder of class folders (<class>/*.png); "
        "tables: CSV or Parquet with a label column. The whole file is the slice (a split column is ignored); rows are "
        "cleaned as the build cleans them (rows without a label; for text also empty texts, repeats and texts given "
        "two labels; for images unreadable files) and what was dropped is shown.")),
    label_column: str = typer.Option("label", "--label-column", help="The column holding each row's true class."),
    text_column: str = typer.Option("text", "--text-column", help="The column holding each row's text (text bundles)."),
    alpha: float = typer.Option(0.05, "--alpha", help=(
        "Significance level of McNemar's test: for a gain, of its p-values Holm-Bonferroni adjusted over the slices.")),
    keyring: Path | None = keyring_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Run two classification bundles on the same labelled slices and say whether to promote the challenger.

    Per slice: rows, both accuracies and macro F1s, how often the two agree, the rows only one of them gets right, and
    McNemar's exact test on those rows. Verdict: promote when the challenger is significantly better on at least one
    slice and significantly worse on none; otherwise keep. Better: more rows only it gets right, with McNemar's p
    Holm-Bonferroni adjusted over the slices below alpha (each slice added is one more chance of a lucky gain: two
    slices each with p just under alpha do not promote). Worse: more rows only the champion gets right with p below
    alpha, unadjusted (the cautious side). Exit code: 0 for promote, 1 for keep, 2 for bad input, so `edgekit compare
    ... && edgekit fleet deploy ...` deploys only a winner.
    """
    from contextlib import ExitStack

    from device_agent.classifier import classifier_of_bundle
    from device_agent.files import sha256_file
    from edgekit import compare as comparing
    from edgekit.cli.bundle import open_trusted

    with ExitStack() as stack:
        bundles = [stack.enter_context(open_trusted(path, keyring)) for path in (champion, challenger)]
        classifiers = [classifier_of_bundle(bundle) for bundle in bundles]
        slices, verdict = comparing.compare(*classifiers, data, comparing.Columns(text_column, label_column), alpha)
    roles = {role: {"name": classifier.manifest.model.name, "version": classifier.manifest.model.version,
                    "sha256": sha256_file(path)[0]}
             for role, classifier, path in zip(("champion", "challenger"), classifiers, (champion, challenger), strict=True)}
    judged = comparing.judge(slices)
    if as_json:
        print_json({**roles, "slices": [{**j.result.to_dict(), "p_value_holm": j.p_value_holm, "counts_as": j.counts_as}
                                        for j in judged],
                    "verdict": verdict.name, "reason": verdict.reason, "rule": comparing.RULE})
    else:
        _print_human(roles, judged, verdict)
    if not verdict.promote:
        raise typer.Exit(1)


def _print_human(roles: dict, judged: list, verdict) -> None:
    from edgekit.compare import RULE

    for role, info in roles.items():
        typer.echo(f"{role + ':':<12}{info['name']} {info['version']} (sha256 {info['sha256'][:12]}…)")
    slices = [j.result for j in judged]
    names = [Path(result.data).name for result in slices]
    shown = names if len(set(names)) == len(names) else [result.data for result in slices]  # short, unless ambiguous
    several = len(slices) > 1
    columns = ["slice", "rows", "accuracy", "macro F1", "agree", "only one right", "p", *(["Holm p"] if several else [])]
    print_table("champion → challenger", columns, [[
        name, str(j.result.rows),
        f"{j.result.champion.accuracy:.1%} → {j.result.challenger.accuracy:.1%}",
        f"{j.result.champion.f1_macro:.3f} → {j.result.challenger.f1_macro:.3f}",
        f"{j.result.agreement:.1%}", f"{j.result.champion_only} / {j.result.challenger_only}",
        f"{j.result.p_value:.3g}" + (" *" if j.counts_as == "worse" or (j.counts_as and not several) else ""),
        *([f"{j.p_value_holm:.3g}" + (" *" if j.counts_as == "better" else "")] if several else []),
    ] for name, j in zip(shown, judged, strict=True)])
    typer.echo("only one right: rows only the champion / only the challenger gets right; p: McNemar's exact test on "
               "them" + ("; Holm p: adjusted over the slices, which a gain must have below alpha" if several else "")
               + " (* counts in the verdict)")
    for name, result in zip(shown, slices, strict=True):
        if result.dropped:
            left_out = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in result.dropped.items())
            typer.echo(f"{name}: rows left out: {left_out}")
    typer.echo(f"verdict: {verdict.name.upper()}: {verdict.reason}")
    typer.echo(f"rule: {RULE}")
