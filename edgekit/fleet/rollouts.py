"""Rollouts: a bundle goes to devices in waves, each gated on the model's own telemetry, and rolls back by itself.

A rollout is rows in the fleet database (``rollouts``, ``rollout_devices``,
``rollout_events``); the collectors advance it with ``advance_rollouts``, each
rollout in its own transaction under a row lock (``SELECT … FOR UPDATE SKIP
LOCKED`` on PostgreSQL; SQLite's one writer), re-reading its state inside the
lock. So two collectors on one database never advance a wave twice or lose a
step, and a collector killed mid-step leaves the previous step intact.

The rules, in order, each time a running rollout is looked at:

1. **Refusal.** A device of a started wave refused the bundle (signature,
   target, golden check, anti-rollback): halt.
2. **Gates**, over every window a started wave's device sent with the new
   version since it installed it: ``p95_ms`` (worst window p95), ``error_rate``
   (errors / requests), ``drift`` (no drift alert); and against the control
   cohort (the rollout's devices not yet in a started wave, over the same
   period): ``p95_ratio`` (median window p95 of the new version over the
   control's) and ``prediction_shift`` (total variation distance between their
   predicted-class mixes, 0 to 1). A breach halts.
3. **Advance.** When every device of the current wave has installed and sent at
   least one window with the new version, the relative gates have windows from
   both cohorts, and ``soak_s`` has passed since the wave's last install, the
   next wave starts (its devices are told to run the bundle); after the last
   wave the rollout is completed.
4. **Timeout.** A wave that has not advanced ``wave_timeout_s`` after it
   started halts, naming the devices it waited for.

Halting sets every started device's desired state back to what it was told to
run before (its local copy: the agent activates it without a download) and
records why; ``rollout abort`` does the same on an operator's word.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgekit.fleet.desired import StoredBundle, bundle_row, read_bundle_file, set_desired, store_bundle
from edgekit.fleet.gate_names import ABSOLUTE_GATES, FLAG_GATES, RELATIVE_GATES
from edgekit.fleet.store import (
    FleetError,
    Store,
    bundles,
    desired_models,
    devices,
    install_outcomes,
    lock_for_transaction,
    rollout_devices,
    rollout_events,
    rollouts,
    serving_models,
    windows,
)

RUNNING, COMPLETED, ROLLED_BACK, ABORTED = "running", "completed", "rolled_back", "aborted"
DEFAULT_WAVES = "1,100%"
DEFAULT_SOAK_S = 300.0
DEFAULT_WAVE_TIMEOUT_S = 3600.0
_GATE = re.compile(r"^\s*([a-z0-9_]+)\s*(?:<=\s*([0-9.eE+-]+))?\s*$")
_PREDICTED_CLASS = "output.predicted_class"


@dataclass(frozen=True)
class Gate:
    name: str
    limit: float | None = None  # None for the flag gates

    def __str__(self) -> str:
        return self.name if self.limit is None else f"{self.name}<={self.limit:g}"


def parse_gate(text: str) -> Gate:
    """``NAME<=VALUE`` (p95_ms, error_rate, p95_ratio, prediction_shift) or ``NAME`` (drift, install)."""
    known = ", ".join([*(f"{name}<=VALUE" for name in {**ABSOLUTE_GATES, **RELATIVE_GATES}), *FLAG_GATES])
    match = _GATE.match(text)
    if not match:
        raise FleetError(f"--gate {text!r} is not NAME<=VALUE or NAME; gates: {known}")
    name, value = match.groups()
    if name in FLAG_GATES:
        if value is not None:
            raise FleetError(f"--gate {name} takes no value; write --gate {name}")
        return Gate(name)
    if name not in ABSOLUTE_GATES and name not in RELATIVE_GATES:
        raise FleetError(f"--gate {text!r}: unknown gate {name!r}; gates: {known}")
    try:
        limit = float(value) if value is not None else math.nan
    except ValueError:
        limit = math.nan
    if not math.isfinite(limit) or limit < 0:
        raise FleetError(f"--gate {text!r} needs a limit that is a number ≥ 0, e.g. {name}<=0.05")
    return Gate(name, limit)


def parse_waves(text: str, devices_selected: int) -> list[int]:
    """Cumulative device counts per wave from ``1,25%,100%`` (counts or percentages of the selection, rising).

    Percentages round up; a wave that adds no device is dropped; the last wave takes every selected device.
    """
    counts: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        try:
            count = math.ceil(float(part[:-1]) / 100 * devices_selected) if part.endswith("%") else int(part)
            valid = (0 < float(part[:-1]) <= 100) if part.endswith("%") else count >= 1
        except ValueError:
            valid = False
        if not valid:
            raise FleetError(f"--waves {text!r}: {part!r} is neither a device count ≥ 1 nor a percentage in (0, 100]; "
                             "e.g. --waves 1,25%,100%")
        count = min(count, devices_selected)
        if counts and count < counts[-1]:
            raise FleetError(f"--waves {text!r}: waves are cumulative and must not shrink ({counts[-1]} then {count})")
        if not counts or count > counts[-1]:
            counts.append(count)
    if counts[-1] < devices_selected:
        counts.append(devices_selected)
    return counts


# --------------------------------------------------------------------------- creating and reading rollouts


@dataclass(frozen=True)
class Selection:
    """Which devices a rollout covers: all, named devices, or a group."""

    all: bool = False
    devices: tuple[str, ...] = ()
    group: str | None = None

    def describe(self) -> str:
        if self.all:
            return "all devices"
        return f"group {self.group}" if self.group else "devices " + ",".join(self.devices)


def _select_devices(conn: Connection, selection: Selection) -> list[str]:
    live = sa.select(devices.c.id, devices.c.group_name).where(devices.c.removed_at.is_(None)).order_by(devices.c.id)
    rows = conn.execute(live).all()
    if selection.all:
        chosen = [row.id for row in rows]
    elif selection.group is not None:
        chosen = [row.id for row in rows if row.group_name == selection.group]
        if not chosen:
            groups = sorted({row.group_name for row in rows if row.group_name})
            raise FleetError(f"no device is in group {selection.group!r}; groups: {', '.join(groups) or 'none yet'} "
                             "(put a device in one with `edgekit fleet devices add NAME --group G`)")
    else:
        known = {row.id for row in rows}
        unknown = [name for name in selection.devices if name not in known]
        if unknown:
            raise FleetError(f"unknown device(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known)) or 'none yet'} "
                             "(register one with `edgekit fleet devices add NAME`)")
        chosen = sorted(set(selection.devices))
    if not chosen:
        raise FleetError("no devices to deploy to: register one with `edgekit fleet devices add NAME`")
    return chosen


def running_rollouts_of(conn: Connection, device_ids: Sequence[str], model: str | None = None) -> list[int]:
    """The running rollouts that include any of ``device_ids`` (of ``model`` when given)."""
    query = (sa.select(rollouts.c.id).distinct()
             .select_from(rollouts.join(rollout_devices, rollout_devices.c.rollout_id == rollouts.c.id))
             .where(rollouts.c.state == RUNNING, rollout_devices.c.device_id.in_(list(device_ids))))
    if model is not None:
        query = query.where(rollouts.c.model_name == model)
    return sorted(conn.scalars(query))


def deploy(store: Store, bundle_path: Path, selection: Selection, *, waves: str = DEFAULT_WAVES,
           soak_s: float = DEFAULT_SOAK_S, wave_timeout_s: float = DEFAULT_WAVE_TIMEOUT_S,
           gates: Sequence[Gate] = (), now: float | None = None) -> int:
    """Store the bundle, create a running rollout of it and start its first wave; the rollout's id.

    The deploy is checked before anything is stored (an unknown device or group, a busy device, bad waves or gates:
    nothing is created, not even the bundle), then again in the transaction that creates the rollout, under a lock
    per model, so two deploys at once cannot both start on one device.
    """
    now = time.time() if now is None else now
    if not (math.isfinite(soak_s) and math.isfinite(wave_timeout_s)) or soak_s < 0 or wave_timeout_s <= soak_s:
        raise FleetError(f"--wave-timeout ({wave_timeout_s:g} s) must be a finite number of seconds longer than --soak "
                         f"({soak_s:g} s), and --soak ≥ 0")
    bundle = read_bundle_file(bundle_path)
    with store.reading() as conn:
        _plan(conn, bundle, selection, waves, gates)
    store_bundle(store, bundle_path, bundle)
    with store.engine.begin() as conn:
        lock_for_transaction(conn, f"rollout:{bundle.model_name}")
        chosen, counts = _plan(conn, bundle, selection, waves, gates)
        previous = _rollback_targets(conn, bundle.model_name, chosen)
        rollout_id = conn.execute(rollouts.insert().values(
            model_name=bundle.model_name, model_version=bundle.model_version, sha256=bundle.sha256, state=RUNNING,
            selection=selection.describe()[:256], wave=0, waves=len(counts), wave_started_at=now, soak_s=soak_s,
            wave_timeout_s=wave_timeout_s, gates=json.dumps([{"name": g.name, "limit": g.limit} for g in gates]),
            created_at=now, reason="")).inserted_primary_key[0]
        wave_of = {device: next(i for i, count in enumerate(counts) if position < count) for position, device in enumerate(chosen)}
        conn.execute(rollout_devices.insert(), [
            {"rollout_id": rollout_id, "device_id": device, "wave": wave_of[device],
             "previous_version": previous[device].model_version if device in previous else None,
             "previous_sha256": previous[device].sha256 if device in previous else None}
            for device in chosen
        ])
        without = [device for device in chosen if device not in previous]
        _event(conn, rollout_id, now, "created", f"{bundle.model_name} {bundle.model_version} to {selection.describe()} "
               f"({len(chosen)} devices) in {len(counts)} waves {counts}; soak {soak_s:g} s; "
               f"gates {', '.join(map(str, gates)) or 'install only'}"
               + (f"; no version to roll back to on {', '.join(without)}" if without else ""), "operator")
        _start_wave(conn, rollout_id, bundle, 0, [d for d in chosen if wave_of[d] == 0], now, "operator")
    return rollout_id


def _plan(conn: Connection, bundle: StoredBundle, selection: Selection, waves: str,
          gates: Sequence[Gate]) -> tuple[list[str], list[int]]:
    """The devices a deploy covers and its cumulative wave sizes; a FleetError for any reason not to start it."""
    chosen = _select_devices(conn, selection)
    busy = running_rollouts_of(conn, chosen, bundle.model_name)
    if busy:
        raise FleetError(f"rollout {busy[0]} of {bundle.model_name} is still running on some of these devices; "
                         f"wait for it or `edgekit fleet rollout abort {busy[0]}`")
    counts = parse_waves(waves, len(chosen))
    relative = [str(gate) for gate in gates if gate.name in RELATIVE_GATES]
    if relative and counts[0] == len(chosen):
        raise FleetError(f"gate {relative[0]} compares the first wave with devices still on the old version, but the "
                         f"first wave takes all {len(chosen)} devices; start with a smaller wave (--waves 1,100%)")
    return chosen, counts


def _rollback_targets(conn: Connection, model: str, chosen: list[str]) -> dict[str, StoredBundle]:
    """Per device, the bundle a halt sends it back to: what it was told to run before, else the stored bundle of the
    version it reports serving (flashed by hand). A device with neither has none: a halt leaves it as it is."""
    targets = {}
    for row in conn.execute(sa.select(desired_models).where(desired_models.c.model_name == model,
                                                            desired_models.c.device_id.in_(chosen))):
        targets[row.device_id] = bundle_row(conn, row.sha256)
    for row in conn.execute(sa.select(serving_models.c.device_id, bundles.c.sha256)
                            .select_from(serving_models.join(bundles, (bundles.c.model_name == serving_models.c.model_name)
                                                             & (bundles.c.model_version == serving_models.c.model_version)))
                            .where(serving_models.c.model_name == model, serving_models.c.device_id.in_(chosen))):
        targets.setdefault(row.device_id, bundle_row(conn, row.sha256))
    return {device: bundle for device, bundle in targets.items() if bundle is not None}


def _start_wave(conn: Connection, rollout_id: int, bundle: StoredBundle, wave: int, members: list[str], now: float,
                actor: str) -> None:
    for device in members:
        set_desired(conn, device, bundle, rollout_id, now)
    _event(conn, rollout_id, now, "wave_started", f"wave {wave + 1} started: {', '.join(members)}", actor)


def _event(conn: Connection, rollout_id: int, now: float, kind: str, message: str, actor: str) -> None:
    conn.execute(rollout_events.insert().values(rollout_id=rollout_id, at=now, kind=kind, message=message, actor=actor))


@dataclass(frozen=True)
class RolloutDevice:
    device_id: str
    wave: int
    previous_version: str | None
    desired_version: str | None
    serving_version: str | None
    outcome: str | None  # the device's latest outcome for this rollout's bundle
    outcome_reason: str


@dataclass(frozen=True)
class RolloutView:
    id: int
    model_name: str
    model_version: str
    sha256: str
    state: str
    selection: str
    wave: int
    waves: int
    soak_s: float
    wave_timeout_s: float
    gates: list[str]
    created_at: float
    ended_at: float | None
    reason: str
    devices: list[RolloutDevice] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _view(row, gates: list[dict]) -> RolloutView:  # type: ignore[no-untyped-def]
    return RolloutView(row.id, row.model_name, row.model_version, row.sha256, row.state, row.selection, row.wave,
                       row.waves, row.soak_s, row.wave_timeout_s, [str(Gate(g["name"], g["limit"])) for g in gates],
                       row.created_at, row.ended_at, row.reason)


def list_rollouts(store: Store) -> list[RolloutView]:
    with store.reading() as conn:
        return [_view(row, json.loads(row.gates)) for row in conn.execute(sa.select(rollouts).order_by(rollouts.c.id.desc()))]


def show_rollout(store: Store, rollout_id: int) -> RolloutView:
    """One rollout with its devices and its audit trail."""
    with store.reading() as conn:
        row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).first()
        if row is None:
            raise FleetError(f"no rollout {rollout_id}; list them with `edgekit fleet rollouts`")
        view = _view(row, json.loads(row.gates))
        members = conn.execute(sa.select(rollout_devices).where(rollout_devices.c.rollout_id == rollout_id)
                               .order_by(rollout_devices.c.wave, rollout_devices.c.device_id)).all()
        ids = [member.device_id for member in members]
        desired = dict(conn.execute(sa.select(desired_models.c.device_id, desired_models.c.model_version).where(
            desired_models.c.device_id.in_(ids), desired_models.c.model_name == row.model_name)).all())
        serving = dict(conn.execute(sa.select(serving_models.c.device_id, serving_models.c.model_version).where(
            serving_models.c.device_id.in_(ids), serving_models.c.model_name == row.model_name)).all())
        outcomes = _latest_outcomes(conn, row, members)
        view.devices.extend(
            RolloutDevice(m.device_id, m.wave, m.previous_version, desired.get(m.device_id), serving.get(m.device_id),
                          outcomes[m.device_id].outcome if m.device_id in outcomes else None,
                          outcomes[m.device_id].reason if m.device_id in outcomes else "")
            for m in members
        )
        view.events.extend({"at": e.at, "kind": e.kind, "message": e.message, "actor": e.actor} for e in conn.execute(
            sa.select(rollout_events).where(rollout_events.c.rollout_id == rollout_id).order_by(rollout_events.c.id)))
    return view


def _latest_outcomes(conn: Connection, row, members) -> dict:  # type: ignore[no-untyped-def]
    """Each device's latest outcome of this rollout: for its bundle while it ran, and, once it rolled back, for the
    version each device went back to."""
    ended = row.ended_at if row.ended_at is not None else math.inf
    went_back = {m.device_id: m.previous_sha256 for m in members} if row.state in (ROLLED_BACK, ABORTED) else {}
    latest: dict = {}
    for outcome in conn.execute(sa.select(install_outcomes).where(
            install_outcomes.c.device_id.in_([m.device_id for m in members]),
            install_outcomes.c.received_at >= row.created_at).order_by(install_outcomes.c.at)):
        ours = outcome.sha256 == row.sha256 and outcome.received_at <= ended
        back = outcome.sha256 == went_back.get(outcome.device_id) and outcome.received_at >= ended
        if ours or back:
            latest[outcome.device_id] = outcome
    return latest


def abort_rollout(store: Store, rollout_id: int, *, now: float | None = None) -> RolloutView:
    """Stop a running rollout and roll its started devices back, on the operator's word."""
    now = time.time() if now is None else now
    with store.engine.begin() as conn:
        row = _lock_rollout(conn, rollout_id, skip_locked=False)
        if row is None:
            raise FleetError(f"no rollout {rollout_id}; list them with `edgekit fleet rollouts`")
        if row.state != RUNNING:
            raise FleetError(f"rollout {rollout_id} is already {row.state}; only a running rollout can be aborted")
        _halt(conn, row, now, ABORTED, "aborted by the operator", "operator")
    return show_rollout(store, rollout_id)


