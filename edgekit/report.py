"""The build report: ``<out>/<target>/report.json`` and the same facts as terminal tables."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.pipeline import TargetResult

_SUMMARY = ("accuracy", "f1_macro", "latency_p50_ms", "latency_p95_ms", "throughput", "size_mb")


def target_report(result: TargetResult) -> dict:
    metrics = dict(result.artifact.metrics) if result.artifact else {}
    quantization = metrics.get("quantization", {})
    final = {k: metrics.get("final", {}).get(k) for k in (*_SUMMARY, "top1_agreement", "max_abs_error", "mean_abs_error")}
    return {
        "target": result.target,
        "passed": result.passed,
        "error": result.error,
        "bundle": str(result.bundle) if result.bundle else None,
        "precision": result.artifact.precision if result.artifact else None,
        "gates": result.gates,
        "passes": [{"name": r.name, "seconds": round(r.seconds, 3), "cached": r.cached, "key": r.key} for r in result.passes],
        "metrics": {
            "reference": {k: metrics.get("reference", {}).get(k) for k in _SUMMARY},
            "final": final,
            "per_class": metrics.get("final", {}).get("per_class"),
            "confusion": metrics.get("final", {}).get("confusion"),
            "evaluation": metrics.get("evaluation"),
            "load": metrics.get("load"),
            "finetune": metrics.get("finetune"),
            "export": metrics.get("export"),
            "optimize": metrics.get("optimize"),
            "compile": metrics.get("compile"),
        },
        "quantization": quantization,
        "kept_in_float": list(result.artifact.kept_in_float) if result.artifact else [],
        "engine_build": dict(result.artifact.engine_build) if result.artifact and result.artifact.engine_build else None,
    }


def write_reports(results: list[TargetResult], out_dir: Path, signing: dict) -> list[dict]:
    """Write ``<out>/<target>/report.json`` for each target; ``signing`` says which key signed (and if it is the development key)."""
    reports = []
    for result in results:
        report = {**target_report(result), "signing": signing}
        path = out_dir / result.target / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        reports.append(report)
    return reports


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
        console.print(metrics)
        if report["gates"]:
            gates = Table("gate", "value", "budget", "result", title="gates", title_justify="left")
            for gate in report["gates"]:
                gates.add_row(gate["name"], _number(gate["value"]), _number(gate["budget"]), "pass" if gate["passed"] else "[red]FAIL[/]")
            console.print(gates)
        if report["kept_in_float"]:
            console.print(f"kept in float ({len(report['kept_in_float'])}): {', '.join(report['kept_in_float'])}", highlight=False)
