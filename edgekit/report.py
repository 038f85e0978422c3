"""The build report: ``<out>/<target>/report.json``, ``report.html`` beside it, and the same facts as terminal tables.

The HTML page is self-contained and needs no plotting library (a build host
need not have one): the confusion matrix is a table shaded by row share, the
fine-tuning loss curve an inline SVG.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from edgekit.data import Split
from edgekit.pipeline import TargetResult
from edgekit.results import PassResults

_SUMMARY = ("accuracy", "f1_macro", "latency_p50_ms", "latency_p95_ms", "throughput", "size_mb")


def target_report(result: TargetResult) -> dict:
    """One target's report: the typed records of its passes (``edgekit.results``) as JSON, plus the build's verdict."""
    artifact = result.artifact
    results = artifact.results if artifact else PassResults()
    evaluation = results.evaluation

    def dumped(record) -> dict | None:
        return record.model_dump(mode="json", exclude_unset=True) if record is not None else None

    def summary(metrics, keys) -> dict:
        return {k: getattr(metrics, k) if metrics else None for k in keys}

    final = evaluation.final if evaluation else None
    return {
        "target": result.target,
        "passed": result.passed,
        "error": result.error,
        "bundle": str(result.bundle) if result.bundle else None,
        "precision": artifact.precision if artifact else None,
        "gates": [gate.model_dump() for gate in result.gates],
        "passes": [{"name": r.name, "seconds": round(r.seconds, 3), "cached": r.cached, "key": r.key} for r in result.passes],
        "metrics": {
            "reference": summary(evaluation.reference if evaluation else None, _SUMMARY),
            "final": summary(final, (*_SUMMARY, "top1_agreement", "top1_agreement_lower_95", "flips", "batched_top1_agreement",
                                    "max_abs_error", "mean_abs_error")),
            "pr_auc": {"reference": evaluation.reference.pr_auc, "final": final.pr_auc, "positive": final.pr_auc_label}
            if final and final.pr_auc is not None else None,
            "per_class": final.per_class if final else None,
            "confusion": final.confusion if final else None,
            "evaluation": {"runtime": evaluation.runtime, "proxy": evaluation.proxy, "test_rows": evaluation.test_rows,
                           "rows_per_run": final.rows_per_run} if evaluation else None,
            "load": dumped(results.load),
            "finetune": dumped(results.finetune),
            "prune": dumped(results.prune),
            "export": dumped(results.export),
            "qat": dumped(results.qat),
            "optimize": dumped(results.optimize),
            "compile": dumped(results.compile),
        },
        "quantization": dumped(results.quantization) or {},
        "kept_in_float": list(artifact.kept_in_float) if artifact else [],
        "engine_build": dict(artifact.engine_build) if artifact and artifact.engine_build else None,
    }


def write_reports(results: list[TargetResult], out_dir: Path, signing: dict, data: dict | None = None,
                  search: dict | None = None, test: Split | None = None, federated: dict | None = None) -> list[dict]:
    """Write ``report.json`` and ``report.html`` per target; ``signing`` says which key signed, ``data`` what was read and
    dropped, ``search`` the trials that chose the model (``edgekit.search.SearchOutcome.report``), when one ran; with the
    ``test`` split, what each bundle leans on per class (``edgekit.explanations``); ``federated``, the record of the
    federation that trained the model (``edgekit.federated.coordinator.Coordinator.report``)."""
    from edgekit.explanations import report_explanations

    reports = []
    for result in results:
        explanations, explanations_html = report_explanations(result.bundle, Path(signing["key"]), test)
        report = {**target_report(result), "signing": signing, "data": data or {}, "search": search,
                  "explanations": explanations, "federated": federated}
        path = out_dir / result.target / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        (path.parent / "report.html").write_text(report_html(report, explanations_html))
        reports.append(report)
    return reports


# ---------------------------------------------------------------- HTML


def _confusion_html(labels: list[str], confusion: list[list[int]]) -> str:
    """Rows are true classes, columns predictions; a cell's shade is its share of the row."""
    head = "".join(f"<th class=rot><span>{html.escape(label)}</span></th>" for label in labels)
    rows = []
    for label, row in zip(labels, confusion, strict=True):
        total = sum(row) or 1
        cells = []
        for column, count in enumerate(row):
            share = count / total
            hue = 140 if column == len(rows) else 0  # the diagonal green, errors red
            colour = f"hsla({hue}, 70%, 45%, {share:.3f})"
            cells.append(f'<td style="background:{colour}" title="{count} of {total} ({share:.1%})">{count}</td>')
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table class=confusion><tr><th>true \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