# --------------------------------------------------------------------------- the engine


def collector_actor() -> str:
    return f"collector:{socket.gethostname()}:{os.getpid()}"


def advance_rollouts(store: Store, *, now: float | None = None, actor: str | None = None) -> int:
    """Look at every running rollout once (see the module's rules); how many changed state or wave."""
    actor = (actor or collector_actor())[:128]
    with store.reading() as conn:
        ids = list(conn.scalars(sa.select(rollouts.c.id).where(rollouts.c.state == RUNNING).order_by(rollouts.c.id)))
    changed = 0
    for rollout_id in ids:
        with store.engine.begin() as conn:
            row = _lock_rollout(conn, rollout_id, skip_locked=True)
            if row is None or row.state != RUNNING:
                continue  # another collector holds it right now, or it just ended
            changed += _step(conn, row, time.time() if now is None else now, actor)
    return changed


def _lock_rollout(conn: Connection, rollout_id: int, *, skip_locked: bool):  # type: ignore[no-untyped-def]
    query = sa.select(rollouts).where(rollouts.c.id == rollout_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=skip_locked)
    return conn.execute(query).first()  # SQLite: BEGIN IMMEDIATE already holds the database's write lock


@dataclass
class _Member:
    device_id: str
    wave: int
    installed_at: float | None = None
    refused: str | None = None
    windows: list = field(default_factory=list)


