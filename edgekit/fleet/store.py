"""The fleet's telemetry store: SQLAlchemy Core tables on SQLite (default) or PostgreSQL.

Storage is exactly-once by key: a window is stored under ``(device_id, sequence)``
with ``INSERT … ON CONFLICT DO NOTHING`` (both dialects), in one transaction with
its captured samples, so a device's at-least-once retries and two collectors
racing on the same batch store each window once. A batch is one multi-row
``INSERT … ON CONFLICT DO NOTHING RETURNING sequence`` (``RETURNING`` names the
windows that were new, whose samples are then stored) and one commit. The
collector keeps no state of its own: any number of collector processes can share
one database.

Durability: the ack tells the device to delete its only copy, so a batch is
acknowledged only after its commit is on disk. PostgreSQL does that by default
(``synchronous_commit=on``); SQLite runs in WAL mode with ``synchronous=FULL``,
one fsync of the WAL per commit. ``NORMAL`` would skip that fsync and survive a
crash of the collector, but not a power cut or a kernel crash after the ack:
those windows would be gone from both sides. With batches the fsync is paid once
per batch (~3.5 ms on the build VM, 35 µs per window at 100 windows a batch).

Migrations, without Alembic. A table ``edgekit_schema_version`` holds one row
with the schema's version; ``MIGRATIONS`` is a literal, ordered list of steps,
each idempotent (it checks what exists before creating it). ``migrate`` runs the
missing steps and bumps the version in ONE transaction taken under a lock that
both databases honour: ``pg_advisory_xact_lock`` on PostgreSQL, and on SQLite
``BEGIN IMMEDIATE`` (every transaction here starts that way, which takes the
database's write lock up front). Both databases run DDL inside transactions, so
a crash mid-migration leaves the previous version intact, and two processes
starting at once migrate once. Why not Alembic: the schema is four tables with
additive changes, the migration must run at every collector start without an
``alembic.ini`` or a scripts folder on disk, and the locking above is what
Alembic would leave to us anyway. A database written by a newer edgekit is
refused rather than guessed at.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from pathlib import Path

import pydantic_core
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Json, ValidationError, model_validator
from sqlalchemy.engine import Connection, Engine

from device_agent.telemetry_schema import (
    UNIX_TIME_MAX,
    CapturedSample,
    Count,
    DriftReference,
    FeatureName,
    Histograms,
    LatencyMs,
    Scores,
    UnixTime,
    UploadAck,
    UploadBatch,
    WindowSummary,
    window_inconsistency,
)
from edgekit.errors import EdgekitError

DEFAULT_DB_URL = "sqlite:///edgekit-fleet.db"
DB_HINT = "use sqlite:///path/to/fleet.db (the default: sqlite:///edgekit-fleet.db) or postgresql://user[:password]@host:5432/dbname"
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # telemetry_schema.DeviceId
TOKEN_PREFIX = "ekd_"
# Any fixed 64-bit number: the advisory lock that serialises migrations on PostgreSQL.
_PG_MIGRATION_LOCK = 0x6564_6765_666C_7431
# Bound parameters per SQLite statement: at most 32,766 (since SQLite 3.32).
_MAX_PARAMETERS = 30_000
_READ_ONLY = "edgekit_read_only"  # an execution option: this transaction only reads (see _sqlite_on_begin)


class FleetError(EdgekitError):
    """A problem with the fleet database or the operator's input."""


# --------------------------------------------------------------------------- tables (the latest version)

metadata = sa.MetaData()

schema_version = sa.Table(
    "edgekit_schema_version", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
)

devices = sa.Table(
    "devices", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("group_name", sa.String(128)),  # since version 3
    sa.Column("removed_at", sa.Float),  # since version 3: a removed device keeps its history, not its token
)

windows = sa.Table(
    "windows", metadata,
    sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=False),
    sa.Column("model_name", sa.String(128)),
    sa.Column("model_version", sa.String(32)),
    sa.Column("reference_sha256", sa.String(64)),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("p50_ms", sa.Float),
    sa.Column("p95_ms", sa.Float),
    sa.Column("p99_ms", sa.Float),
    sa.Column("histograms", sa.Text, nullable=False),  # JSON {feature: [counts]}
    sa.Column("scores", sa.Text, nullable=False),  # JSON {feature: {psi, js, drifting}}
    sa.Column("drifting", sa.Boolean, nullable=False),
    sa.Column("alert", sa.Boolean, nullable=False),
    sa.Column("top_features", sa.Text, nullable=False),  # JSON [feature]
    sa.Column("evicted_total", sa.BigInteger, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False, server_default="0"),  # since version 2
)

