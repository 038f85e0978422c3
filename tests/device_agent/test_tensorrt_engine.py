"""The native TensorRT path: build options, cache keys and the cache run everywhere; engines need a GPU.

Tests marked ``tensorrt`` build and run real engines; the conftest skips them
where tensorrt or a GPU is absent, and the ``native`` fixture also skips them
where the CUDA binding (cuda-python) is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent import files, tensorrt_engine
from device_agent.bundle import Manifest, RuntimeInfo, canonical_manifest_bytes
from device_agent.runtime import ModelLoadError, load_session, run_golden_check
from device_agent.tensorrt_engine import (
    EngineBuildError,
    EngineBuildOptions,
    ShapeRange,
    build_engine_file,
    build_or_load_engine,
    engine_cache_key,
    load_tensorrt_session,
    profile_shapes,
    tensorrt_problem,
)
from tests.support.bundles import tiny_manifest, tiny_payload

DIMS = {"batch": {"min": 1, "opt": 1, "max": 8}, "sequence": {"min": 1, "opt": 128, "max": 256}}


def _options(**changes: object) -> EngineBuildOptions:
    base = {"precision": "int8", "workspace_mb": 768, "profile": profile_shapes({"input_ids": ["batch", "sequence"]}, DIMS)}
    return EngineBuildOptions(**{**base, **changes})


# --------------------------------------------------------------------------- profile shapes


def test_profile_maps_symbolic_dims_through_the_target_ranges():
    profile = profile_shapes({"input_ids": ["batch", "sequence"], "pixel_values": ["batch", 3, 224, 224]}, DIMS)
    assert profile["input_ids"] == ShapeRange(min=[1, 1], opt=[1, 128], max=[8, 256])
    assert profile["pixel_values"] == ShapeRange(min=[1, 3, 224, 224], opt=[1, 3, 224, 224], max=[8, 3, 224, 224])


def test_profile_reads_exporter_dimension_names_as_the_target_names():
    profile = profile_shapes({"attention_mask": ["batch_size", "sequence_length"]}, DIMS)
    assert profile["attention_mask"] == ShapeRange(min=[1, 1], opt=[1, 128], max=[8, 256])


def test_profile_accepts_objects_with_min_opt_max():
    from types import SimpleNamespace

    profile = profile_shapes({"x": ["batch", 4]}, {"batch": SimpleNamespace(min=2, opt=4, max=16)})
    assert profile["x"] == ShapeRange(min=[2, 4], opt=[4, 4], max=[16, 4])


@pytest.mark.parametrize(
    ("inputs", "dims", "message"),
    [
        ({"x": ["frames", 4]}, DIMS, "'frames', which has no range (dimension ranges known: batch, sequence)"),
        ({"x": ["batch"]}, {}, "known: none"),
        ({"x": [0, 4]}, DIMS, "axis 0 has size 0"),
        ({"x": ["batch"]}, {"batch": {"min": 4, "opt": 2, "max": 8}}, "min <= opt <= max"),
    ],
)
def test_profile_problems_name_the_input_and_dimension(inputs, dims, message):
    with pytest.raises(EngineBuildError, match="input 'x'") as failure:
        profile_shapes(inputs, dims)
    assert message in str(failure.value)


# --------------------------------------------------------------------------- cache keys


SMALL_BATCH = {"min": 1, "opt": 1, "max": 4}
BASE_KEY = ("a" * 64, "10.3.0.30", "8.7", _options())


@pytest.mark.parametrize(
    "changed",
    [
        ("b" * 64, "10.3.0.30", "8.7", _options()),
        ("a" * 64, "10.3.0.26", "8.7", _options()),
        ("a" * 64, "10.3.0.30", "8.6", _options()),
        ("a" * 64, "10.3.0.30", "8.7", _options(precision="fp16")),
        ("a" * 64, "10.3.0.30", "8.7", _options(workspace_mb=512)),
        ("a" * 64, "10.3.0.30", "8.7", _options(profile=profile_shapes({"input_ids": ["batch", "sequence"]}, {**DIMS, "batch": SMALL_BATCH}))),
    ],
    ids=["model", "tensorrt-version", "compute-capability", "precision", "workspace", "profile"],
)
def test_cache_key_changes_with_each_component(changed):
    assert engine_cache_key(*changed) != engine_cache_key(*BASE_KEY)


def test_cache_key_is_stable_and_readable():
    key = engine_cache_key(*BASE_KEY)
    assert key == engine_cache_key("a" * 64, "10.3.0.30", "8.7", _options())
    assert key.startswith("aaaaaaaaaaaa-trt10.3.0.30-sm87-")
    assert "/" not in key


# --------------------------------------------------------------------------- manifest round trip


def test_options_round_trip_through_a_signed_manifest():
    options = _options()
    document = options.to_manifest()
    assert document == {
        "precision": "int8",
        "workspace_mb": 768,
        "profile": {"input_ids": {"min": [1, 1], "opt": [1, 128], "max": [8, 256]}},
    }
    manifest = tiny_manifest().model_copy(update={"runtime": RuntimeInfo(
        engine="tensorrt", execution_providers=["TensorrtExecutionProvider"], model_file="model.onnx", engine_build=document,
    )})
    reread = Manifest.model_validate_json(canonical_manifest_bytes(manifest))
    assert EngineBuildOptions.from_manifest(reread.runtime.engine_build) == options


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"precision": "int4", "workspace_mb": 1}, "precision"),
        ({"precision": "fp16", "workspace_mb": 0}, "workspace_mb"),
        ({"precision": "fp16", "workspace_mb": 1, "calibrator": "x"}, "calibrator"),
        ({"precision": "fp16", "workspace_mb": 1, "profile": {"x": {"min": [2], "opt": [1], "max": [4]}}}, "profile.x"),
    ],
)
def test_bad_build_options_are_refused_naming_the_field(document, field):
    with pytest.raises(EngineBuildError, match="rebuild the bundle") as failure:
        EngineBuildOptions.from_manifest(document)
    assert field in str(failure.value)


# --------------------------------------------------------------------------- what is missing here


def test_tensorrt_problem_names_a_missing_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    problem = tensorrt_problem()
    assert problem is not None and "tensorrt is not importable" in problem


@pytest.mark.skipif(tensorrt_problem() is None, reason="the native TensorRT path works on this machine")
def test_tensorrt_problem_names_what_this_machine_lacks():
    problem = tensorrt_problem()
    assert any(word in problem for word in ("tensorrt", "cuda-python", "GPU"))


def test_load_raises_model_load_error_naming_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    payload = tiny_payload(tmp_path / "bundle")
    manifest = _tensorrt_manifest(_fp32_options())
    with pytest.raises(ModelLoadError, match="native TensorRT engine unavailable: tensorrt is not importable"):
        load_tensorrt_session(manifest, payload["model.onnx"], tmp_path / "cache")


def test_load_without_build_options_says_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(tensorrt_engine, "tensorrt_problem", lambda: None)
    payload = tiny_payload(tmp_path / "bundle")
    with pytest.raises(ModelLoadError, match="no runtime.engine_build"):
        load_tensorrt_session(tiny_manifest(), payload["model.onnx"], tmp_path / "cache")


PROBE = """
import json, sys
import device_agent.tensorrt_engine as engine
engine.tensorrt_problem()
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_the_engine_module_stays_light():
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    loaded = {name.split(".")[0] for name in json.loads(output)}
    assert not loaded & {"torch", "transformers", "edgekit", "onnx"}
    # tensorrt_problem() may import tensorrt and cuda where installed; importing the module alone must not
    bare = subprocess.run(
        [sys.executable, "-c", "import json, sys, device_agent.tensorrt_engine; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert not {name.split(".")[0] for name in json.loads(bare)} & {"tensorrt", "cuda", "torch", "transformers", "edgekit", "onnx"}


# --------------------------------------------------------------------------- the cache, without a GPU


class _FakeTensorRT:
    __version__ = "10.3.0.30"


@pytest.fixture
def fake_builder(monkeypatch):
    """Stand-ins for tensorrt and CUDA so the cache logic runs anywhere; records each build."""
    builds: list[EngineBuildOptions] = []

    def serialize(onnx_path: Path, options: EngineBuildOptions) -> bytes:
        builds.append(options)
        return b"plan for " + onnx_path.read_bytes()[:16]

    monkeypatch.setattr(tensorrt_engine, "_import_tensorrt", lambda: _FakeTensorRT)
    monkeypatch.setattr(tensorrt_engine, "cuda_compute_capability", lambda cudart=None: "8.7")
    monkeypatch.setattr(tensorrt_engine, "_serialize_engine", serialize)
    return builds


def test_cache_builds_once_per_key(fake_builder, tmp_path):
    model = tiny_payload(tmp_path / "bundle")["model.onnx"]
    cache = tmp_path / "cache"
    first = build_or_load_engine(model, _fp32_options(), cache)
    stamp = first.stat().st_mtime_ns
    second = build_or_load_engine(model, _fp32_options(), cache)
    assert second == first and second.stat().st_mtime_ns == stamp
    assert len(fake_builder) == 1
    record = json.loads(first.with_suffix(".json").read_text())
    assert record["tensorrt_version"] == "10.3.0.30" and record["compute_capability"] == "8.7"
    assert record["options"] == _fp32_options().to_manifest()

    other = build_or_load_engine(model, _fp32_options(precision="fp16"), cache)
    assert other != first and len(fake_builder) == 2


def test_a_failed_build_leaves_nothing_in_the_cache(fake_builder, monkeypatch, tmp_path):
    model = tiny_payload(tmp_path / "bundle")["model.onnx"]
    cache = tmp_path / "cache"

    def fail(onnx_path: Path, options: EngineBuildOptions) -> bytes:
        raise EngineBuildError("TensorRT could not build an engine")

    monkeypatch.setattr(tensorrt_engine, "_serialize_engine", fail)
    with pytest.raises(EngineBuildError):
        build_or_load_engine(model, _fp32_options(), cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_an_interrupted_write_leaves_no_plan_and_stale_temp_files_go(fake_builder, monkeypatch, tmp_path):
    model = tiny_payload(tmp_path / "bundle")["model.onnx"]
    cache = tmp_path / "cache"
    destination = cache / "engine.plan"

    class Killed(BaseException):
        """Stands for a kill between the write and the rename."""

    def crash(*args: object) -> None:
        raise Killed

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(Killed):
        build_engine_file(model, _fp32_options(), destination)
    monkeypatch.undo()
    assert list(cache.iterdir()) == []

    # A temporary file a killed process left behind is removed by the next build of that key.
    monkeypatch.setattr(tensorrt_engine, "_import_tensorrt", lambda: _FakeTensorRT)
    monkeypatch.setattr(tensorrt_engine, "cuda_compute_capability", lambda cudart=None: "8.7")
    monkeypatch.setattr(tensorrt_engine, "_serialize_engine", lambda path, options: b"plan")
    key = engine_cache_key(tensorrt_engine.file_sha256(model), "10.3.0.30", "8.7", _fp32_options())
    stale = cache / f".{key}.plan.abc123.tmp"
    stale.write_bytes(b"half a plan")
    plan = build_or_load_engine(model, _fp32_options(), cache)
    assert plan.read_bytes() == b"plan" and not stale.exists()


# --------------------------------------------------------------------------- real engines (GPU + tensorrt)


def _fp32_options(**changes: object) -> EngineBuildOptions:
    base = {"precision": "fp32", "workspace_mb": 256, "profile": profile_shapes({"x": ["batch", 4]}, {"batch": {"min": 1, "opt": 2, "max": 8}})}
    return EngineBuildOptions(**{**base, **changes})


def _tensorrt_manifest(options: EngineBuildOptions) -> Manifest:
    return tiny_manifest().model_copy(update={
        "precision": options.precision,
        "runtime": RuntimeInfo(engine="tensorrt", execution_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"],
                               model_file="model.onnx", engine_build=options.to_manifest()),
    })


@pytest.fixture
def native():
    problem = tensorrt_problem()
    if problem:
        pytest.skip(problem)


@pytest.mark.tensorrt
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2)])
def test_real_engine_matches_onnxruntime(native, tmp_path, precision, atol):
    payload = tiny_payload(tmp_path / "bundle")
    manifest = _tensorrt_manifest(_fp32_options(precision=precision))
    reference = load_session(tiny_manifest(), payload["model.onnx"])
    with load_tensorrt_session(manifest, payload["model.onnx"], tmp_path / "cache") as session:
        assert session.engine_path.parent == tmp_path / "cache" and session.engine_path.suffix == ".plan"
        for batch in (1, 2, 8):
            x = np.random.default_rng(batch).normal(size=(batch, 4)).astype(np.float32)
            got = session.run({"x": x})["logits"]
            want = reference.run({"x": x})["logits"]
            assert got.shape == want.shape == (batch, 3) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=atol, rtol=atol)
        if precision == "fp32":
            assert run_golden_check(session, payload["golden.npz"]) < 1e-4
        with pytest.raises(ValueError, match="outside the engine's profile"):
            session.run({"x": np.zeros((9, 4), np.float32)})