def _step(conn: Connection, row, now: float, actor: str) -> int:  # type: ignore[no-untyped-def]
    members = _members(conn, row)
    started = [m for m in members if m.wave <= row.wave]
    refused = [m for m in started if m.refused]
    if refused:
        _halt(conn, row, now, ROLLED_BACK, f"{refused[0].device_id} refused the bundle: {refused[0].refused}", actor)
        return 1
    gates = [Gate(g["name"], g["limit"]) for g in json.loads(row.gates)]
    control = [m for m in members if m.wave > row.wave]
    judged = _judge_gates(conn, row, gates, started, control)
    if judged.breach:
        _halt(conn, row, now, ROLLED_BACK, judged.breach, actor)
        return 1
    current = [m for m in started if m.wave == row.wave]
    waiting = [m.device_id for m in current if m.installed_at is None or not m.windows]
    soaked_at = max((m.installed_at or now for m in current), default=now) + row.soak_s
    if not waiting and not judged.waiting and now >= soaked_at:
        return _next_wave(conn, row, members, now, actor)
    if now - row.wave_started_at > row.wave_timeout_s:
        why = (f"waited for {', '.join(waiting)} (installed and a telemetry window with {row.model_version})" if waiting
               else judged.waiting or f"soak until {soaked_at:.0f}")
        _halt(conn, row, now, ROLLED_BACK, f"wave {row.wave + 1} timed out after {row.wave_timeout_s:g} s: {why}", actor)
        return 1
    return 0