drift_references = sa.Table(
    "drift_references", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("document", sa.Text, nullable=False),  # the DriftReference as JSON
    sa.Column("stored_at", sa.Float, nullable=False),
)

samples = sa.Table(  # since version 2
    "samples", metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("captured_at", sa.Float, nullable=False),
    sa.Column("document", sa.Text, nullable=False),  # the CapturedSample as JSON
    sa.Column("predicted", sa.String(256)),
)

windows_by_time = sa.Index("windows_device_ended_at", windows.c.device_id, windows.c.ended_at)  # since version 2

# --- since version 3: desired state, bundles and rollouts (edgekit.fleet.rollouts)

bundles = sa.Table(
    "bundles", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("stored_at", sa.Float, nullable=False),
)

bundle_chunks = sa.Table(  # the bundle's bytes in BUNDLE_CHUNK_BYTES pieces: one database holds them for every collector
    "bundle_chunks", metadata,
    sa.Column("sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

desired_models = sa.Table(  # what each device should serve, per model
    "desired_models", metadata,
    sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), nullable=False),
    sa.Column("rollout_id", sa.Integer),
    sa.Column("updated_at", sa.Float, nullable=False),
)

serving_models = sa.Table(  # what each device last reported serving
    "serving_models", metadata,
    sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("since", sa.Float, nullable=False),  # the first report of this version: when the device began serving it
    sa.Column("reported_at", sa.Float, nullable=False),  # the latest report
)

install_outcomes = sa.Table(
    "install_outcomes", metadata,
    sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("outcome", sa.String(16), primary_key=True),
    sa.Column("at", sa.Float, primary_key=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("check_name", sa.String(64)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)

rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # running, completed, rolled_back, aborted
    sa.Column("selection", sa.String(256), nullable=False),  # how the devices were chosen, for people
    sa.Column("wave", sa.Integer, nullable=False),  # the current wave (0-based)
    sa.Column("waves", sa.Integer, nullable=False),
    sa.Column("wave_started_at", sa.Float, nullable=False),
    sa.Column("soak_s", sa.Float, nullable=False),
    sa.Column("wave_timeout_s", sa.Float, nullable=False),
    sa.Column("gates", sa.Text, nullable=False),  # JSON [{"name", "limit"}]
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
)

rollout_devices = sa.Table(
    "rollout_devices", metadata,
    sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id"), primary_key=True),
    sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("previous_version", sa.String(32)),  # what the device was told to serve before: the rollback target
    sa.Column("previous_sha256", sa.String(64)),
)

rollout_events = sa.Table(  # the audit trail: every decision of a rollout, in order
    "rollout_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id"), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),  # "operator" or the collector that decided ("collector:<host>:<pid>")
)

_VERSION_3_TABLES = (bundles, bundle_chunks, desired_models, serving_models, install_outcomes, rollouts,
                     rollout_devices, rollout_events)


# --------------------------------------------------------------------------- migrations


def _migration_1(conn: Connection) -> None:
    """devices, windows (without received_at), drift_references."""
    old = sa.MetaData()
    drift_references.to_metadata(old)

    def columns(table: sa.Table, *later: str) -> list[sa.Column]:
        return [sa.Column(column.name, column.type, primary_key=column.primary_key, nullable=column.nullable,
                          unique=column.unique, autoincrement=False)
                for column in table.columns if column.name not in later]

    sa.Table("devices", old, *columns(devices, "group_name", "removed_at"))
    sa.Table("windows", old, *columns(windows, "received_at"), sa.ForeignKeyConstraint(["device_id"], ["devices.id"]))
    old.create_all(conn, checkfirst=True)


def _migration_2(conn: Connection) -> None:
    """windows.received_at (when the collector stored it: "last seen"), the samples table, a time index."""
    present = {column["name"] for column in sa.inspect(conn).get_columns("windows")}
    if "received_at" not in present:
        column_type = sa.Float().compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE windows ADD COLUMN received_at {column_type} NOT NULL DEFAULT 0")
    samples.create(conn, checkfirst=True)
    windows_by_time.create(conn, checkfirst=True)


