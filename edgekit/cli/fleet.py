"""``edgekit fleet``: run the telemetry collector, register devices, review the fleet.

SQLAlchemy, FastAPI and matplotlib are imported inside the commands, so
``edgekit --help`` stays instant.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from edgekit.cli.output import console, print_json, print_table

DEFAULT_DB = "sqlite:///edgekit-fleet.db"
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
        "3. `edgekit fleet report` and `edgekit fleet alerts` read the same database."
    ),
)
devices_app = typer.Typer(no_args_is_help=True, help="Register devices and list them.")
app.add_typer(devices_app, name="devices")


def _db_option() -> str:
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
    db: str = _db_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 for devices on the network."),
    port: int = typer.Option(8600, "--port", help="TCP port."),
    operator_token_file: Path | None = typer.Option(
        None, "--operator-token-file", help="File with the token that unlocks the query API (GET /v1/...); without it the query API is off."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level: debug, info, warning, error."),
) -> None:
    """Run the telemetry collector: devices POST window summaries to /v1/telemetry with their token.

    Migrates the database first (safe to run again, and from several collectors
    at once). The collector keeps no state: start several on one PostgreSQL
    database behind a load balancer for a large fleet.
    """
    import uvicorn

    from edgekit.fleet.collector import create_app

    token = _read_operator_token(operator_token_file) if operator_token_file else None
    store = _open(db)
    where = store.engine.url.render_as_string(hide_password=True)
    typer.echo(f"edgekit fleet collector on http://{host}:{port} (database {where}); Ctrl-C stops it", err=True)
    uvicorn.run(create_app(store, operator_token=token), host=host, port=port, log_level=log_level, access_log=False)


@devices_app.command("add")
def devices_add(
    name: str = typer.Argument(..., help="The device id the agent will send (--device-id), e.g. jetson-01."),
    db: str = _db_option(),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Write the token to this new file (mode 0600) instead of printing it."
    ),
    rotate: bool = typer.Option(False, "--rotate", help="The device exists: issue a new token; the old one stops working."),
) -> None:
    """Register a device and print its upload token ONCE (only its SHA-256 is stored).

    The token alone is printed on stdout, so `edgekit fleet devices add jetson-01 > token`
    works; or use --token-file.
    """
    from edgekit.errors import EdgekitError

    if token_file is not None and token_file.exists():
        raise EdgekitError(f"--token-file {token_file} exists; choose a new path (tokens are never overwritten)")
    store = _open(db)
    try:
        token = store.add_device(name, rotate=rotate)
    finally:
        store.close()
    if token_file is None:
        typer.echo(token)
        typer.echo(f"device {name!r} registered; the token above is shown once: give it to the agent (--device-token-file)", err=True)
        return
    try:
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise EdgekitError(f"cannot create --token-file {token_file} ({exc.strerror}); the token was NOT saved: "
                           f"run again with --rotate to issue a new one") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    typer.echo(f"device {name!r} registered; its token is in {token_file}", err=True)


@devices_app.command("list")
def devices_list(
    db: str = _db_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List registered devices with their stored windows and last upload."""
    store = _open(db)
    try:
        rows = store.list_devices()
    finally:
        store.close()
    if as_json:
        print_json([vars(row) for row in rows])
        return
    print_table(
        "Registered devices",
        ["device", "registered", "windows", "last seen"],
        [[row.id, _when(row.created_at), str(row.windows), _when(row.last_seen)] for row in rows],
    )
    if not rows:
        console.print("no devices yet: register one with `edgekit fleet devices add NAME`")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