def _members(conn: Connection, row) -> list[_Member]:  # type: ignore[no-untyped-def]
    """The rollout's devices with what they did with its bundle and their windows of the new version since."""
    members = [_Member(m.device_id, m.wave) for m in conn.execute(
        sa.select(rollout_devices).where(rollout_devices.c.rollout_id == row.id).order_by(rollout_devices.c.device_id))]
    by_id = {m.device_id: m for m in members}
    for outcome in conn.execute(sa.select(install_outcomes).where(
            install_outcomes.c.device_id.in_(list(by_id)), install_outcomes.c.sha256 == row.sha256,
            install_outcomes.c.received_at >= row.created_at).order_by(install_outcomes.c.at)):
        member = by_id[outcome.device_id]
        if outcome.outcome == "refused":
            member.refused = f"[{outcome.check_name or 'install'}] {outcome.reason}"
        elif outcome.outcome in ("installed", "rolled_back") and member.installed_at is None:
            member.installed_at = outcome.received_at  # the collector's clock, as every time the engine compares
    # A device that serves the version without an outcome for it (flashed by hand, or installed in an earlier
    # rollout) counts as installed since it began serving it; its windows still count only from this rollout on.
    for serving in conn.execute(sa.select(serving_models).where(
            serving_models.c.device_id.in_(list(by_id)), serving_models.c.model_name == row.model_name,
            serving_models.c.model_version == row.model_version, serving_models.c.reported_at >= row.created_at)):
        member = by_id[serving.device_id]
        if member.installed_at is None:
            member.installed_at = serving.since
    # Windows by when the collector received them: a device's clock may be off by up to a day (the telemetry contract).
    for window in conn.execute(sa.select(windows).where(
            windows.c.device_id.in_(list(by_id)), windows.c.model_name == row.model_name,
            windows.c.model_version == row.model_version, windows.c.received_at >= row.created_at)):
        member = by_id[window.device_id]
        if member.installed_at is not None and window.received_at >= member.installed_at:
            member.windows.append(window)
    return members