def _migration_3(conn: Connection) -> None:
    """devices.group_name and devices.removed_at; bundles, desired state, install outcomes, rollouts and their audit."""
    present = {column["name"] for column in sa.inspect(conn).get_columns("devices")}
    for name, column_type in (("group_name", sa.String(128)), ("removed_at", sa.Float())):
        if name not in present:
            conn.exec_driver_sql(f"ALTER TABLE devices ADD COLUMN {name} {column_type.compile(dialect=conn.dialect)}")
    for table in _VERSION_3_TABLES:
        table.create(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _migration_1),
    (2, _migration_2),
    (3, _migration_3),
]
LATEST_VERSION = MIGRATIONS[-1][0]


def current_version(engine: Engine) -> int:
    """The schema version the database is at (0 for an empty database)."""
    with engine.begin() as conn:
        if not sa.inspect(conn).has_table(schema_version.name):
            return 0
        return conn.scalar(sa.select(schema_version.c.version).where(schema_version.c.id == 1)) or 0


def migrate(engine: Engine, *, up_to: int = LATEST_VERSION) -> int:
    """Bring the schema to ``up_to`` (default: the latest) under a lock; safe to run again and concurrently."""
    if current_version(engine) == up_to:
        return up_to
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        schema_version.create(conn, checkfirst=True)
        version = conn.scalar(sa.select(schema_version.c.version).where(schema_version.c.id == 1))
        if version is None:
            conn.execute(schema_version.insert().values(id=1, version=0))
            version = 0
        if version > LATEST_VERSION:
            raise FleetError(
                f"the fleet database is at schema version {version}, newer than this edgekit knows ({LATEST_VERSION}); "
                "upgrade edgekit (pip install -U edgekit[fleet])"
            )
        for step_version, step in MIGRATIONS:
            if version < step_version <= up_to:
                step(conn)
                conn.execute(schema_version.update().where(schema_version.c.id == 1).values(version=step_version))
                version = step_version
    return version


# --------------------------------------------------------------------------- connecting