def _curve_svg(values: list[float], width: int = 480, height: int = 160, label: str = "training loss") -> str:
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    points = " ".join(f"{i * (width - 20) / (len(values) - 1) + 10:.1f},{height - 10 - (v - low) * (height - 20) / span:.1f}"
                      for i, v in enumerate(values))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(label)}">'
            f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{points}"/>'
            f'<text x="12" y="14" font-size="11">{high:.3f}</text><text x="12" y="{height - 2}" font-size="11">{low:.3f}</text></svg>')


def _trials_svg(search: dict, width: int = 520, height: int = 260) -> str:
    """Validation accuracy against latency, one dot per finished trial: the Pareto front joined, the chosen one ringed,
    a trial over a target budget hollow."""
    done = [t for t in search["trials"] if t["state"] == "COMPLETE"]
    if not done:
        return ""
    pad = 40
    xs, ys = [t["latency_p50_ms"] for t in done], [t["val_accuracy"] for t in done]
    x_low, x_span = min(xs), (max(xs) - min(xs)) or 1.0
    y_low, y_span = min(ys), (max(ys) - min(ys)) or 0.01

    def at(t: dict) -> tuple[float, float]:
        return (pad + (t["latency_p50_ms"] - x_low) * (width - 2 * pad) / x_span,
                height - pad - (t["val_accuracy"] - y_low) * (height - 2 * pad) / y_span)

    front = sorted((t for t in done if t["number"] in search["pareto"]), key=lambda t: t["latency_p50_ms"])
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(at, front))
    dots = []
    for t in done:
        x, y = at(t)
        colour = "#dc2626" if t["number"] in search["pareto"] else "#6b7280"
        over = t.get("over_budget") or []
        paint = f'fill="white" stroke="{colour}" stroke-width="2"' if over else f'fill="{colour}"'
        dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" {paint}><title>trial {t["number"]}: '
                    f'{t["val_accuracy"]:.4f}, {t["latency_p50_ms"]:.2f} ms{"; over budget: " + ", ".join(over) if over else ""}'
                    '</title></circle>')
        if t["number"] == search["chosen"]:
            dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#111" stroke-width="2"/>')
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="validation accuracy against latency">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#999"/>'
            f'<line x1="{pad}" y1="10" x2="{pad}" y2="{height - pad}" stroke="#999"/>'
            f'<polyline fill="none" stroke="#dc2626" stroke-dasharray="4 3" points="{line}"/>{"".join(dots)}'
            f'<text x="{pad}" y="{height - 22}" font-size="11">{x_low:.2f} ms</text>'
            f'<text x="{width - 90}" y="{height - 22}" font-size="11">{x_low + x_span:.2f} ms</text>'
            f'<text x="{width / 2 - 90:.0f}" y="{height - 6}" font-size="11">PyTorch latency at batch 1 (p50)</text>'
            f'<text x="2" y="{height - pad}" font-size="11">{y_low:.3f}</text><text x="2" y="16" font-size="11">{y_low + y_span:.3f}</text>'
            "</svg>")


def _budgets_text(search: dict) -> str:
    budgets = search.get("budgets")
    if not budgets:
        return ""
    held = ([f"p95 latency {budgets['latency_p95_ms']:g} ms ({budgets['latency_target']})"] if budgets["latency_p95_ms"] else []) + [
        f"size {size['mb']:g} MB ({size['target']})" for size in budgets["sizes"]]
    return f"; hollow: over a target budget (trials held to {html.escape(', '.join(held))}; {html.escape(budgets['how'])})" if held else ""