@dataclass(frozen=True)
class _Judgement:
    breach: str = ""  # the first gate that failed, said for people
    waiting: str = ""  # a relative gate that has no windows yet to judge by


def _judge_gates(conn: Connection, row, gates: list[Gate], started: list[_Member],  # type: ignore[no-untyped-def]
                 control: list[_Member]) -> _Judgement:
    new = [w for m in started for w in m.windows]
    for gate in gates:
        if gate.name == "p95_ms":
            worst = max((w for w in new if w.p95_ms is not None), key=lambda w: w.p95_ms, default=None)
            if worst is not None and worst.p95_ms > gate.limit:
                return _Judgement(breach=f"gate {gate} breached: {worst.device_id} window {worst.sequence} p95 {worst.p95_ms:.3g} ms")
        elif gate.name == "error_rate":
            requests = sum(w.requests for w in new)
            rate = sum(w.errors for w in new) / requests if requests else 0.0
            if rate > gate.limit:
                return _Judgement(breach=f"gate {gate} breached: error rate {rate:.4g} over {requests} requests")
        elif gate.name == "drift":
            alert = next((w for w in new if w.alert), None)
            if alert is not None:
                return _Judgement(breach=f"gate drift breached: {alert.device_id} window {alert.sequence} raised a drift alert")
        elif gate.name in RELATIVE_GATES and control:
            judged = _judge_relative(conn, row, gate, new, control)
            if judged.breach or judged.waiting:
                return judged
    return _Judgement()


