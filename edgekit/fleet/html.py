"""The fleet report as one self-contained HTML file: tables, and matplotlib plots embedded as PNG data URIs.

No script, stylesheet or image is fetched from anywhere, so the file can be
mailed, archived by CI, or opened on a machine without network access.

Given a bundle (``--bundle``), it also shows what each drifting device's drifted traffic leans on, beside what its
reference traffic leans on (``report.explain_drifted_traffic``): words for text, mean heat maps for images. A captured
image that cannot be decoded is skipped and counted per device, not a reason to lose the report.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from collections import Counter, defaultdict
from pathlib import Path

from device_agent.telemetry_schema import escape_unprintable
from edgekit.fleet.report import DriftExplained, FleetReport, TrafficLean, format_time

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>edgekit fleet report</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
 table { border-collapse: collapse; margin: 1em 0 2em; }
 th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }
 th { background: #f2f2f2; }
 .alert { background: #fdd; } .drifting { background: #ffe9c4; } .ok { background: #e3f6e3; } .unknown { color: #888; }
 img { max-width: 100%; display: block; margin: 0 0 2em; }
 .muted { color: #777; font-size: 13px; }
 .warning { background: #fdd; padding: 4px 8px; display: inline-block; }
 .side-by-side { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
 .side-by-side table, .side-by-side img { margin-bottom: 1em; }
 figure { margin: 0; } figure img { width: 224px; image-rendering: pixelated; margin: 0; }
</style>
</head>
<body>
<h1>edgekit fleet report</h1>
<p class="muted">generated {{ when(report.generated_at) }}{% if report.since %}; windows that ended since {{ when(report.since) }}{% endif %};
 {{ report.devices|length }} devices, {{ report.windows|length }} windows</p>
{% if report.skipped_windows %}
<p class="warning">{{ report.skipped_windows }} stored windows could not be read (written before the telemetry contract
 refused what they hold) and are left out of every number below.</p>
{% endif %}

<h2>Devices</h2>
<table>
<tr><th>device</th><th>model</th><th>requests</th><th>p95 ms (worst window)</th><th>error rate</th><th>drift</th><th>since</th>
<th>top drifting features</th><th>outbox evictions</th><th>sequence gaps</th><th>last seen</th></tr>
{% for d in report.devices %}
<tr>
 <td>{{ d.device_id }}</td>
 <td>{{ d.model_name|name or "-" }} {{ d.model_version|name }}</td>
 <td>{{ d.requests }}</td>
 <td>{{ "%.1f"|format(d.p95_ms) if d.p95_ms is not none else "-" }}</td>
 <td>{{ "%.2f%%"|format(100 * d.error_rate) if d.error_rate is not none else "-" }}</td>
 <td class="{{ d.status }}">{{ d.status }}</td>
 <td>{{ when(d.status_since) if d.status_since else "" }}</td>
 <td>{{ d.top_features|join(", ") }}</td>
 <td>{{ d.evicted_total }}</td>
 <td>{{ d.sequence_gaps }}</td>
 <td>{{ when(d.last_seen) }}</td>
</tr>
{% endfor %}
</table>

<h2>Fleet-wide drift (summed histogram counts)</h2>
{% if report.fleet_drift %}
<table>
<tr><th>model</th><th>version</th><th>devices</th><th>windows</th><th>requests</th><th>drift</th><th>top drifting features</th><th>worst PSI</th></tr>
{% for f in report.fleet_drift %}
<tr>
 <td>{{ f.model_name|name }}</td><td>{{ f.model_version|name }}</td><td>{{ f.devices }}</td><td>{{ f.windows }}</td><td>{{ f.requests }}</td>
 <td class="{{ 'alert' if f.drifting else ('unknown' if f.reference_missing else 'ok') }}">
  {{ 'drifting' if f.drifting else ('no reference stored' if f.reference_missing else 'ok') }}</td>
 <td>{{ f.top_features|join(", ") }}</td>
 <td>{{ "%.3f"|format(worst_psi(f)) if f.scores else "-" }}</td>
</tr>
{% endfor %}
</table>
{% else %}<p class="muted">no windows with a model and a drift reference in this period</p>{% endif %}

{% if explained is not none %}
<h2>What drifting devices' traffic leans on ({{ explained.model|name }})</h2>
<p class="muted">Occlusion attributions with this bundle's model of up to {{ explained.per_side }} samples captured in each drifting
 device's drifting windows, and of up to {{ explained.per_side }} captured in its windows judged not drifting (the reference
 traffic), both answered by this model version. A word's lean: its positive scores summed over the explained samples,
 divided by their number; "in" counts the samples it supports the prediction in.</p>
{% if not explained.devices %}<p class="muted">no device is drifting in this period</p>{% endif %}
{% for d in explained.devices %}
<h3>{{ d.device_id }} <span class="{{ d.status }}">{{ d.status }}</span></h3>
{% if d.note %}<p class="muted">{{ d.note }}</p>{% endif %}
{% if d.unreadable %}<p class="warning">{{ d.unreadable }} captured image{{ "s" if d.unreadable != 1 else "" }} could not be
 decoded and {{ "were" if d.unreadable != 1 else "was" }} skipped, not explained (the first: {{ d.unreadable_problem|name }})</p>{% endif %}
{% if d.drifted is not none %}
<div class="side-by-side">
{% for title, side, other, other_name in [("drifted traffic", d.drifted, d.reference, "reference"), ("reference traffic", d.reference, d.drifted, "drifted")] if side is not none %}
{% if side.heatmap is not none %}
<figure><img alt="mean heat map of the {{ title }}" src="{{ heatmap_uri(side) }}">
<figcaption class="muted">{{ title }}: mean of {{ side.samples }} heat maps (red: supports the prediction)</figcaption></figure>
{% else %}
<table>
<tr><th colspan="4">{{ title }} ({{ side.samples }} samples explained)</th></tr>
<tr><th>word</th><th>lean</th><th>in</th><th>lean, {{ other_name }}</th></tr>
{% for w in side.words %}
<tr><td>{{ w.token|name }}</td><td>{{ "%.3g"|format(w.lean) }}</td><td>{{ w.samples }}</td>
 <td>{{ "%.3g"|format(other.lean_of(w.token)) if other is not none else "-" }}</td></tr>
{% else %}
<tr><td colspan="4" class="muted">no word supports the predictions</td></tr>
{% endfor %}
</table>
{% endif %}
{% endfor %}
</div>
{% endif %}
{% endfor %}
{% endif %}

{% for title, uri in plots %}
<h2>{{ title }}</h2>
<img alt="{{ title }}" src="{{ uri }}">
{% endfor %}
</body>
</html>
"""


