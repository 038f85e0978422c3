"""What devices should run: stored bundles, each device's desired models, and what devices report back.

Bundles are stored in the fleet database itself, content-addressed by sha256 and
cut into ``BUNDLE_CHUNK_BYTES`` rows, so every collector on one database serves
every bundle and a ranged download reads only the chunks it needs. The collector
never checks a bundle's signature: the device does, against its own keyring, so
a collector that is broken into can delay a rollout but not run a model.

The contract with devices is ``device_agent.desired_schema``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from device_agent.bundle import BundleError, read_manifest_unverified
from device_agent.desired_schema import DesiredModel, DesiredState, DeviceReport
from device_agent.files import sha256_file
from edgekit.fleet.store import (
    FleetError,
    Store,
    bundle_chunks,
    bundles,
    desired_models,
    install_outcomes,
    lock_for_transaction,
    serving_models,
)

BUNDLE_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class StoredBundle:
    sha256: str
    model_name: str
    model_version: str
    size: int


def read_bundle_file(path: Path) -> StoredBundle:
    """The bundle at ``path`` as it will be stored: its model, version, sha256 and size.

    Only the manifest's form is checked here (name, version, archive safety); the device checks the signature.
    """
    try:
        manifest, _names = read_manifest_unverified(path)
    except BundleError as error:
        raise FleetError(f"{path} is not an edgekit bundle: {error}; pass the .ekb file `edgekit build` wrote") from None
    sha256, size = sha256_file(path)
    try:  # what the desired-state contract and the fleet database can hold
        DesiredModel(name=manifest.model.name, version=manifest.model.version, sha256=sha256, size=size)
    except ValidationError as error:
        raise FleetError(f"{path}: {error.errors()[0]['loc'][0]} {error.errors()[0]['msg'].lower()}; "
                         "rebuild with a name of at most 128 characters and a version of at most 32") from None
    return StoredBundle(sha256, manifest.model.name, manifest.model.version, size)


def store_bundle(store: Store, path: Path, bundle: StoredBundle) -> None:
    """Store the bytes of ``bundle`` (read from ``path``) once: storing the same bundle again changes nothing.

    A different bundle under a model and version already stored is refused: devices compare versions, so two builds
    under one version could not be told apart (the device's repository refuses it the same way).
    """
    with store.engine.begin() as conn:
        lock_for_transaction(conn, f"bundle:{bundle.model_name}")
        other = conn.scalar(sa.select(bundles.c.sha256).where(
            bundles.c.model_name == bundle.model_name, bundles.c.model_version == bundle.model_version))
        if other == bundle.sha256:
            return
        if other is not None:
            raise FleetError(f"{bundle.model_name} {bundle.model_version} is already stored as another bundle "
                             f"(sha256 {other[:12]}…, this one {bundle.sha256[:12]}…); devices tell builds apart by "
                             "version: set a new model.version and build again")
        conn.execute(bundles.insert().values(sha256=bundle.sha256, model_name=bundle.model_name,
                                             model_version=bundle.model_version, size=bundle.size, stored_at=time.time()))
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            position = 0
            while block := handle.read(BUNDLE_CHUNK_BYTES):
                conn.execute(bundle_chunks.insert().values(sha256=bundle.sha256, position=position, data=block))
                digest.update(block)
                position += 1
        if digest.hexdigest() != bundle.sha256:  # the file changed since it was read: store nothing rather than a mix
            raise FleetError(f"{path} changed while it was being stored; store it again once it is complete")


def bundle_row(conn: Connection, sha256: str) -> StoredBundle | None:
    row = conn.execute(sa.select(bundles).where(bundles.c.sha256 == sha256)).first()
    return StoredBundle(row.sha256, row.model_name, row.model_version, row.size) if row else None


def bundle_for_device(store: Store, device: str, sha256: str) -> StoredBundle | None:
    """The bundle when it is one ``device`` is told to run, else None: a device reads nothing else."""
    query = (sa.select(bundles).select_from(bundles.join(desired_models, desired_models.c.sha256 == bundles.c.sha256))
             .where(desired_models.c.device_id == device, bundles.c.sha256 == sha256))
    with store.reading() as conn:
        row = conn.execute(query).first()
    return StoredBundle(row.sha256, row.model_name, row.model_version, row.size) if row else None


def read_bundle(store: Store, sha256: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start`` to ``end`` (inclusive) of a stored bundle, a chunk per short read (no connection held between)."""
    first, last = start // BUNDLE_CHUNK_BYTES, end // BUNDLE_CHUNK_BYTES
    for position in range(first, last + 1):
        with store.reading() as conn:
            data = conn.scalar(sa.select(bundle_chunks.c.data)
                               .where(bundle_chunks.c.sha256 == sha256, bundle_chunks.c.position == position))
        if data is None:
            raise FleetError(f"bundle {sha256[:12]}… is missing chunk {position}; store it again with `edgekit fleet deploy`")
        offset = position * BUNDLE_CHUNK_BYTES
        yield bytes(data[max(start - offset, 0):end - offset + 1])


def desired_state(store: Store, device: str) -> DesiredState:
    query = (sa.select(desired_models, bundles.c.size)
             .select_from(desired_models.join(bundles, bundles.c.sha256 == desired_models.c.sha256))
             .where(desired_models.c.device_id == device).order_by(desired_models.c.model_name))
    with store.reading() as conn:
        rows = conn.execute(query).all()
    return DesiredState(device_id=device, models=[
        DesiredModel(name=row.model_name, version=row.model_version, sha256=row.sha256, size=row.size,
                     rollout_id=row.rollout_id)
        for row in rows
    ])


def set_desired(conn: Connection, device: str, bundle: StoredBundle, rollout_id: int | None, now: float) -> None:
    """Tell ``device`` to serve ``bundle`` (replacing what it was told for that model)."""
    conn.execute(desired_models.delete().where(desired_models.c.device_id == device,
                                               desired_models.c.model_name == bundle.model_name))
    conn.execute(desired_models.insert().values(device_id=device, model_name=bundle.model_name,
                                                model_version=bundle.model_version, sha256=bundle.sha256,
                                                rollout_id=rollout_id, updated_at=now))


def record_report(store: Store, report: DeviceReport, now: float | None = None) -> int:
    """Store what the device serves and its install outcomes (each once); how many outcomes were new."""
    now = time.time() if now is None else now
    new = 0
    with store.engine.begin() as conn:
        before = {row.model_name: row for row in conn.execute(
            sa.select(serving_models).where(serving_models.c.device_id == report.device_id))}
        conn.execute(serving_models.delete().where(serving_models.c.device_id == report.device_id))
        if report.serving:
            conn.execute(serving_models.insert(), [
                {"device_id": report.device_id, "model_name": name, "model_version": version, "reported_at": now,
                 "since": before[name].since if name in before and before[name].model_version == version else now}
                for name, version in report.serving.items()
            ])
        for outcome in report.outcomes:
            key = (install_outcomes.c.device_id == report.device_id, install_outcomes.c.sha256 == outcome.sha256,
                   install_outcomes.c.outcome == outcome.outcome, install_outcomes.c.at == outcome.at)
            if conn.scalar(sa.select(sa.func.count()).select_from(install_outcomes).where(*key)):
                continue
            conn.execute(install_outcomes.insert().values(
                device_id=report.device_id, sha256=outcome.sha256, outcome=outcome.outcome, at=outcome.at,
                model_name=outcome.model, model_version=outcome.version, check_name=outcome.check,
                reason=outcome.reason, received_at=now))
            new += 1
    return new
