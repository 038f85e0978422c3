"""``edgekit fleet``: run the telemetry collector, register devices, review the fleet.

SQLAlchemy, FastAPI and matplotlib are imported inside the commands, so
``edgekit --help`` stays instant.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgekit.cli.bundle import keyring_option
from edgekit.cli.output import console, print_json, print_table

if TYPE_CHECKING:
    from edgekit.fleet.export import Exported
    from edgekit.fleet.report import Alert

DEFAULT_DB = "sqlite:///edgekit-fleet.db"
# The terminal table names the three most drifting features (--json and --html list them all).
TOP_IN_TABLE = 3
DB_HELP = (
    "The fleet database: sqlite:///path/fleet.db (default: sqlite:///edgekit-fleet.db in this folder) "
    "or postgresql://user[:password]@host:5432/dbname. Also read from EDGEKIT_FLEET_DB."
)

app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Fleet review: collect device telemetry, then see drift, latency and errors across devices.\n\n"
        "1. `edgekit fleet serve` runs the collector (creates/migrates the database).\n"
        "2. `edgekit fleet devices add jetson-01` prints that device's token once; give it to the agent "
        "(`edgekit-agent serve --telemetry-url http://HOST:8600 --device-id jetson-01 --device-token-file F`).\n"
        "3. `edgekit fleet report` and `edgekit fleet alerts` read the same database.\n\n"
        "4. `edgekit fleet deploy BUNDLE --all` rolls a bundle out in gated waves; agents pull it "
        "(`edgekit fleet rollouts`, `edgekit fleet rollout show ID`)."
    ),
)
devices_app = typer.Typer(no_args_is_help=True, help="Register devices, put them in groups, rotate their tokens, remove them.")
app.add_typer(devices_app, name="devices")


def db_option() -> str:
    return typer.Option(DEFAULT_DB, "--db", envvar="EDGEKIT_FLEET_DB", help=DB_HELP)


def _open(db: str, *, migrate: bool = True):  # type: ignore[no-untyped-def]
    from edgekit.fleet.store import Store

    return Store.open(db, migrate_schema=migrate)


def _read_operator_token(path: Path) -> str:
    from edgekit.errors import EdgekitError

    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise EdgekitError(f"cannot read --operator-token-file {path} ({exc.strerror}); write a long random token into it") from None
    if len(token) < 16:
        raise EdgekitError(f"--operator-token-file {path} holds {len(token)} characters; use a random token of at least 16")
    return token


@app.command("serve")
def serve(
    db: str = db_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 for devices on the network."),
    port: int = typer.Option(8600, "--port", help="TCP port."),
    operator_token_file: Path | None = typer.Option(
        None, "--operator-token-file", help="File with the token that unlocks the query API (GET /v1/...); without it the query API is off."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level: debug, info, warning, error."),
    rollout_interval: float = typer.Option(5.0, "--rollout-interval", min=0.1,
                                           help="Seconds between two looks at the running rollouts (advance, halt)."),
) -> None:
    """Run the telemetry collector: devices POST window summaries to /v1/telemetry with their token.

    Migrates the database first (safe to run again, and from several collectors
    at once). The collector keeps no state: start several on one PostgreSQL
    database behind a load balancer for a large fleet.
    """
    import uvicorn

    from device_agent.http_limits import connection_cap, uvicorn_options
    from edgekit.fleet.collector import HTTP_LIMITS, create_app

    token = _read_operator_token(operator_token_file) if operator_token_file else None
    store = _open(db)
    where = store.engine.url.render_as_string(hide_password=True)
    typer.echo(f"edgekit fleet collector on http://{host}:{port} (database {where}); Ctrl-C stops it", err=True)
    uvicorn.run(create_app(store, operator_token=token, rollout_interval_s=rollout_interval), host=host, port=port, log_level=log_level, access_log=False,
                **uvicorn_options(connection_cap(HTTP_LIMITS)))


@devices_app.command("add")
def devices_add(
    name: str = typer.Argument(..., help="The device id the agent will send (--device-id), e.g. jetson-01."),
    db: str = db_option(),
    group: str | None = typer.Option(None, "--group", help="Put the device in this group (deploy --group G targets it)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Write the token to this new file (mode 0600) instead of printing it."
    ),
) -> None:
    """Register a device and print its token ONCE (only its SHA-256 is stored).

    The token alone is printed on stdout, so `edgekit fleet devices add jetson-01 > token`
    works; or use --token-file. A lost token is replaced with `devices rotate-token NAME`.
    """
    _check_new_token_file(token_file)
    store = _open(db)
    try:
        token = store.add_device(name, group=group)
    finally:
        store.close()
    _hand_over_token(name, token, token_file, "registered" + (f" in group {group!r}" if group else ""))


@devices_app.command("rotate-token")
def devices_rotate_token(
    name: str = typer.Argument(..., help="A registered device."),
    db: str = db_option(),
    token_file: Path | None = typer.Option(None, "--token-file", help="Write the new token to this new file (mode 0600)."),
) -> None:
    """Issue a new token for a device; the old one stops working at once (uploads and pulls with it get 401)."""
    _check_new_token_file(token_file)
    store = _open(db)
    try:
        token = store.rotate_token(name)
    finally:
        store.close()
    _hand_over_token(name, token, token_file, "has a new token (the old one no longer works)")


@devices_app.command("remove")
def devices_remove(
    name: str = typer.Argument(..., help="A registered device."),
    db: str = db_option(),
) -> None:
    """Unregister a device: its token stops working and it leaves lists, groups and deploys. Its telemetry is kept.

    Refused while a running rollout includes the device (abort it first). `devices add NAME` brings it back with a new token.
    """
    store = _open(db)
    try:
        store.remove_device(name)
    finally:
        store.close()
    typer.echo(f"device {name!r} removed; its token no longer works, its telemetry stays in the database", err=True)


def _check_new_token_file(token_file: Path | None) -> None:
    from edgekit.errors import EdgekitError

    if token_file is not None and token_file.exists():
        raise EdgekitError(f"--token-file {token_file} exists; choose a new path (tokens are never overwritten)")


def _hand_over_token(name: str, token: str, token_file: Path | None, what: str) -> None:
    """Print the token on stdout, or write it to a new 0600 file."""
    from edgekit.errors import EdgekitError

    if token_file is None:
        typer.echo(token)
        typer.echo(f"device {name!r} {what}; the token above is shown once: give it to the agent (--device-token-file)", err=True)
        return
    try:
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise EdgekitError(f"cannot create --token-file {token_file} ({exc.strerror}); the token was NOT saved: "
                           f"issue a new one with `edgekit fleet devices rotate-token {name}`") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    typer.echo(f"device {name!r} {what}; its token is in {token_file}", err=True)


@devices_app.command("list")
def devices_list(
    db: str = db_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List registered devices with their stored windows and last upload."""
    store = _open(db, migrate=False)
    try:
        rows = store.list_devices()
    finally:
        store.close()
    if as_json:
        print_json([vars(row) for row in rows])
        return
    print_table(
        "Registered devices",
        ["device", "group", "registered", "windows", "last seen"],
        [[_name(row.id), _name(row.group or "-"), _when(row.created_at), str(row.windows), _when(row.last_seen)] for row in rows],
    )
    if not rows:
        console.print("no devices yet: register one with `edgekit fleet devices add NAME`")