def _search_html(search: dict | None) -> str:
    if not search:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{t['number']}{' (chosen)' if t['number'] == search['chosen'] else ''}</td><td>{e(t['state'])}</td>"
        f"<td>{_number(t['val_accuracy'])}</td><td>{_number(t['val_f1_macro'])}</td><td>{_number(t['latency_p50_ms'])}</td>"
        f"<td>{_number(t.get('latency_p95_ms'))}</td>"
        f"<td>{_number(t['size_mb'])}</td><td>{e(', '.join(t.get('over_budget') or []))}</td><td>{_number(t['seconds'])}</td>"
        f"<td>{e(', '.join(f'{k}={_number(v)}' for k, v in t['params'].items()))}</td><td>{e(t['note'] or '')}</td></tr>"
        for t in search["trials"])
    return (f"<h2>Search</h2><p>{len(search['trials'])} trials in {search['spent_minutes']} of {search['budget_minutes']} minutes "
            f"(study {e(search['study'])}, {e(search['storage'])}); chosen: trial {search['chosen']}, by {e(search['selection'])}; "
            f"red: the Pareto front{_budgets_text(search)}; latency: {e(search['latency'])}.</p>"
            f"{_trials_svg(search)}"
            "<table><tr><th>trial</th><th>state</th><th>val accuracy</th><th>val F1 macro</th><th>latency p50 ms</th>"
            "<th>latency p95 ms</th><th>size MB</th>"
            "<th>over budget</th>"
            f"<th>seconds</th><th>params</th><th>note</th></tr>{rows}</table>")


