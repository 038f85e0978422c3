"""The compile pass: ONNX Runtime targets pass the model through; TensorRT targets get build options, and an engine only on a matching host."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.progress import Progress

from device_agent.host import GpuInfo, HostReport, InstalledRuntime, probe_host
from device_agent.tensorrt_engine import EngineBuildOptions, tensorrt_problem
from edgekit.results import PassResults, QuantizeResult
from edgekit.artifact import Artifact, PassContext, Stage, TaskSpec
from edgekit.config import BuildConfig
from edgekit.errors import EdgekitError
from edgekit.passes import compile as compile_pass
from edgekit.targets import SoftwareLock, TargetProfile, load_builtin_targets, load_target

JETSON = "jetson-orin-nano-8gb"


def write_tiny_qdq_classifier(directory: Path, shape: list[int | str], seed: int = 0, external_data: bool = False) -> Path:
    """logits = dq(q(x)) @ dq(W_int8) + b: a symmetric, per-channel QDQ model as the quantize pass gives TensorRT."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    weight_scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    initializers = [
        numpy_helper.from_array(np.round(weight / weight_scale).astype(np.int8), "W_q"),
        numpy_helper.from_array(weight_scale, "W_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "W_zero"),
        numpy_helper.from_array(np.array(4 / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zero"], ["W_dq"], axis=1),
        helper.make_node("MatMul", ["x_dq", "W_dq"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-qdq-classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*shape[:-1], 3])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    if external_data:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def _artifact(directory: Path, precision: str = "int8") -> Artifact:
    task = TaskSpec(kind="text-classification", labels=("cat", "dog", "bird"), max_length=8, tokenizer_file=Path("tokenizer.json"))
    return Artifact(stage=Stage.QUANTIZED, directory=directory, model_file="model.onnx", digest="0" * 64, task=task,
                    precision=precision, results=PassResults(quantization=QuantizeResult(scheme="static_qdq", kept_in_float=[])))


def _context(work_dir: Path, target: TargetProfile, said: list[str]) -> PassContext:
    return PassContext(work_dir=work_dir, data=None,  # type: ignore[arg-type]
                       progress=Progress(disable=True), signing_key=Path("unused.key"), say=said.append)


def _host(gpus: list[GpuInfo], tensorrt: str | None) -> HostReport:
    return HostReport(
        python="3.12", platform="test", cpu_arch="x86_64", cpu_model=None, cpu_count=1, cpu_flags=[],
        memory_total_mb=None, memory_available_mb=None, disk_free_mb=1, jetson=None, gpus=gpus,
        runtimes=[InstalledRuntime("tensorrt", tensorrt, problem=None if tensorrt else "not importable")], warnings=[],
    )


def _compile(tmp_path: Path, target: TargetProfile, artifact: Artifact) -> tuple[Artifact, list[str]]:
    said: list[str] = []
    options = compile_pass.options_for(BuildConfig(), target)
    return compile_pass.run(artifact, options, _context(tmp_path / "compile", target, said)), said


@pytest.fixture
def bare_host(monkeypatch):
    """A build host without GPU or TensorRT, whatever machine runs the tests."""
    monkeypatch.setattr(compile_pass, "probe_host", lambda disk_path=None: _host([], None))


# --------------------------------------------------------------------------- TensorRT targets


def test_jetson_gets_build_options_from_its_profile_and_a_reason_for_no_engine(tmp_path, bare_host):
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["batch", "sequence", 4])
    result, said = _compile(tmp_path, load_target(JETSON), _artifact(source.parent))

    assert result.stage is Stage.ENGINE and result.directory == tmp_path / "compile"
    assert result.model_path.read_bytes() == source.read_bytes()
    assert result.engine_build == {
        "precision": "int8",
        "workspace_mb": 768,  # a quarter of the 3072 MB budget
        "profile": {"x": {"min": [1, 1, 4], "opt": [1, 128, 4], "max": [8, 256, 4]}},
    }
    assert EngineBuildOptions.from_manifest(result.engine_build).precision == "int8"
    report = result.results.compile.model_dump()
    assert report["engine"] == "tensorrt" and report["engine_built"] is False
    assert report["reason"] == "host has no GPU; tensorrt not installed"
    assert result.results.quantization == QuantizeResult(scheme="static_qdq", kept_in_float=[]), "earlier records are kept"
    assert not (result.directory / compile_pass.PLAN_FILE).exists()
    assert any("the device builds it on first load" in line for line in said)


def test_jetson_on_this_machine_builds_or_says_why_not(tmp_path):
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["batch", 4])
    result, _ = _compile(tmp_path, load_target(JETSON), _artifact(source.parent))
    report = result.results.compile.model_dump()
    if report["engine_built"]:  # only on a Jetson Orin with TensorRT 10.3
        assert (result.directory / compile_pass.PLAN_FILE).is_file()
    else:
        assert report["reason"]
    assert result.engine_build["profile"] == {"x": {"min": [1, 4], "opt": [1, 4], "max": [8, 4]}}


def test_fp16_fallback_is_built_from_a_float_model(tmp_path, bare_host):
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["batch", 4])
    result, _ = _compile(tmp_path, load_target(JETSON), _artifact(source.parent, precision="fp16"))
    assert result.engine_build["precision"] == "fp16"


def test_int8_without_qdq_nodes_is_refused(tmp_path, bare_host):
    from tests.support.bundles import write_tiny_classifier

    directory = tmp_path / "quantized"
    directory.mkdir()
    write_tiny_classifier(directory)
    with pytest.raises(EdgekitError, match="no QuantizeLinear/DequantizeLinear nodes.*static_qdq"):
        _compile(tmp_path, load_target(JETSON), _artifact(directory))


