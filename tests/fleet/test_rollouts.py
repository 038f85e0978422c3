"""Rollouts on real SQLite and PostgreSQL: waves, gates, refusals, timeouts, rollback and the audit trail.

Devices are simulated here by what they would send (reports and telemetry windows), so each rule of the engine is
exercised on its own; tests/e2e/test_rollout_e2e.py runs real agents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.desired_schema import DeviceReport, InstallOutcome
from edgekit.fleet.desired import desired_state, read_bundle_file, record_report
from edgekit.fleet.rollouts import (
    Gate,
    Selection,
    abort_rollout,
    advance_rollouts,
    deploy,
    list_rollouts,
    parse_gate,
    parse_waves,
    prediction_shift,
    show_rollout,
)
from edgekit.fleet.store import FleetError, bundles, rollouts
from tests.fleet.conftest import make_batch
from tests.support.bundles import write_tiny_bundle

MODEL = "tiny-classifier"
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def bundle_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    key = Ed25519PrivateKey.generate()
    files = {}
    for version in ("1.0.0", "2.0.0"):
        write_tiny_bundle(folder / f"v{version}.ekb", key, version)
        files[version] = folder / f"v{version}.ekb"
    return files


def _fleet(store, names=("dev-a", "dev-b", "dev-c"), group: str | None = None) -> None:
    for name in names:
        store.add_device(name, group=group)


def _installed(store, device: str, bundle: Path, at: float, outcome: str = "installed", check: str | None = None,
               reason: str = "") -> None:
    info = read_bundle_file(bundle)
    serving = {MODEL: info.model_version} if outcome in ("installed", "rolled_back") else {}
    record_report(store, DeviceReport(device_id=device, serving=serving, outcomes=[InstallOutcome(
        model=MODEL, version=info.model_version, sha256=info.sha256, outcome=outcome, check=check, reason=reason, at=at)]),
        now=at)


def _window(store, device: str, sequence: int, version: str, ended_at: float, **fields) -> None:
    batch = make_batch(device, [sequence], model={"name": MODEL, "version": version}, **fields)
    window = batch.windows[0].model_copy(update={"started_at": ended_at - 30, "ended_at": ended_at})
    store.ingest(batch.model_copy(update={"windows": [window]}), received_at=ended_at)


def _v1_everywhere(store, bundle_files, devices=("dev-a", "dev-b", "dev-c")) -> None:
    rollout = deploy(store, bundle_files["1.0.0"], Selection(all=True), waves="100%", soak_s=0, now=T0)
    for device in devices:
        _installed(store, device, bundle_files["1.0.0"], T0 + 1)
        _window(store, device, 1, "1.0.0", T0 + 2)
    advance_rollouts(store, now=T0 + 3)
    assert show_rollout(store, rollout).state == "completed"


def _desired_versions(store, devices=("dev-a", "dev-b", "dev-c")) -> dict[str, list[str]]:
    return {device: [m.version for m in desired_state(store, device).models] for device in devices}


# --------------------------------------------------------------------------- parsing


def test_waves_are_cumulative_counts_or_percentages():
    assert parse_waves("1,25%,100%", 100) == [1, 25, 100]
    assert parse_waves("1,100%", 3) == [1, 3]
    assert parse_waves("1", 3) == [1, 3]  # the last wave always takes everyone
    assert parse_waves("2,2,50%", 4) == [2, 4]  # a wave that adds nobody is dropped
    assert parse_waves("100%", 1) == [1]
    for bad in ("0", "abc", "150%", "0%", "3,1"):
        with pytest.raises(FleetError, match="--waves"):
            parse_waves(bad, 10)


def test_gates_parse_or_name_every_gate():
    assert parse_gate("p95_ms<=12.5") == Gate("p95_ms", 12.5)
    assert parse_gate(" error_rate <= 0.01 ") == Gate("error_rate", 0.01)
    assert parse_gate("drift") == Gate("drift")
    with pytest.raises(FleetError, match="unknown gate 'latency'.*p95_ms<=VALUE.*prediction_shift<=VALUE.*drift"):
        parse_gate("latency<=3")
    with pytest.raises(FleetError, match="a number ≥ 0"):
        parse_gate("p95_ms<=-1")
    with pytest.raises(FleetError, match="takes no value"):
        parse_gate("drift<=1")


def test_prediction_shift_is_the_total_variation_distance():
    def rows(*counts):
        return [type("Row", (), {"histograms": json.dumps({"output.predicted_class": list(c)})}) for c in counts]

    assert prediction_shift(rows([10, 10]), rows([5, 5])) == pytest.approx(0.0)
    assert prediction_shift(rows([10, 0]), rows([0, 10])) == pytest.approx(1.0)
    assert prediction_shift(rows([6, 4], [2, 8]), rows([1, 1])) == pytest.approx(0.1)
    assert prediction_shift(rows(), rows([1, 1])) is None


# --------------------------------------------------------------------------- deploy


def test_a_deploy_to_an_unknown_device_or_group_creates_nothing(store, bundle_files):
    _fleet(store, group="line-1")
    with pytest.raises(FleetError, match="unknown device.*'dev-x'.*known: dev-a, dev-b, dev-c"):
        deploy(store, bundle_files["2.0.0"], Selection(devices=("dev-a", "dev-x")))
    with pytest.raises(FleetError, match="no device is in group 'line-9'; groups: line-1"):
        deploy(store, bundle_files["2.0.0"], Selection(group="line-9"))
    with store.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(rollouts)) == 0
        assert conn.scalar(sa.select(sa.func.count()).select_from(bundles)) == 0
    assert _desired_versions(store) == {"dev-a": [], "dev-b": [], "dev-c": []}


def test_a_relative_gate_needs_a_control_cohort(store, bundle_files):
    _fleet(store)
    with pytest.raises(FleetError, match="first wave takes all 3 devices"):
        deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="100%", gates=[Gate("p95_ratio", 1.2)])


def test_a_device_in_a_running_rollout_is_not_deployed_to_again(store, bundle_files):
    _fleet(store)
    first = deploy(store, bundle_files["1.0.0"], Selection(all=True), now=T0)
    with pytest.raises(FleetError, match=f"rollout {first} of {MODEL} is still running"):
        deploy(store, bundle_files["2.0.0"], Selection(devices=("dev-c",)))
    with pytest.raises(FleetError, match=f"running rollout {first}"):
        store.remove_device("dev-a")


# --------------------------------------------------------------------------- waves


def test_waves_advance_after_install_telemetry_and_soak_then_complete(store, bundle_files):
    _fleet(store)
    _v1_everywhere(store, bundle_files)
    rollout = deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="1,100%", soak_s=60,
                     gates=[Gate("p95_ms", 50.0), Gate("error_rate", 0.01), Gate("drift")], now=T0 + 100)
    assert _desired_versions(store) == {"dev-a": ["2.0.0"], "dev-b": ["1.0.0"], "dev-c": ["1.0.0"]}
    assert advance_rollouts(store, now=T0 + 110) == 0  # the canary has not installed
    _installed(store, "dev-a", bundle_files["2.0.0"], T0 + 120)
    assert advance_rollouts(store, now=T0 + 130) == 0  # installed, but no telemetry window with 2.0.0 yet
    _window(store, "dev-a", 2, "2.0.0", T0 + 150)
    assert advance_rollouts(store, now=T0 + 170) == 0  # soaking until T0 + 180
    assert advance_rollouts(store, now=T0 + 181) == 1
    assert _desired_versions(store) == {"dev-a": ["2.0.0"], "dev-b": ["2.0.0"], "dev-c": ["2.0.0"]}
    for device in ("dev-b", "dev-c"):
        _installed(store, device, bundle_files["2.0.0"], T0 + 200)
        _window(store, device, 2, "2.0.0", T0 + 220)
    assert advance_rollouts(store, now=T0 + 261) == 1
    view = show_rollout(store, rollout)
    assert view.state == "completed" and view.wave == 1
    assert [event["kind"] for event in view.events] == ["created", "wave_started", "wave_started", "completed"]
    assert {d.device_id: (d.serving_version, d.outcome) for d in view.devices} == {
        "dev-a": ("2.0.0", "installed"), "dev-b": ("2.0.0", "installed"), "dev-c": ("2.0.0", "installed")}


def test_a_gate_breach_at_the_canary_rolls_back_and_nobody_else_moves(store, bundle_files):
    _fleet(store)
    _v1_everywhere(store, bundle_files)
    rollout = deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="1,100%", soak_s=0,
                     gates=[Gate("p95_ms", 4.0)], now=T0 + 100)
    _installed(store, "dev-a", bundle_files["2.0.0"], T0 + 110)
    _window(store, "dev-a", 2, "2.0.0", T0 + 120)  # p95 5 ms
    assert advance_rollouts(store, now=T0 + 130) == 1
    view = show_rollout(store, rollout)
    assert view.state == "rolled_back"
    assert "gate p95_ms<=4 breached: dev-a window 2 p95 5 ms" in view.reason
    assert _desired_versions(store) == {"dev-a": ["1.0.0"], "dev-b": ["1.0.0"], "dev-c": ["1.0.0"]}
    assert view.events[-1]["kind"] == "rolled_back" and "dev-a→1.0.0" in view.events[-1]["message"]
    assert [r.state for r in list_rollouts(store)] == ["rolled_back", "completed"]


def test_a_refusal_at_the_canary_halts_the_rollout(store, bundle_files):
    _fleet(store)
    _v1_everywhere(store, bundle_files)
    rollout = deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="1,100%", now=T0 + 100)
    _installed(store, "dev-a", bundle_files["2.0.0"], T0 + 110, outcome="refused", check="signature",
               reason="signed by a key this device does not trust")
    advance_rollouts(store, now=T0 + 111)
    view = show_rollout(store, rollout)
    assert view.state == "rolled_back"
    assert view.reason == "dev-a refused the bundle: [signature] signed by a key this device does not trust"
    assert _desired_versions(store) == {"dev-a": ["1.0.0"], "dev-b": ["1.0.0"], "dev-c": ["1.0.0"]}


def test_a_device_that_never_reports_times_the_wave_out(store, bundle_files):
    _fleet(store)
    rollout = deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="1,100%", soak_s=0, wave_timeout_s=600,
                     now=T0)
    assert advance_rollouts(store, now=T0 + 599) == 0
    assert advance_rollouts(store, now=T0 + 601) == 1
    view = show_rollout(store, rollout)
    assert view.state == "rolled_back"
    assert view.reason.startswith("wave 1 timed out after 600 s: waited for dev-a")
    # dev-a had no earlier version to go back to: its desired state is cleared, and the audit says so
    assert _desired_versions(store) == {"dev-a": [], "dev-b": [], "dev-c": []}
    assert "no earlier version to go back to on dev-a" in view.events[-1]["message"]


def test_abort_rolls_back_on_the_operators_word(store, bundle_files):
    _fleet(store)
    _v1_everywhere(store, bundle_files)
    rollout = deploy(store, bundle_files["2.0.0"], Selection(devices=("dev-b",)), now=T0 + 100)
    view = abort_rollout(store, rollout)
    assert view.state == "aborted" and view.reason == "aborted by the operator"
    assert _desired_versions(store)["dev-b"] == ["1.0.0"]
    with pytest.raises(FleetError, match="already aborted"):
        abort_rollout(store, rollout)
    with pytest.raises(FleetError, match="no rollout 99"):
        abort_rollout(store, 99)


def test_relative_gates_compare_the_canary_with_the_control(store, bundle_files):
    _fleet(store)
    _v1_everywhere(store, bundle_files)
    rollout = deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="1,100%", soak_s=0,
                     gates=[Gate("p95_ratio", 1.5)], now=T0 + 100)
    _installed(store, "dev-a", bundle_files["2.0.0"], T0 + 110)
    _window(store, "dev-a", 2, "2.0.0", T0 + 120, latency={"p50_ms": 2.0, "p95_ms": 20.0, "p99_ms": 30.0})
    assert advance_rollouts(store, now=T0 + 130) == 0  # no control window since the wave started: the gate waits
    _window(store, "dev-b", 2, "1.0.0", T0 + 125)  # p95 5 ms: the canary is 4x slower
    assert advance_rollouts(store, now=T0 + 131) == 1
    view = show_rollout(store, rollout)
    assert view.state == "rolled_back" and "gate p95_ratio<=1.5 breached" in view.reason and "ratio 4" in view.reason


def test_removed_devices_and_rotated_tokens(store):
    token = store.add_device("dev-a", group="line-1")
    new = store.rotate_token("dev-a")
    assert store.device_for_token(token) is None and store.device_for_token(new) == "dev-a"
    store.remove_device("dev-a")
    assert store.device_for_token(new) is None
    assert [d.id for d in store.list_devices()] == []
    with pytest.raises(FleetError, match="unknown device 'dev-a'"):
        store.rotate_token("dev-a")
    again = store.add_device("dev-a")
    assert store.device_for_token(again) == "dev-a" and store.list_devices()[0].group is None


def test_a_device_already_serving_the_version_counts_as_installed_from_when_it_began(store, bundle_files):
    _fleet(store, names=("dev-a",))
    rollout = deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="100%", soak_s=60, now=T0)

    def report(at: float) -> None:  # flashed by hand before: it serves 2.0.0 and has no install outcome for it
        record_report(store, DeviceReport(device_id="dev-a", serving={MODEL: "2.0.0"}), now=at)

    report(T0 + 10)
    _window(store, "dev-a", 1, "2.0.0", T0 + 20)
    for at in (T0 + 30, T0 + 50, T0 + 69):  # reports keep coming: the soak counts from the first, not the latest
        report(at)
        assert advance_rollouts(store, now=at) == 0
    report(T0 + 71)
    assert advance_rollouts(store, now=T0 + 71) == 1
    assert show_rollout(store, rollout).state == "completed"


def test_a_rebuilt_bundle_under_a_stored_version_is_refused(store, bundle_files, tmp_path):
    _fleet(store)
    deploy(store, bundle_files["2.0.0"], Selection(devices=("dev-a",)), now=T0)
    rebuilt = tmp_path / "rebuilt.ekb"
    write_tiny_bundle(rebuilt, Ed25519PrivateKey.generate(), "2.0.0")  # another key: other bytes, same version
    with pytest.raises(FleetError, match=f"{MODEL} 2.0.0 is already stored as another bundle .* set a new model.version"):
        deploy(store, rebuilt, Selection(devices=("dev-b",)), now=T0)


def test_a_device_flashed_by_hand_goes_back_to_what_it_served(store, bundle_files):
    _fleet(store, names=("dev-a", "dev-b"))
    deploy(store, bundle_files["1.0.0"], Selection(devices=("dev-b",)), waves="100%", now=T0)  # the collector holds 1.0.0
    record_report(store, DeviceReport(device_id="dev-a", serving={MODEL: "1.0.0"}), now=T0 + 1)  # flashed, never told
    rollout = deploy(store, bundle_files["2.0.0"], Selection(devices=("dev-a",)), waves="100%", now=T0 + 10)
    view = abort_rollout(store, rollout, now=T0 + 20)
    assert [d.previous_version for d in view.devices] == ["1.0.0"]
    assert _desired_versions(store, ("dev-a",)) == {"dev-a": ["1.0.0"]}


def test_clocks_of_devices_do_not_move_the_soak(store, bundle_files):
    # A device whose clock runs an hour ahead: its outcome and window times say T0+3600..., the collector received them
    # at T0+110 and T0+120; the soak counts on the collector's clock.
    _fleet(store, names=("dev-a",))
    rollout = deploy(store, bundle_files["2.0.0"], Selection(all=True), waves="100%", soak_s=60, now=T0 + 100)
    info = read_bundle_file(bundle_files["2.0.0"])
    record_report(store, DeviceReport(device_id="dev-a", serving={MODEL: "2.0.0"}, outcomes=[InstallOutcome(
        model=MODEL, version="2.0.0", sha256=info.sha256, outcome="installed", at=T0 + 3710)]), now=T0 + 110)
    batch = make_batch("dev-a", [1], model={"name": MODEL, "version": "2.0.0"})
    window = batch.windows[0].model_copy(update={"started_at": T0 + 3690, "ended_at": T0 + 3720})
    store.ingest(batch.model_copy(update={"windows": [window]}), received_at=T0 + 120)
    assert advance_rollouts(store, now=T0 + 169) == 0
    assert advance_rollouts(store, now=T0 + 171) == 1
    assert show_rollout(store, rollout).state == "completed"