def report_html(report: dict, explanations_html: str = "") -> str:
    """One target's report as a self-contained page: summary, gates, per-class metrics, confusion matrix, what the
    model leans on (``explanations_html``: its heat maps are not in report.json), fine-tuning."""
    e = html.escape
    metrics = report["metrics"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    summary = "".join(f"<tr><td>{e(k)}</td><td>{_number(metrics['reference'].get(k))}</td><td>{_number(metrics['final'].get(k))}</td></tr>"
                      for k in (*_SUMMARY, "top1_agreement"))
    gates = "".join(f"<tr><td>{e(g['name'])}</td><td>{_number(g['value'])}</td><td>{_number(g['budget'])}</td>"
                    f"<td class={'ok' if g['passed'] else 'bad'}>{'pass' if g['passed'] else 'FAIL'}</td></tr>" for g in report["gates"])
    per_class = metrics.get("per_class") or {}
    classes = "".join(f"<tr><td>{e(label)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td><td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
                      for label, v in per_class.items())
    confusion = _confusion_html(list(per_class), metrics["confusion"]) if metrics.get("confusion") and per_class else "<p>not measured</p>"
    finetune = metrics.get("finetune") or {}
    tuning = ""
    if finetune:
        rows = "".join(f"<tr><td>{e(k.replace('_', ' '))}</td><td>{_number(finetune.get(k))}</td></tr>" for k in
                       ("method", "device", "val_accuracy_head_only", "val_accuracy", "best_epoch", "epochs_run", "seconds",
                        "samples_per_second", "kept") if k in finetune)
        tuning = f"<h2>Fine-tuning</h2><table>{rows}</table>{_curve_svg(list(finetune.get('loss_curve') or []))}"
    data = report.get("data") or {}
    data_html = ""
    if data:
        dropped = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in (data.get("dropped") or {}).items()) or "none"
        balance = data.get("balance") or {}
        balance_rows = "".join(f"<tr><td>{e(label)}</td>" + "".join(f"<td>{balance.get(split, {}).get(label, 0)}</td>" for split in balance) + "</tr>"
                               for label in sorted({label for counts in balance.values() for label in counts}))
        data_html = (f"<h2>Data</h2><p>{e(str(data.get('source', '')))}: {data.get('rows_kept')} of {data.get('rows_read')} rows kept; "
                     f"dropped: {e(dropped)}</p><table><tr><th>class</th>{''.join(f'<th>{e(s)}</th>' for s in balance)}</tr>{balance_rows}</table>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgekit build report: {e(report['target'])}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #111; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f4f6; }} td:first-child, th:first-child {{ text-align: left; }}
.ok {{ color: #166534; }} .bad {{ color: #b91c1c; font-weight: bold; }}
.confusion td {{ min-width: 2.5em; text-align: center; }}
th.rot {{ height: 110px; white-space: nowrap; vertical-align: bottom; }}
th.rot span {{ writing-mode: vertical-rl; transform: rotate(180deg); }}
</style></head><body>
<h1>{e(report['target'])}: {verdict}</h1>
<p>precision {e(str(report['precision']))}; bundle {e(str(report['bundle']))}{('; error: ' + e(report['error'])) if report['error'] else ''}</p>
<h2>Metrics (test split)</h2><table><tr><th>metric</th><th>fp32 reference</th><th>final</th></tr>{summary}</table>
<h2>Gates</h2><table><tr><th>gate</th><th>value</th><th>budget</th><th>result</th></tr>{gates}</table>
<h2>Per class (final model)</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{classes}</table>
<h2>Confusion matrix (final model)</h2>{confusion}
{explanations_html}{_search_html(report.get("search"))}{_federated_html(report.get("federated"))}{tuning}{data_html}
</body></html>
"""


def _calibration_text(calibration: dict | None) -> str:
    """One line on the head refitted from the sites' statistics after the rounds (``Coordinator.calibrate_head``)."""
    if not calibration:
        return ""
    if "val_accuracy_after" not in calibration:
        return f"head calibration: not applied ({calibration['reason']})"
    return (f"head calibration: validation accuracy {calibration['val_accuracy_before']:.4f} with FedAvg's head, "
            f"{calibration['val_accuracy_after']:.4f} refitted from {len(calibration['sites'])} sites' statistics; "
            + ("the refitted head ships" if calibration["applied"] else "FedAvg's head ships"))


def _federated_html(federated: dict | None) -> str:
    """The federation's rounds (validation accuracy of each global model, plotted), its sites and their label skew."""
    if not federated:
        return ""
    e = html.escape
    rounds = "".join(f"<tr><td>{r['round']}</td><td>{_number(r['accuracy'])}</td><td>{_number(r['val_loss'])}</td>"
                     f"<td>{_number(r['loss'])}</td><td>{e(', '.join(r['sites']))}</td><td>{e(', '.join(r['dropped']))}</td>"
                     f"<td>{r['bytes_from_each_site']:,}</td><td>{_number(r['seconds'])}</td></tr>" for r in federated["per_round"])
    labels = sorted({label for c in federated["per_client"] for label in c["label_counts"]})
    clients = "".join(f"<tr><td>{e(c['client'])}</td><td>{c['rows']}</td>"
                      + "".join(f"<td>{c['label_counts'].get(label, 0)}</td>" for label in labels) + "</tr>"
                      for c in federated["per_client"])
    dp = federated["dp"]
    privacy = (f"client-side differential privacy: clipping {dp['clipping_norm']}, noise ×{dp['noise_multiplier']}, "
               f"ε {dp['epsilon']} at δ {dp['delta']} ({e(dp['accountant'])})" if dp.get("enabled") else "no differential privacy")
    calibration = _calibration_text(federated.get("head_calibration"))
    return (f"<h2>Federated fine-tuning</h2><p>{federated['clients']} sites, {federated['rounds']} rounds of "
            f"{federated['local_epochs']} local epoch(s), {e(federated['strategy'])}, partition {e(str(federated['partition']))}; "
            f"{privacy}; secure aggregation {'on' if federated['secure_aggregation']['enabled'] else 'off'}. "
            f"Left each site: {e('; '.join(federated['left_each_site']))}. Never left a site: {e('; '.join(federated['never_left_a_site']))}.</p>"
            f"<p>{e(calibration)}</p>"
            f"<p>Validation accuracy of the global model per round (round 0: the starting adapter)</p>"
            f"{_curve_svg([r['accuracy'] for r in federated['per_round']], label='validation accuracy per round')}"
            f"<table><tr><th>round</th><th>val accuracy</th><th>val loss</th><th>train loss</th><th>sites</th><th>dropped</th>"
            f"<th>bytes per site</th><th>s</th></tr>{rounds}</table>"
            f"<table><tr><th>site</th><th>rows</th>{''.join(f'<th>{e(label)}</th>' for label in labels)}</tr>{clients}</table>")


def _number(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def render(reports: list[dict], console) -> None:
    from rich.table import Table

    for report in reports:
        verdict = "[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]"
        console.print(f"\n[bold]{report['target']}[/] {verdict}" + (f"  {report['bundle']}" if report["bundle"] else ""))
        if report["bundle"] and report["signing"]["development_key"]:
            console.print(f"signed with the development key {report['signing']['key']}: fine for trying, not for a fleet", highlight=False)
        if report["error"]:
            console.print(f"[red]error:[/] {report['error']}", markup=True, highlight=False)
        passes = Table("pass", "seconds", "cached", title="passes", title_justify="left")
        for row in report["passes"]:
            passes.add_row(row["name"], f"{row['seconds']:.2f}", "yes" if row["cached"] else "no")
        console.print(passes)
        metrics = Table("metric", "fp32 reference", f"final ({report['precision']})", title="metrics (test split)", title_justify="left")
        for key in (*_SUMMARY, "top1_agreement"):
            metrics.add_row(key, _number(report["metrics"]["reference"].get(key)), _number(report["metrics"]["final"].get(key)))
        if report["metrics"].get("pr_auc"):
            positive = report["metrics"]["pr_auc"].get("positive") or "positive"
            metrics.add_row(f"pr_auc ({positive})", _number(report["metrics"]["pr_auc"]["reference"]), _number(report["metrics"]["pr_auc"]["final"]))
        console.print(metrics)
        finetune = report["metrics"].get("finetune") or {}
        if finetune.get("val_accuracy_head_only") is not None:
            tuning = Table("validation split", "head only", f"fine-tuned ({finetune['method']})", title="customization",
                           title_justify="left")
            tuning.add_row("accuracy", _number(finetune["val_accuracy_head_only"]), _number(finetune["val_accuracy"]))
            console.print(tuning)
        if report.get("search"):
            _render_search(report["search"], console)
        if report.get("federated"):
            federated = report["federated"]
            accuracies = " → ".join(f"{r['accuracy']:.3f}" for r in federated["per_round"])
            console.print(f"federated: {federated['clients']} sites, {federated['rounds']} rounds ({federated['strategy']}, "
                          f"partition {federated['partition']}); validation accuracy per round {accuracies}; "
                          f"{federated['per_round'][-1]['bytes_from_each_site']:,} bytes from each site per round", highlight=False)
            if federated.get("head_calibration"):
                console.print(_calibration_text(federated["head_calibration"]), highlight=False)
        if report.get("data"):
            data = report["data"]
            dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in data["dropped"].items()) or "none"
            console.print(f"data: {data['rows_kept']} of {data['rows_read']} rows kept (dropped: {dropped})", highlight=False)
        if report["gates"]:
            gates = Table("gate", "value", "budget", "result", title="gates", title_justify="left")
            for gate in report["gates"]:
                gates.add_row(gate["name"], _number(gate["value"]), _number(gate["budget"]), "pass" if gate["passed"] else "[red]FAIL[/]")
            console.print(gates)
        if report["kept_in_float"]:
            console.print(f"kept in float ({len(report['kept_in_float'])}): {', '.join(report['kept_in_float'])}", highlight=False)


def _render_search(search: dict, console) -> None:
    from rich.table import Table

    table = Table("trial", "state", "val acc", "latency ms", "size MB", "over budget", "s", "what it tried", title=(
        f"search: {len(search['trials'])} trials, {search['spent_minutes']} of {search['budget_minutes']} min; "
        f"chosen trial {search['chosen']} (* Pareto front)"), title_justify="left")
    for t in search["trials"]:
        mark = ("→ " if t["number"] == search["chosen"] else "") + str(t["number"]) + (" *" if t["number"] in search["pareto"] else "")
        params = " ".join(f"{k.removeprefix('finetune.')}={v:.3g}" if isinstance(v, float) else f"{k.removeprefix('finetune.')}={v}"
                          for k, v in t["params"].items())
        table.add_row(mark, t["state"].lower(), _number(t["val_accuracy"]), _number(t["latency_p50_ms"]), _number(t["size_mb"]),
                      ", ".join(t.get("over_budget") or []), _number(t["seconds"]), params)
    console.print(table)