def _judge_relative(conn: Connection, row, gate: Gate, new: list, control: list[_Member]) -> _Judgement:  # type: ignore[no-untyped-def]
    since = row.wave_started_at
    old = list(conn.execute(sa.select(windows).where(
        windows.c.device_id.in_([m.device_id for m in control]), windows.c.model_name == row.model_name,
        windows.c.model_version != row.model_version, windows.c.received_at >= since)))
    new = [w for w in new if w.received_at >= since]
    if not new or not old:
        return _Judgement(waiting=f"gate {gate} waits for windows from both the new version ({len(new)}) and the control ({len(old)})")
    if gate.name == "p95_ratio":
        new_p95 = [w.p95_ms for w in new if w.p95_ms is not None]
        old_p95 = [w.p95_ms for w in old if w.p95_ms is not None]
        if not new_p95 or not old_p95:
            return _Judgement(waiting=f"gate {gate} waits for windows with latencies")
        ratio = statistics.median(new_p95) / max(statistics.median(old_p95), 1e-9)
        if ratio > gate.limit:
            return _Judgement(breach=f"gate {gate} breached: median p95 {statistics.median(new_p95):.3g} ms against the "
                                     f"control's {statistics.median(old_p95):.3g} ms (ratio {ratio:.3g})")
        return _Judgement()
    shift = prediction_shift(new, old)
    if shift is None:
        return _Judgement(waiting=f"gate {gate} waits for windows with a predicted-class histogram")
    if shift > gate.limit:
        return _Judgement(breach=f"gate {gate} breached: predicted-class mix moved by {shift:.3g} (total variation) "
                                 "against the control")
    return _Judgement()