def render_html(report: FleetReport, explained: DriftExplained | None = None) -> str:
    """The whole report as one HTML document; with ``explained``, a section on what drifted traffic leans on."""
    import jinja2

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    # Names from the database: control and bidirectional characters would reorder or garble what the browser shows.
    environment.filters["name"] = lambda text: escape_unprintable(text) if text else ""
    template = environment.from_string(_TEMPLATE)
    return template.render(
        report=report,
        plots=_plots(report),
        when=format_time,
        worst_psi=lambda entry: max(score.psi for score in entry.scores.values()),
        explained=explained,
        heatmap_uri=_heatmap_uri,
    )


def write_html(report: FleetReport, path: Path, explained: DriftExplained | None = None) -> None:
    from device_agent.files import write_atomically

    write_atomically(path, render_html(report, explained).encode("utf-8"))


def _heatmap_uri(side: TrafficLean) -> str:
    from edgekit.heatmap import heatmap_png

    assert side.heatmap is not None and side.pixels is not None
    return "data:image/png;base64," + base64.b64encode(heatmap_png(side.pixels, side.heatmap)).decode("ascii")


def _plots(report: FleetReport) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    from matplotlib import pyplot as plt

    series: dict[str, list] = defaultdict(list)
    for window in report.windows:
        series[window.device_id].append(window)
    plots = []

    figure, axes = plt.subplots(figsize=(11, 4))
    for device, windows in sorted(series.items()):
        judged = [w for w in windows if w.scores]
        if not judged:
            continue
        times = [dt.datetime.fromtimestamp(w.ended_at) for w in judged]
        worst = [max(score.psi for score in w.scores.values()) for w in judged]
        (line,) = axes.plot(times, worst, marker=".", label=device)
        alert_points = [(t, s) for t, s, w in zip(times, worst, judged) if w.alert]
        if alert_points:
            axes.scatter(*zip(*alert_points), marker="x", s=60, color=line.get_color(), zorder=3)
    axes.set_ylabel("worst feature PSI in window")
    axes.set_title("Drift score over time per device (x: alert windows)")
    _finish(axes)
    plots.append(("Drift score over time", _png(figure)))

    figure, axes = plt.subplots(figsize=(11, 4))
    for device, windows in sorted(series.items()):
        points = [(dt.datetime.fromtimestamp(w.ended_at), w.p95_ms) for w in windows if w.p95_ms is not None]
        if points:
            axes.plot(*zip(*points), marker=".", label=device)
    axes.set_ylabel("p95 latency (ms)")
    axes.set_title("Latency over time per device (window p95)")
    _finish(axes)
    plots.append(("Latency over time", _png(figure)))

    figure, axes = plt.subplots(figsize=(11, 3.5))
    versions = Counter(
        escape_unprintable(f"{d.model_name} {d.model_version}") if d.model_name else "no model" for d in report.devices
    )
    labels = sorted(versions)
    axes.barh(labels, [versions[label] for label in labels], color="#4c72b0")
    axes.set_xlabel("devices (latest window's model)")
    axes.set_title("Model versions across the fleet")
    axes.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    plots.append(("Model versions across the fleet", _png(figure)))
    return plots


def _finish(axes) -> None:  # type: ignore[no-untyped-def]
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no data in this period", ha="center", va="center", transform=axes.transAxes)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        from matplotlib import dates

        # Ticks that fit the period shown: seconds for a short run, days for a month, never 54:40.500000.
        locator = dates.AutoDateLocator()
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    axes.figure.tight_layout()


def _png(figure) -> str:  # type: ignore[no-untyped-def]
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
