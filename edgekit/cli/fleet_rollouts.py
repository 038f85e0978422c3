"""``edgekit fleet deploy``, ``fleet rollouts`` and ``fleet rollout show|abort``: staged, gated rollouts.

The commands write the rollout into the fleet database and return; the running
collectors (``edgekit fleet serve``) advance it and devices pull it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgekit.cli.fleet import db_option
from edgekit.cli.output import console, print_json, print_table

if TYPE_CHECKING:
    from edgekit.fleet.store import Store

rollout_app = typer.Typer(no_args_is_help=True, help="Look at one rollout, or stop it (and roll its devices back).")

_STATE_COLOUR = {"running": "yellow", "completed": "green", "rolled_back": "red", "aborted": "red"}


@contextmanager
def _fleet_database(db: str, *, migrate: bool = False) -> Iterator[Store]:
    """The fleet database, closed afterwards; readers and abort need it set up already (``fleet serve`` does)."""
    from edgekit.fleet.store import Store

    store = Store.open(db, migrate_schema=migrate)
    try:
        yield store
    finally:
        store.close()


def _gate_help() -> str:
    from edgekit.fleet.gate_names import ABSOLUTE_GATES, FLAG_GATES, RELATIVE_GATES

    described = [f"{name}<=V ({what})" for name, what in {**ABSOLUTE_GATES, **RELATIVE_GATES}.items()]
    described += [f"{name} ({what})" for name, what in FLAG_GATES.items()]
    return "A gate the new version must hold, repeatable: " + "; ".join(described) + "."


def deploy(
    bundle: Path = typer.Argument(..., help="The signed .ekb bundle `edgekit build` wrote.", exists=False),
    db: str = db_option(),
    all_devices: bool = typer.Option(False, "--all", help="Every registered device."),
    devices: str | None = typer.Option(None, "--devices", help="Comma-separated device names, e.g. jetson-01,jetson-02."),
    group: str | None = typer.Option(None, "--group", help="Every device of this group (devices add NAME --group G)."),
    waves: str = typer.Option("1,100%", "--waves", help="Cumulative wave sizes, counts or % of the selected devices; "
                              "the first is the canary. 1,25%,100%: one device, then a quarter, then all."),
    soak: float = typer.Option(300.0, "--soak", min=0, help="Seconds a wave must hold its gates after its last install, "
                               "over at least one telemetry window per device, before the next wave starts."),
    wave_timeout: float = typer.Option(3600.0, "--wave-timeout", min=1, help="A wave that has not advanced after this many "
                                       "seconds halts the rollout and rolls it back (a device that never reports)."),
    gate: list[str] = typer.Option([], "--gate", help=_gate_help()),
    as_json: bool = typer.Option(False, "--json", help="Print the created rollout as JSON (with its id)."),
) -> None:
    """Roll a bundle out to devices in waves, gated on its telemetry; returns at once.

    The bundle is stored in the fleet database; the first wave's devices are told to
    run it and pull it at their next poll (`edgekit-agent serve --telemetry-url ...`).
    The collector advances a wave when each of its devices installed the bundle, sent
    telemetry with it and held every gate for --soak seconds. At the first breach, a
    refusal or a timeout it halts and tells every started device to go back to the
    version it ran before (the device still holds it). Follow it with
    `edgekit fleet rollout show ID`.
    """
    from edgekit.fleet.rollouts import Selection, deploy as start_rollout, parse_gate, show_rollout
    from edgekit.fleet.store import FleetError

    chosen = [flag for flag, on in (("--all", all_devices), ("--devices", devices), ("--group", group)) if on]
    if len(chosen) != 1:
        raise FleetError(f"choose the devices with exactly one of --all, --devices a,b or --group G (got {', '.join(chosen) or 'none'})")
    selection = Selection(all=all_devices, devices=tuple(d.strip() for d in (devices or "").split(",") if d.strip()), group=group)
    gates = [parse_gate(text) for text in gate]
    with _fleet_database(db, migrate=True) as store:
        rollout_id = start_rollout(store, bundle, selection, waves=waves, soak_s=soak, wave_timeout_s=wave_timeout, gates=gates)
        view = show_rollout(store, rollout_id)
    if as_json:
        print_json(view.to_dict())
        return
    console.print(f"rollout {rollout_id}: {view.model_name} {view.model_version} to {view.selection}, "
                  f"{len(view.devices)} devices in {view.waves} waves; wave 1: "
                  f"{', '.join(d.device_id for d in view.devices if d.wave == 0)}", highlight=False, markup=False)
    console.print(f"follow it with `edgekit fleet rollout show {rollout_id}`", highlight=False, markup=False)


def list_rollouts(
    db: str = db_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List rollouts, newest first, with their state and why they ended."""
    from edgekit.fleet.report import format_time
    from edgekit.fleet.rollouts import list_rollouts as rollouts

    with _fleet_database(db) as store:
        found = rollouts(store)
    if as_json:
        print_json([view.to_dict() for view in found])
        return
    print_table("Rollouts", ["id", "model", "state", "wave", "devices", "gates", "created", "reason"], [
        [str(v.id), _escaped(f"{v.model_name} {v.model_version}"), _state(v.state), f"{v.wave + 1}/{v.waves}",
         _escaped(v.selection), ", ".join(v.gates) or "-", format_time(v.created_at), _escaped(v.reason) or "-"]
        for v in found
    ])
    if not found:
        console.print("no rollouts yet: start one with `edgekit fleet deploy BUNDLE --db URL --all`")


