"""Property tests of the collector from its own OpenAPI schema (schemathesis), on SQLite and PostgreSQL.

Every operation gets generated requests, valid and invalid, under four
credentials: none, a wrong token, a device's token, the operator's token. No
request may get a 5xx; every refusal carries ``{"error": …}``; the wrong
credentials always get 401; and a device's token never writes records of
another device, whatever the body says.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from edgekit.fleet.store import Store, install_outcomes, serving_models
from tests.fleet.conftest import collector_in_thread

OPERATOR = "operator-token-for-the-schema-tests"
EXAMPLES = 12  # per operation and generation mode; ingest gets four times as many
# What a device token opens: ingest and the desired-state contract (device_agent.desired_schema).
DEVICE_OPERATIONS = {"/v1/telemetry", "/v1/devices/{device_id}/desired", "/v1/devices/{device_id}/reports",
                     "/v1/bundles/{sha256}"}


@pytest.fixture
def collector(store: Store):
    tokens = {"dev-1": store.add_device("dev-1"), "dev-2": store.add_device("dev-2")}
    with collector_in_thread(store, operator_token=OPERATOR) as url:
        yield url, tokens


def _operations(url: str):
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
    return [result.ok() for result in schema.get_all_operations()]


def _aim(case, device: str | None) -> None:
    """Point the case at the token's own device (the body's device_id, the path's device id), and make its windows
    keep the rules the OpenAPI schema cannot state (times near the collector's clock, in order; errors <= requests)."""
    if device and isinstance(case.body, dict) and "device_id" in case.body:
        case.body["device_id"] = device
        windows = case.body.get("windows")
        for window in windows if isinstance(windows, list) else []:
            if isinstance(window, dict):
                _plausible(window)
    if device and case.path_parameters and "device_id" in case.path_parameters:
        case.path_parameters["device_id"] = device


def _plausible(window: dict) -> None:
    now = time.time()
    if isinstance(window.get("started_at"), (int, float)) and isinstance(window.get("ended_at"), (int, float)):
        window["started_at"], window["ended_at"] = now - 60, now
    if isinstance(window.get("requests"), int) and isinstance(window.get("errors"), int):
        window["errors"] = min(window["errors"], window["requests"])


def _expected(operation_path: str, credential: str, status: int) -> str | None:
    """What is wrong with ``status`` for this credential, or None."""
    if status >= 500:
        return "server error"
    if operation_path == "/v1/health":
        return None if status == 200 else "health must answer 200"
    if credential in ("none", "wrong"):
        return None if status == 401 else "without a valid token only 401 is right"
    if credential == "device" and operation_path not in DEVICE_OPERATIONS:
        return None if status == 401 else "a device token must not open the query API"
    if credential == "operator" and operation_path in DEVICE_OPERATIONS:
        return None if status == 401 else "the operator token must not act as a device"
    return None


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error_or_passes_the_wrong_token(collector, store: Store):
    url, tokens = collector
    credentials = {"none": None, "wrong": "ekd_not-a-real-token", "device": tokens["dev-1"], "operator": OPERATOR}
    total, failures = 0, []
    statuses: Counter = Counter()
    for operation in _operations(url):
        examples = 4 * EXAMPLES if operation.path == "/v1/telemetry" else EXAMPLES
        for credential, token in credentials.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode), aim=st.booleans())
                def check(case, aim: bool) -> None:
                    nonlocal total
                    # Valid bodies always name the token's own device, so storage is exercised under every seed.
                    _aim(case, "dev-1" if aim or mode is GenerationMode.POSITIVE else None)
                    response = case.call(base_url=url, headers=headers, timeout=30)
                    total += 1
                    statuses[(credential, operation.path, response.status_code)] += 1
                    problem = _expected(operation.path, credential, response.status_code)
                    if problem is None and response.status_code >= 400 and "error" not in response.json():
                        problem = "a refusal without an error message"
                    if problem:
                        failures.append(f"[{credential}] {operation.label} → {response.status_code} ({problem}): "
                                        f"{response.text[:300]}\n{case.as_curl_command()}")

                try:
                    check()
                except Unsatisfiable:  # nothing to make invalid: the operation takes no parameters or body
                    assert mode is GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n\n".join(failures[:10])
    assert total >= 500, f"only {total} requests were generated"
    assert store.count_windows("dev-2") == 0, "dev-1's token wrote records of dev-2"
    with store.engine.connect() as conn:
        for table in (serving_models, install_outcomes):
            written = conn.scalar(sa.select(sa.func.count()).select_from(table).where(table.c.device_id == "dev-2"))
            assert written == 0, f"dev-1's token wrote {table.name} of dev-2"
    assert store.count_windows("dev-1") > 0, f"no generated batch reached the store: the test exercised nothing {statuses}"