@pytest.mark.tensorrt
def test_second_load_hits_the_cache(native, tmp_path, monkeypatch):
    payload = tiny_payload(tmp_path / "bundle")
    manifest = _tensorrt_manifest(_fp32_options())
    cache = tmp_path / "cache"
    first = load_tensorrt_session(manifest, payload["model.onnx"], cache)
    plan, stamp = first.engine_path, first.engine_path.stat().st_mtime_ns
    first.close()

    def no_build(*args: object) -> bytes:
        raise AssertionError("the second load rebuilt the engine")

    monkeypatch.setattr(tensorrt_engine, "_serialize_engine", no_build)
    with load_tensorrt_session(manifest, payload["model.onnx"], cache) as second:
        assert second.engine_path == plan and plan.stat().st_mtime_ns == stamp
        assert second.run({"x": np.ones((1, 4), np.float32)})["logits"].shape == (1, 3)
    assert sorted(path.suffix for path in cache.iterdir()) == [".json", ".plan"]


@pytest.mark.tensorrt
def test_a_corrupt_cached_plan_is_rebuilt(native, tmp_path):
    payload = tiny_payload(tmp_path / "bundle")
    manifest = _tensorrt_manifest(_fp32_options())
    cache = tmp_path / "cache"
    with load_tensorrt_session(manifest, payload["model.onnx"], cache) as session:
        plan = session.engine_path
    plan.write_bytes(b"not an engine")
    with load_tensorrt_session(manifest, payload["model.onnx"], cache) as session:
        assert session.run({"x": np.ones((2, 4), np.float32)})["logits"].shape == (2, 3)
    assert plan.read_bytes() != b"not an engine"
