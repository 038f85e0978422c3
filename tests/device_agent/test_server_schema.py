"""Property tests of the whole HTTP API from its own OpenAPI schema (schemathesis): no input gives a 5xx.

Cases are generated for every operation, valid and invalid, with and without
the admin token; half of them aim at the installed model's real name, so the
infer, load/unload and admin routes are exercised past their 404s.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.support.agent import ADMIN_TOKEN, MODEL, LiveAgent, live_agent

EXAMPLES_PER_OPERATION_AND_MODE = 12


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    with live_agent(tmp_path_factory.mktemp("schema"), max_request_bytes=1 << 20, max_body_bytes=1 << 20) as running:
        assert running.install("1.0.0").status_code == 200
        yield running


def _operations(agent: LiveAgent):
    schema = schemathesis.openapi.from_dict(httpx.get(f"{agent.url}/openapi.json").json())
    return [result.ok() for result in schema.get_all_operations()]


def _aim_at_the_model(case, aim: bool) -> None:
    """Point a generated case at the real model, version and input, so validation past the lookup is exercised."""
    if not aim:
        return
    parameters = case.path_parameters or {}
    if "name" in parameters:
        parameters["name"] = MODEL
    if "version" in parameters:
        parameters["version"] = "1.0.0"
    inputs = case.body.get("inputs") if isinstance(case.body, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        if isinstance(tensor, dict):
            tensor.update(name="x", datatype="FP32")


def _examples(operation) -> int:
    # Inference takes the richest bodies; it gets the most cases.
    return 5 * EXAMPLES_PER_OPERATION_AND_MODE if operation.path.endswith("/infer") else EXAMPLES_PER_OPERATION_AND_MODE


def _load_the_model(agent: LiveAgent) -> None:
    """Generated unload requests may have unloaded it; each operation starts with the model serving."""
    assert httpx.post(f"{agent.url}/v2/repository/models/{MODEL}/load", headers=agent.admin_headers).status_code == 200


def _exercise(agent: LiveAgent, operation, mode: GenerationMode, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Send generated cases of one operation; return how many were sent and what went wrong."""
    sent, failures = 0, []

    @settings(
        max_examples=_examples(operation),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), aim=st.booleans())
    def check(case, aim: bool) -> None:
        nonlocal sent
        _aim_at_the_model(case, aim)
        response = case.call(base_url=agent.url, headers=headers, timeout=30)
        sent += 1
        if response.status_code >= 500:
            failures.append(f"{operation.label} → {response.status_code}: {response.text[:300]}\n{case.as_curl_command()}")
        elif response.status_code >= 400 and "error" not in response.json():
            failures.append(f"{operation.label} → {response.status_code} without an error message: {response.text[:300]}")

    try:
        check()
    except Unsatisfiable:  # nothing to make invalid: the operation takes no parameters or body
        assert mode is GenerationMode.NEGATIVE, operation.label
    return sent, failures


@pytest.mark.slow
@pytest.mark.parametrize("token", [True, False], ids=["with-token", "without-token"])
def test_no_generated_request_gets_a_server_error(agent: LiveAgent, token: bool):
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if token else {}
    total, failures = 0, []
    for operation in _operations(agent):
        _load_the_model(agent)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            sent, found = _exercise(agent, operation, mode, headers)
            total += sent
            failures += found
    assert not failures, "\n\n".join(failures[:10])
    assert total >= 300, f"only {total} requests were generated"


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=40,
)


_SCALARS = st.sampled_from([st.booleans(), st.integers(), st.integers(-300, 300), st.floats(), st.text(max_size=2)])


@st.composite
def _tensor(draw):
    """Often well-shaped (``[rows, 4]`` with ``4 * rows`` values of one kind), sometimes anything at all."""
    if draw(st.booleans()):
        return draw(st.lists(st.integers(0, 6), max_size=3)), draw(st.lists(_JSON_VALUES, max_size=12))
    rows = draw(st.integers(0, 3))
    values = draw(st.lists(draw(_SCALARS), min_size=4 * rows, max_size=4 * rows))
    nested = draw(st.booleans()) and rows > 0
    return [rows, 4], [values[i:i + 4] for i in range(0, len(values), 4)] if nested else values


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(tensor=_tensor(), datatype=st.sampled_from(["FP32", "FP16", "INT8", "UINT8", "INT64", "BOOL", "BYTES"]))
def test_decoding_json_tensors_either_succeeds_exactly_or_refuses(tensor, datatype):
    """Any JSON a client sends for any declared datatype: a correctly shaped array, or a ProtocolError; nothing else."""
    from device_agent.bundle import TensorSpec
    from device_agent.protocol import InferRequest, ProtocolError, decode_inputs
    from device_agent.runtime import NUMPY_DTYPES
    from tests.support.bundles import tiny_manifest

    manifest = tiny_manifest().model_copy(update={"inputs": [TensorSpec(name="x", datatype=datatype, shape=["batch", 4])]})
    shape, data = tensor
    request = InferRequest.model_validate({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]})
    try:
        feeds = decode_inputs(request, b"", manifest)
    except ProtocolError:
        event("refused")
        return
    event("decoded")
    assert feeds["x"].shape == tuple(shape)
    assert feeds["x"].dtype == NUMPY_DTYPES.get(datatype, np.dtype(object))