def test_a_dimension_the_target_has_no_range_for_says_where_to_add_it(tmp_path, bare_host):
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["frames", 4])
    with pytest.raises(EdgekitError, match=r"'frames'.*known: batch, sequence.*input_shapes.dims"):
        _compile(tmp_path, load_target(JETSON), _artifact(source.parent))


def test_external_data_travels_with_the_model(tmp_path, bare_host):
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["batch", 4], external_data=True)
    result, _ = _compile(tmp_path, load_target(JETSON), _artifact(source.parent))
    assert (result.directory / "model.onnx.data").read_bytes() == (source.parent / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("name", [t.name for t in load_builtin_targets() if t.runtime.engine == "tensorrt"])
def test_every_shipped_tensorrt_target_gives_build_options(tmp_path, bare_host, name):
    target = load_target(name)
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["batch", "sequence", 4])
    result, _ = _compile(tmp_path, target, _artifact(source.parent))
    options = EngineBuildOptions.from_manifest(result.engine_build)
    batch, sequence = target.input_shapes.dims["batch"], target.input_shapes.dims["sequence"]
    assert options.profile["x"].max == [batch.max, sequence.max, 4]
    assert batch.max >= target.max_batch, "the device batcher would send batches the engine cannot take"


@pytest.mark.parametrize(
    ("gpus", "tensorrt", "reason"),
    [
        ([], "10.3.0.30", "host has no GPU"),
        ([GpuInfo("H100", "9.0")], "10.3.0.30", "host GPU 9.0 != target 8.7"),
        ([GpuInfo("Orin", "8.7")], None, "tensorrt not installed"),
        ([GpuInfo("Orin", "8.7")], "10.7.0.23", "host TensorRT 10.7.0.23 != target 10.3"),
        ([GpuInfo("H100", "9.0")], None, "host GPU 9.0 != target 8.7; tensorrt not installed"),
        ([GpuInfo("Orin", "8.7")], "10.3.0.30", None),
    ],
)
def test_the_host_builds_only_when_gpu_and_tensorrt_match(gpus, tensorrt, reason):
    options = compile_pass.options_for(BuildConfig(), load_target(JETSON))
    assert compile_pass.host_engine_problem(options, _host(gpus, tensorrt)) == reason


# --------------------------------------------------------------------------- ONNX Runtime targets


def test_cpu_target_passes_the_model_through(tmp_path, bare_host):
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["batch", 4])
    result, _ = _compile(tmp_path, load_target("x86-64-cpu"), _artifact(source.parent))
    assert result.stage is Stage.ENGINE and result.engine_build is None
    assert result.model_path.read_bytes() == source.read_bytes()
    assert result.model_path.stat().st_ino == source.stat().st_ino  # a hard link, not a copy
    assert result.results.compile.model_dump()["engine"] == "onnxruntime" and result.results.compile.model_dump()["engine_built"] is False
    assert list(result.directory.iterdir()) == [result.model_path]


def test_options_and_pass_declaration():
    jetson = compile_pass.options_for(BuildConfig(), load_target(JETSON))
    assert (jetson.engine, jetson.workspace_mb, jetson.gpu_compute_capability, jetson.tensorrt_version) == ("tensorrt", 768, "8.7", "10.3")
    assert jetson.dims["sequence"].opt == 128
    cpu = compile_pass.options_for(BuildConfig(), load_target("x86-64-cpu"))
    assert (cpu.engine, cpu.dims, cpu.workspace_mb) == ("onnxruntime", {}, 512)
    assert compile_pass.PASS.takes == frozenset({Stage.QUANTIZED}) and compile_pass.PASS.gives is Stage.ENGINE
    assert compile_pass.PASS.target_specific and not compile_pass.PASS.uses_data
    with pytest.raises(ValueError, match="target-specific"):
        compile_pass.options_for(BuildConfig(), None)


# --------------------------------------------------------------------------- a real engine on a matching host


@pytest.mark.tensorrt
def test_matching_host_builds_the_engine_here(tmp_path):
    problem = tensorrt_problem()
    if problem:
        pytest.skip(problem)
    import tensorrt

    host = probe_host()
    if not host.gpus or not host.gpus[0].compute_capability:
        pytest.skip("nvidia-smi reports no compute capability for GPU 0")
    version = ".".join(tensorrt.__version__.split(".")[:2])
    jetson = load_target(JETSON)
    matching = jetson.model_copy(update={
        "gpu_compute_capability": host.gpus[0].compute_capability,
        "software": SoftwareLock(**{**jetson.software.pinned(), "tensorrt": version}),
    })
    source = write_tiny_qdq_classifier(tmp_path / "quantized", ["batch", 4])
    result, said = _compile(tmp_path, matching, _artifact(source.parent))

    report = result.results.compile.model_dump()
    assert report["engine_built"] is True and report["reason"] is None, report
    assert report["engine_file"] == "model.plan" and report["compute_capability"] == host.gpus[0].compute_capability
    plan = result.directory / "model.plan"
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None and engine.num_io_tensors == 2
    assert result.engine_build["precision"] == "int8"
    assert any("building the TensorRT engine here" in line for line in said)
    assert replace(result, results=PassResults()).model_path.read_bytes() == source.read_bytes()


def test_importing_the_pass_loads_no_heavy_library():
    import json
    import subprocess
    import sys

    probe = "import json, sys, edgekit.passes.compile; print(json.dumps(sorted(sys.modules)))"
    loaded = {name.split(".")[0] for name in json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)}
    assert not loaded & {"numpy", "onnx", "onnxruntime", "tensorrt", "torch"}