def _name(text: str) -> str:
    """A name from the fleet database as a table cell: control and bidirectional characters escaped, no rich markup."""
    from rich.markup import escape

    from device_agent.telemetry_schema import escape_unprintable

    return escape(escape_unprintable(text))


def _skipped_warning(skipped: int) -> str:
    return (f"warning: {skipped} stored windows could not be read (written before the telemetry contract refused what "
            "they hold: a NaN, JSON that does not parse, an absurd time) and are left out")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _since_option() -> str | None:
    return typer.Option(None, "--since", help="Only windows that ended since: a duration (30m, 24h, 7d), an ISO date/time, or unix seconds.")


@app.command("report")
def report(
    db: str = db_option(),
    since: str | None = _since_option(),
    device: str | None = typer.Option(None, "--device", help="Only this device."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    html: Path | None = typer.Option(None, "--html", help="Also write a self-contained HTML report with plots to this file."),
    bundle: Path | None = typer.Option(None, "--bundle", help=(
        "With --html: the signed bundle (.ekb) of a model the devices serve. For each drifting device, the HTML shows "
        "which words (or image regions) the samples captured in its drifting windows lean on, beside those of its "
        "non-drifting windows (up to 50 each, that version's samples only; needs sampled capture on the agents).")),
    keyring: Path | None = keyring_option(),
) -> None:
    """Review the fleet: per device its model, requests, p95 latency, error rate, drift status and evictions;
    and drift per model version recomputed from every device's summed histogram counts.

    p95 is the worst window p95 in the period (an upper bound of the period's p95). A drift status's
    "since" is when the current run of alert (or drifting) windows began.
    """
    from edgekit.fleet.report import build_report, format_time, parse_since

    if bundle is not None and html is None:
        from edgekit.errors import EdgekitError

        raise EdgekitError("--bundle explains drifted traffic in the HTML report; pass --html FILE too")
    since_time = parse_since(since)
    store = _open(db, migrate=False)
    try:
        review = build_report(store, since=since_time, device=device)
        explained = _explain_drift(store, review, bundle, keyring) if bundle is not None else None
    finally:
        store.close()
    if html is not None:
        from edgekit.fleet.html import write_html

        write_html(review, html, explained)
    if as_json:
        print_json(review.to_dict())
        return
    rows = [
        [
            _name(d.device_id),
            _name(f"{d.model_name} {d.model_version}") if d.model_name else "-",
            str(d.requests),
            f"{d.p95_ms:.1f}" if d.p95_ms is not None else "-",
            f"{d.error_rate:.2%}" if d.error_rate is not None else "-",
            _status(d.status) + (f" since {format_time(d.status_since)}" if d.status_since else ""),
            _name(", ".join(d.top_features[:TOP_IN_TABLE])),
            str(d.evicted_total),
            format_time(d.last_seen),
        ]
        for d in review.devices
    ]
    period = f" since {format_time(since_time)}" if since_time else ""
    print_table(f"Fleet: {len(review.devices)} devices, {len(review.windows)} windows{period}",
                ["device", "model", "requests", "p95 ms", "errors", "drift", "top drifting features", "evicted", "last seen"], rows)
    if review.fleet_drift:
        print_table(
            "Fleet-wide drift per model version (summed histogram counts)",
            ["model", "devices", "windows", "requests", "drift", "top drifting features"],
            [
                [_name(f"{f.model_name} {f.model_version}"), str(f.devices), str(f.windows), str(f.requests),
                 "no reference stored" if f.reference_missing else _status("alert" if f.drifting else "ok"),
                 _name(", ".join(f.top_features[:TOP_IN_TABLE]))]
                for f in review.fleet_drift
            ],
        )
    if review.skipped_windows:
        console.print(_skipped_warning(review.skipped_windows), style="yellow", highlight=False, markup=False)
    if html is not None:
        console.print(f"HTML report: {html}", highlight=False)


def _explain_drift(store, review, bundle: Path, keyring: Path | None):  # type: ignore[no-untyped-def]
    """What the drifting devices' drifted and reference traffic lean on, explained by ``bundle``'s model."""
    from device_agent.classifier import classifier_of_bundle
    from edgekit.cli.bundle import open_trusted
    from edgekit.fleet.report import explain_drifted_traffic

    with open_trusted(bundle, keyring) as opened:
        return explain_drifted_traffic(store, review, classifier_of_bundle(opened))


def _status(status: str) -> str:
    colour = {"alert": "red", "drifting": "yellow", "ok": "green"}.get(status)
    return f"[{colour}]{status}[/{colour}]" if colour else status


@app.command("alerts")
def alerts_command(
    db: str = db_option(),
    since: str | None = _since_option(),
    max_error_rate: float | None = typer.Option(0.05, "--max-error-rate", help="Alert above this error rate (0.05 = 5%)."),
    max_p95_ms: float | None = typer.Option(None, "--max-p95-ms", help="Alert when the worst window p95 passes this (off by default)."),
    max_evictions: int | None = typer.Option(None, "--max-evictions", help="Alert when a device's outbox evicted more windows (off by default)."),
    stale_after: str | None = typer.Option(None, "--stale-after", help="Alert when a device sent nothing for this long, e.g. 1h (off by default)."),
    no_fleet_drift: bool = typer.Option(False, "--no-fleet-drift", help="Do not alert on fleet-wide drift per model version."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
) -> None:
    """List devices past thresholds (drift alerts, error rate, and the optional ones).

    Exit code: 0 no alerts, 1 alerts found, 2 the check itself failed (a bad option, a missing or unreadable
    database, any other error), with one `error: ...` line on stderr. For cron and CI:
    `edgekit fleet alerts --since 1h || notify-operators` hears of both.
    """
    from device_agent.errors import UserError
    from device_agent.telemetry_schema import escape_unprintable

    try:
        found, skipped = _find_alerts(db, since, max_error_rate, max_p95_ms, max_evictions, stale_after, no_fleet_drift)
    except Exception as error:  # exit 1 means "alerts found": whatever stops the check itself must exit 2
        lines = str(error).strip().splitlines()
        detail = lines[0] if lines else ""
        message = str(error) if isinstance(error, UserError) else f"fleet alerts failed ({type(error).__name__}): {detail}"
        typer.echo(f"error: {escape_unprintable(message)}", err=True)
        raise typer.Exit(2) from None
    if skipped:
        typer.echo(_skipped_warning(skipped), err=True)
    if as_json:
        print_json([{"subject": alert.subject, "reasons": alert.reasons} for alert in found])
    elif found:
        for alert in found:
            typer.echo(escape_unprintable(f"{alert.subject}: {'; '.join(alert.reasons)}"))
    else:
        typer.echo("no alerts")
    if found:
        raise typer.Exit(1)


def _find_alerts(db: str, since: str | None, max_error_rate: float | None, max_p95_ms: float | None,
                 max_evictions: int | None, stale_after: str | None, no_fleet_drift: bool) -> tuple[list[Alert], int]:
    """The alerts for `fleet alerts`, and how many stored windows were skipped as unreadable."""
    from edgekit.fleet.report import AlertThresholds, alerts, build_report, parse_duration, parse_since

    stale_seconds = parse_duration(stale_after, "--stale-after") if stale_after is not None else None
    thresholds = AlertThresholds(max_error_rate=max_error_rate, max_p95_ms=max_p95_ms, max_evictions=max_evictions,
                                 stale_after_s=stale_seconds, fleet_drift=not no_fleet_drift)
    store = _open(db, migrate=False)
    try:
        review = build_report(store, since=parse_since(since))
    finally:
        store.close()
    return alerts(review, thresholds), review.skipped_windows


@app.command("export-samples")
def export_samples(
    device: str = typer.Option(..., "--device", help="The device whose captured samples to export."),
    out: Path = typer.Option(..., "--out", help="Text: a .jsonl file. Images: a folder (one sub-folder of PNGs per label)."),
    db: str = db_option(),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    bundle: Path | None = typer.Option(None, "--bundle", help=(
        "The signed bundle (.ekb) of the model the samples were captured with: each text sample then carries up to 5 "
        "words that support the bundle's prediction (occlusion). Without it, no attributions are written.")),
    keyring: Path | None = keyring_option(),
) -> None:
    """Write a device's captured samples as a dataset `edgekit build` reads, labelled with the model's predictions.

    Text samples become JSONL rows {"text", "label", "captured_at"}; images become OUT/<label>/<n>.png. The labels are the
    model's own predictions (pseudo-labels): review and correct them before fine-tuning on them. Samples
    exist only where the agent's sampled capture was turned on.

    With --bundle, a text row also gets "attributions": [{"token", "score"}], up to 5 words that support the bundle's
    prediction most (positive scores only), and "explained_label", the class the bundle explained (it may differ from
    the device's "label" when the bundle is not the model that served the sample); an image export gets OUT/attributions.jsonl, one line {"file", "label", "top_regions"} per image.
    Samples captured with another model version than the bundle's get none (counted). It costs one model run per
    word (or image patch) of each sample.
    """
    from contextlib import ExitStack

    from edgekit.fleet.export import SampleExplainer
    from edgekit.fleet.export import export_samples as export

    with ExitStack() as stack:
        explainer = None
        if bundle is not None:
            from device_agent.classifier import classifier_of_bundle
            from edgekit.cli.bundle import open_trusted

            explainer = SampleExplainer(classifier_of_bundle(stack.enter_context(open_trusted(bundle, keyring))))
        store = _open(db, migrate=False)
        try:
            store.require_device(device)
            samples, skipped = store.fetch_samples(device)
        finally:
            store.close()
        written = export(samples, out, device=device, force=force, explainer=explainer)
    unreadable = f"; {skipped} stored samples could not be read and were left out" if skipped else ""
    typer.echo(f"wrote {written.count} samples of {device} to {out} ({written.kind}; {written.unlabelled} without a predicted label{unreadable})")
    if explainer is not None:
        typer.echo(_attribution_summary(written, explainer.classifier.name))


def _attribution_summary(written: Exported, model: str) -> str:
    """What --bundle added, and what it left without attributions and why."""
    parts = [f"attributions from {model} for {written.explained} of {written.count}"]
    if written.other_model:
        parts.append(f"{written.other_model} were captured with another model or version (none written for them: "
                     "export again with that version's bundle)")
    if written.unexplained:
        parts.append(f"{written.unexplained} had nothing the model could explain (first: {written.problem})")
    return "; ".join(parts)