def lock_for_transaction(conn: Connection, name: str) -> None:
    """Serialise the transactions that name ``name`` (PostgreSQL: an advisory lock held until commit); on SQLite every
    writing transaction already holds the database's write lock (BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _describe(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def create_engine(db_url: str) -> Engine:
    """An engine for ``db_url``; every problem with the URL or the server is a FleetError that says how to fix it."""
    try:
        url = sa.make_url(db_url)
    except sa.exc.ArgumentError:
        raise FleetError(f"--db {db_url!r} is not a database URL; {DB_HINT}") from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        try:
            import psycopg  # noqa: F401
        except ModuleNotFoundError:
            raise FleetError("PostgreSQL needs the psycopg driver: pip install 'edgekit[fleet]'") from None
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    elif backend == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise FleetError(f"--db {db_url!r} names no file; the collector and the CLI must share the database: {DB_HINT}")
        folder = Path(url.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise FleetError(f"--db {db_url!r}: the folder {folder} does not exist; create it or choose another path")
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
    else:
        raise FleetError(f"--db {db_url!r}: the {backend!r} database is not supported; {DB_HINT}")
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise FleetError(
            f"cannot open the fleet database {_describe(url)}: {reason}; check that the server is running and the URL's "
            f"host, port, user and database are right ({DB_HINT})"
        ) from None
    return engine


def _require_existing_sqlite_file(db_url: str) -> None:
    # Readers must not create an empty database file where the operator mistyped the path.
    try:
        url = sa.make_url(db_url)
    except sa.exc.ArgumentError:
        return  # create_engine explains
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" and not Path(url.database).expanduser().exists():
        raise FleetError(
            f"no fleet database at {url.database}; pass the collector's --db URL (or set EDGEKIT_FLEET_DB), "
            "or create one with `edgekit fleet serve --db …`"
        )


def _sqlite_on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # pysqlite's own transaction handling would BEGIN lazily (DEFERRED); we issue BEGIN IMMEDIATE ourselves,
    # so a writer takes the lock before reading and never fails half-way with "database is locked".
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (reports) do not block the collector
    cursor.execute("PRAGMA synchronous=FULL")  # each commit is on disk before the ack (see the module's docstring)
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # A reader (token checks, reports) reads a WAL snapshot and needs no lock; a writer takes the write lock up front.
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")


@lru_cache(maxsize=128)
def _insert_sql(dialect: sa.Dialect, table: sa.Table, keys: tuple[str, ...], rows: int, returning: str | None) -> str:
    """``INSERT … ON CONFLICT (keys) DO NOTHING [RETURNING …]`` of ``rows`` rows (SQLite), or of one array per column (PostgreSQL)."""
    quote = dialect.identifier_preparer.quote
    head = f"INSERT INTO {dialect.identifier_preparer.format_table(table)} ({', '.join(quote(c.name) for c in table.columns)}) "
    if dialect.name == "postgresql":
        # unnest() zips the arrays back into rows: a short statement whatever the batch size, which psycopg parses once
        # and prepares, where a VALUES list of 10,000 placeholders is re-parsed by psycopg on every call. Strings go as
        # text[] so that the column's own varchar(n) still refuses what is too long (a cast to varchar(n)[] would cut).
        arrays = ", ".join(f"%b::{'TEXT' if isinstance(c.type, sa.String) else c.type.compile(dialect=dialect)}[]"
                           for c in table.columns)
        body = f"SELECT * FROM unnest({arrays})"
    else:
        body = "VALUES " + ", ".join(["(" + ", ".join("?" * len(table.columns)) + ")"] * rows)
    sql = f"{head}{body} ON CONFLICT ({', '.join(map(quote, keys))}) DO NOTHING"
    return sql + (f" RETURNING {quote(returning)}" if returning else "")


def _insert_ignoring_duplicates(conn: Connection, table: sa.Table, keys: tuple[str, ...], rows: list[dict],
                                returning: str | None = None) -> list:
    """Insert ``rows`` with one ``INSERT … ON CONFLICT (keys) DO NOTHING``; the ``returning`` column of the rows that were new.

    The statement is rendered from the table and the values go to the driver as they are (every value here is already
    a str, int, float, bool or None): per batch, SQLAlchemy's processing of each parameter cost more than the
    database's own work. SQLite gets a multi-row VALUES list, split only past its limit of bound parameters.
    """
    values = itemgetter(*(column.name for column in table.columns))
    if conn.dialect.name == "postgresql":
        arrays = tuple(map(list, zip(*map(values, rows))))  # one list per column
        result = conn.exec_driver_sql(_insert_sql(conn.dialect, table, keys, 0, returning), arrays)
        return list(result.scalars()) if returning else []
    new = []
    per_statement = _MAX_PARAMETERS // len(table.columns)
    for start in range(0, len(rows), per_statement):
        chunk = rows[start:start + per_statement]
        result = conn.exec_driver_sql(_insert_sql(conn.dialect, table, keys, len(chunk), returning),
                                      tuple(value for row in chunk for value in values(row)))
        if returning:
            new.extend(result.scalars())
    return new


# --------------------------------------------------------------------------- the store


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_token() -> tuple[str, str]:
    """A fresh device token (256 random bits) and its SHA-256."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_sha256(token)


@dataclass(frozen=True)
class DeviceRow:
    id: str
    created_at: float
    windows: int
    last_seen: float | None
    group: str | None