@rollout_app.command("show")
def show(
    rollout_id: int = typer.Argument(..., min=1, max=2**31 - 1, help="The rollout's id (edgekit fleet rollouts)."),
    db: str = db_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """A rollout's devices (wave, desired, serving, outcome) and its audit trail."""
    from edgekit.fleet.rollouts import show_rollout

    with _fleet_database(db) as store:
        view = show_rollout(store, rollout_id)
    if as_json:
        print_json(view.to_dict())
        return
    _print_view(view)


@rollout_app.command("abort")
def abort(
    rollout_id: int = typer.Argument(..., min=1, max=2**31 - 1, help="The running rollout's id."),
    db: str = db_option(),
) -> None:
    """Stop a running rollout: every device it started is told to go back to the version it ran before."""
    from edgekit.fleet.rollouts import abort_rollout

    with _fleet_database(db) as store:
        view = abort_rollout(store, rollout_id)
    console.print(f"rollout {rollout_id} aborted; {view.events[-1]['message']}", highlight=False, markup=False)


def _print_view(view) -> None:  # type: ignore[no-untyped-def]
    from edgekit.fleet.report import format_time

    console.print(f"rollout {view.id}: {_escaped(view.model_name)} {view.model_version} ({view.sha256[:12]}…) to "
                  f"{_escaped(view.selection)}; {_state(view.state)}, wave {view.wave + 1} of {view.waves}; soak "
                  f"{view.soak_s:g} s; gates {', '.join(view.gates) or 'install only'}", highlight=False)
    if view.reason:
        console.print(f"reason: {_escaped(view.reason)}", highlight=False)
    print_table("Devices", ["device", "wave", "before", "desired", "serving", "outcome"], [
        [_escaped(d.device_id), str(d.wave + 1), d.previous_version or "-", d.desired_version or "-",
         d.serving_version or "-", _escaped(f"{d.outcome or '-'} {d.outcome_reason}".strip())]
        for d in view.devices
    ])
    print_table("Audit trail", ["at", "event", "by", "what"], [
        [format_time(e["at"]), e["kind"], _escaped(e["actor"]), _escaped(e["message"])] for e in view.events
    ])


def _state(state: str) -> str:
    colour = _STATE_COLOUR.get(state)
    return f"[{colour}]{state}[/{colour}]" if colour else state


def _escaped(text: str) -> str:
    from rich.markup import escape

    from device_agent.telemetry_schema import escape_unprintable

    return escape(escape_unprintable(text))