def prediction_shift(new: Iterable, old: Iterable) -> float | None:
    """Total variation distance between two cohorts' summed ``output.predicted_class`` histograms; None without data."""
    def mix(rows: Iterable) -> list[float] | None:
        total: list[float] = []
        for row in rows:
            counts = json.loads(row.histograms).get(_PREDICTED_CLASS)
            if counts is None:
                continue
            if len(total) < len(counts):
                total.extend([0.0] * (len(counts) - len(total)))
            for index, count in enumerate(counts):
                total[index] += count
        mass = sum(total)
        return [count / mass for count in total] if mass else None

    a, b = mix(new), mix(old)
    if a is None or b is None:
        return None
    width = max(len(a), len(b))
    a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


def _next_wave(conn: Connection, row, members: list[_Member], now: float, actor: str) -> int:  # type: ignore[no-untyped-def]
    nxt = row.wave + 1
    # The UPDATE names the wave it read: a step on a stale row changes nothing (belt and braces with the row lock).
    if nxt >= row.waves:
        done = conn.execute(rollouts.update().where(rollouts.c.id == row.id, rollouts.c.wave == row.wave,
                                                    rollouts.c.state == RUNNING)
                            .values(state=COMPLETED, ended_at=now)).rowcount
        if done:
            _event(conn, row.id, now, "completed", f"every wave installed and held its gates for {row.soak_s:g} s", actor)
        return done
    moved = conn.execute(rollouts.update().where(rollouts.c.id == row.id, rollouts.c.wave == row.wave,
                                                 rollouts.c.state == RUNNING)
                         .values(wave=nxt, wave_started_at=now)).rowcount
    if moved:
        bundle = bundle_row(conn, row.sha256)
        _start_wave(conn, row.id, bundle, nxt, [m.device_id for m in members if m.wave == nxt], now, actor)
    return moved


def _halt(conn: Connection, row, now: float, state: str, reason: str, actor: str) -> None:  # type: ignore[no-untyped-def]
    """End the rollout and tell every started device to go back to what it ran before."""
    conn.execute(rollouts.update().where(rollouts.c.id == row.id).values(state=state, ended_at=now, reason=reason[:4000]))
    _event(conn, row.id, now, "halted" if state == ROLLED_BACK else "aborted", reason, actor)
    back, left = [], []
    for member in conn.execute(sa.select(rollout_devices).where(rollout_devices.c.rollout_id == row.id,
                                                                rollout_devices.c.wave <= row.wave)):
        if member.previous_sha256 is not None and (previous := bundle_row(conn, member.previous_sha256)) is not None:
            set_desired(conn, member.device_id, previous, row.id, now)
            back.append(f"{member.device_id}→{previous.model_version}")
        else:
            conn.execute(desired_models.delete().where(desired_models.c.device_id == member.device_id,
                                                       desired_models.c.model_name == row.model_name))
            left.append(member.device_id)
    message = f"desired state set back: {', '.join(back) or 'none'}"
    if left:
        message += f"; no earlier version to go back to on {', '.join(left)} (left as they are)"
    _event(conn, row.id, now, "rolled_back", message, actor)