class Store:
    """The fleet database: devices and their tokens, windows, drift references, captured samples."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # SQLite has one writer at a time. Ingests of this process queue on a lock, which wakes the next one as soon as
        # a commit ends, rather than in SQLite's busy handler, which sleeps in steps of up to 100 ms. Other processes
        # still meet the busy handler; PostgreSQL needs no lock (rows are locked by key).
        self._ingest_lock = threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()

    @classmethod
    def open(cls, db_url: str, *, migrate_schema: bool = True) -> Store:
        """Connect, and bring the schema up to date; without ``migrate_schema`` the database must exist already."""
        if not migrate_schema:
            _require_existing_sqlite_file(db_url)
        engine = create_engine(db_url)
        if migrate_schema:
            migrate(engine)
        elif current_version(engine) != LATEST_VERSION:
            raise FleetError(f"the fleet database {_describe(engine.url)} is not set up; run `edgekit fleet serve --db …` once")
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only transaction: on SQLite it takes no write lock, so token checks do not queue behind ingests."""
        with self.engine.connect() as conn:
            conn.execution_options(**{_READ_ONLY: True})
            yield conn

    # -- devices

    def add_device(self, name: str, *, group: str | None = None) -> str:
        """Register ``name`` (in ``group``) and return its token; only the token's SHA-256 is stored.

        A removed device may be added again: it gets a new token and keeps its history.
        """
        if not DEVICE_NAME.match(name):
            raise FleetError(f"device name {name!r} is not allowed; use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if group is not None and not DEVICE_NAME.match(group):
            raise FleetError(f"group name {group!r} is not allowed; use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        token, digest = _new_token()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(devices.c.removed_at).where(devices.c.id == name)).first()
            if row is not None and row.removed_at is None:
                raise FleetError(
                    f"device {name!r} is already registered; keep using its token, or issue a new one with "
                    f"`edgekit fleet devices rotate-token {name}` (the old token stops working)"
                )
            if row is not None:
                conn.execute(devices.update().where(devices.c.id == name)
                             .values(token_sha256=digest, group_name=group, removed_at=None))
            else:
                conn.execute(devices.insert().values(id=name, token_sha256=digest, created_at=time.time(), group_name=group))
        return token

    def rotate_token(self, name: str) -> str:
        """Issue a new token for a registered device; the old one stops working with this commit."""
        token, digest = _new_token()
        with self.engine.begin() as conn:
            changed = conn.execute(devices.update().where(devices.c.id == name, devices.c.removed_at.is_(None))
                                   .values(token_sha256=digest)).rowcount
        if not changed:
            self.require_device(name)
        return token

    def remove_device(self, name: str) -> None:
        """Unregister a device: its token stops working and it leaves every list and group; its telemetry stays.

        Refused while a running rollout includes it (abort the rollout first): a rollout waits for its devices.
        """
        from edgekit.fleet.rollouts import running_rollouts_of

        _, unusable = _new_token()  # the column is unique and not null: a fresh random digest nobody holds the token of
        with self.engine.begin() as conn:
            running = running_rollouts_of(conn, [name])
            if running:
                raise FleetError(f"device {name!r} is in running rollout {running[0]}; abort it first "
                                 f"(`edgekit fleet rollout abort {running[0]}`)")
            changed = conn.execute(devices.update().where(devices.c.id == name, devices.c.removed_at.is_(None))
                                   .values(token_sha256=unusable, removed_at=time.time())).rowcount
            conn.execute(desired_models.delete().where(desired_models.c.device_id == name))
        if not changed:
            self.require_device(name)

    def device_for_token(self, token: str) -> str | None:
        """The device a bearer token belongs to, or None.

        Looked up by the token's SHA-256: the tokens carry 256 random bits, so the
        hash is as unguessable as the token, and the timing of an index lookup on a
        hash leaks nothing useful. The final comparison is constant-time anyway.
        """
        digest = token_sha256(token)
        with self.reading() as conn:
            row = conn.execute(sa.select(devices.c.id, devices.c.token_sha256).where(devices.c.token_sha256 == digest)).first()
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            return None
        return row.id

    def list_devices(self) -> list[DeviceRow]:
        counts = (
            sa.select(windows.c.device_id, sa.func.count().label("windows"), sa.func.max(windows.c.received_at).label("last_seen"))
            .group_by(windows.c.device_id)
            .subquery()
        )
        query = (
            sa.select(devices.c.id, devices.c.created_at, devices.c.group_name, counts.c.windows, counts.c.last_seen)
            .select_from(devices.outerjoin(counts, counts.c.device_id == devices.c.id))
            .where(devices.c.removed_at.is_(None))
            .order_by(devices.c.id)
        )
        with self.reading() as conn:
            return [DeviceRow(r.id, r.created_at, r.windows or 0, _readable_time(r.last_seen), r.group_name)
                    for r in conn.execute(query)]

    def has_device(self, name: str) -> bool:
        with self.reading() as conn:
            return conn.scalar(sa.select(devices.c.id).where(devices.c.id == name, devices.c.removed_at.is_(None))) is not None

    def require_device(self, name: str) -> None:
        if not self.has_device(name):
            known = [device.id for device in self.list_devices()]
            raise FleetError(
                f"unknown device {name!r}; known: {', '.join(known) if known else 'none yet'} "
                "(register one with `edgekit fleet devices add NAME`)"
            )

    # -- ingest

    def ingest(self, batch: UploadBatch, *, received_at: float | None = None) -> UploadAck:
        """Store a batch exactly once per (device_id, sequence); the ack names every sequence of the batch."""
        now = time.time() if received_at is None else received_at
        unique: dict[int, WindowSummary] = {}
        for window in batch.windows:
            unique.setdefault(window.sequence, window)  # a sequence twice in one batch: the first copy wins, as across batches
        rows = [_window_row(batch.device_id, window, now) for window in unique.values()]
        with self._ingest_lock, self.engine.begin() as conn:
            if batch.references:
                _insert_ignoring_duplicates(
                    conn, drift_references, ("sha256",),
                    [{"sha256": sha, "document": _json(ref), "stored_at": now} for sha, ref in batch.references.items()],
                )
            new = set(_insert_ignoring_duplicates(conn, windows, ("device_id", "sequence"), rows, returning="sequence"))
            sample_rows = [
                {
                    "device_id": batch.device_id,
                    "sequence": window.sequence,
                    "position": position,
                    "captured_at": sample.captured_at,
                    "document": _json(sample),
                    "predicted": sample.predicted,
                }
                for window in unique.values() if window.sequence in new
                for position, sample in enumerate(window.samples)
            ]
            if sample_rows:
                _insert_ignoring_duplicates(conn, samples, ("device_id", "sequence", "position"), sample_rows)
        return UploadAck(stored=sorted(unique), duplicates=len(unique) - len(new))

    # -- queries

    def fetch_windows(
        self, *, device: str | None = None, since: float | None = None, limit: int | None = None
    ) -> tuple[list[StoredWindow], int]:
        """Stored windows, by device then sequence, and how many rows were skipped because they do not read as a window.

        ``since`` keeps windows that ended at or after it (unix seconds). A skipped row was written before the contract
        refused what it holds (a NaN, JSON that does not parse, an absurd time): see ``StoredWindow.from_row``.
        """
        query = sa.select(windows).order_by(windows.c.device_id, windows.c.sequence)
        if device is not None:
            query = query.where(windows.c.device_id == device)
        if since is not None:
            query = query.where(windows.c.ended_at >= since)
        if limit is not None:
            query = query.limit(limit)
        found: list[StoredWindow] = []
        skipped = 0
        with self.reading() as conn:
            for row in conn.execute(query):
                try:
                    found.append(StoredWindow.from_row(row))
                except ValidationError:
                    skipped += 1
        return found, skipped

    def count_windows(self, device: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(windows)
        if device is not None:
            query = query.where(windows.c.device_id == device)
        with self.reading() as conn:
            return int(conn.scalar(query) or 0)

    def references(self, digests: Iterable[str] | None = None) -> dict[str, DriftReference]:
        """The stored drift references by sha256 (all, or those in ``digests``).

        A document that no longer validates (stored before the contract refused what it holds) is left out, as if it
        had never been sent: the report shows its windows' model version without fleet-wide scores.
        """
        query = sa.select(drift_references.c.sha256, drift_references.c.document)
        if digests is not None:
            query = query.where(drift_references.c.sha256.in_(list(digests)))
        found = {}
        with self.reading() as conn:
            for row in conn.execute(query):
                try:
                    found[row.sha256] = DriftReference.model_validate_json(row.document)
                except ValidationError:
                    continue
        return found

    def fetch_samples(self, device: str, *, model: tuple[str, str] | None = None, drifting: bool | None = None,
                      since: float | None = None, newest: int | None = None) -> tuple[list["WindowedSample"], int]:
        """The device's captured samples in capture order, each with its window's model and drift flags, and how many stored
        ones were skipped because they no longer validate.

        ``model`` keeps (name, version); ``drifting`` True keeps samples of drifting or alerting windows, False those of
        windows judged and not drifting; ``since`` those of windows that ended at or after it; ``newest`` only the last n.
        """
        joined = samples.outerjoin(windows, sa.and_(windows.c.device_id == samples.c.device_id,
                                                    windows.c.sequence == samples.c.sequence))
        query = (sa.select(samples.c.sequence, samples.c.document, windows.c.model_name,
                           windows.c.model_version, windows.c.drifting, windows.c.alert, windows.c.scores)
                 .select_from(joined).where(samples.c.device_id == device))
        if model is not None:
            query = query.where(windows.c.model_name == model[0], windows.c.model_version == model[1])
        if drifting is True:
            query = query.where(sa.or_(windows.c.drifting, windows.c.alert))
        elif drifting is False:
            query = query.where(sa.not_(windows.c.drifting), sa.not_(windows.c.alert), windows.c.scores != "{}")
        if since is not None:
            query = query.where(windows.c.ended_at >= since)
        order = (samples.c.sequence, samples.c.position)
        query = query.order_by(*order) if newest is None else query.order_by(*(column.desc() for column in order)).limit(newest)
        found: list[WindowedSample] = []
        skipped = 0
        with self.reading() as conn:
            for row in conn.execute(query):
                try:
                    sample = CapturedSample.model_validate_json(row.document)
                except ValidationError:
                    skipped += 1
                    continue
                found.append(WindowedSample(sample, row.sequence, row.model_name, row.model_version,
                                            bool(row.drifting or row.alert), row.scores not in (None, "{}")))
        return (found if newest is None else found[::-1]), skipped


@dataclass(frozen=True)
class WindowedSample:
    """A captured sample with what its window says: the model version that answered it and the device's drift verdict."""

    sample: CapturedSample
    sequence: int
    model_name: str | None
    model_version: str | None
    drifting: bool  # the device judged its window drifting (or alerting)
    judged: bool  # the window was large enough for the device to judge


def _readable_time(timestamp: float | None) -> float | None:
    """``timestamp`` when a reader can show it (finite, 0 to UNIX_TIME_MAX), else None."""
    return timestamp if timestamp is not None and 0 <= timestamp <= UNIX_TIME_MAX else None


def _json(document: object) -> str:
    # pydantic-core's serializer (Rust) takes the models as they are; json.dumps was most of the ingest time.
    return pydantic_core.to_json(document).decode("utf-8")


def _window_row(device_id: str, window: WindowSummary, received_at: float) -> dict:
    return {
        "device_id": device_id,
        "sequence": window.sequence,
        "started_at": window.started_at,
        "ended_at": window.ended_at,
        "model_name": window.model.name if window.model else None,
        "model_version": window.model.version if window.model else None,
        "reference_sha256": window.reference_sha256,
        "requests": window.requests,
        "errors": window.errors,
        "p50_ms": window.latency.p50_ms,
        "p95_ms": window.latency.p95_ms,
        "p99_ms": window.latency.p99_ms,
        "histograms": _json(window.histograms),
        "scores": _json(window.scores),
        "drifting": window.drifting,
        "alert": window.alert,
        "top_features": _json(window.top_features),
        "evicted_total": window.evicted_total,
        "received_at": received_at,
    }


class StoredWindow(BaseModel):
    """One stored window, as the reports read it: a row of ``windows``, checked on the way out like a sent window.

    The same bounds as ``WindowSummary`` except for names: a model name or version stored before the contract refused
    control and bidirectional characters is kept, and printed escaped (``telemetry_schema.escape_unprintable``).
    """

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)  # columns it does not name are ignored, not a bad row

    device_id: str
    sequence: Count
    started_at: UnixTime
    ended_at: UnixTime
    received_at: UnixTime
    model_name: str | None
    model_version: str | None
    reference_sha256: str | None
    requests: Count
    errors: Count
    p50_ms: LatencyMs | None
    p95_ms: LatencyMs | None
    p99_ms: LatencyMs | None
    histograms: Json[Histograms]
    scores: Json[Scores]
    drifting: bool
    alert: bool
    top_features: Json[list[FeatureName]]
    evicted_total: Count

    @model_validator(mode="after")
    def _consistent(self) -> StoredWindow:
        problem = window_inconsistency(self.started_at, self.ended_at, self.requests, self.errors)
        if problem:
            raise ValueError(problem)
        return self

    @classmethod
    def from_row(cls, row) -> StoredWindow:  # type: ignore[no-untyped-def]
        """The window of a ``windows`` row; raises ValidationError for a row that breaks the bounds or does not parse."""
        return cls.model_validate(dict(row._mapping))

    @property
    def judged(self) -> bool:
        """The device scored this window (it was large enough to judge)."""
        return bool(self.scores)

    def to_dict(self) -> dict:
        return self.model_dump()
