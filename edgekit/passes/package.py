"""package: the signed bundle (.ekb) a device installs.

The bundle carries the model, its preprocessing (the tokenizer, or the image
preprocessing record), golden vectors (real test inputs
with the final model's outputs on this host, and tolerances wide enough for
another machine's kernels), the build metrics, and the target's identity.
Its format is ``device_agent.bundle``: the same code the device reads it with.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig
from edgekit.targets import TargetProfile

# Golden tolerances per precision: int8 kernels differ between CPUs (VNNI, NEON),
# fp16 between GPUs; fp32 differs only by summation order.
GOLDEN_TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "int8": (5e-2, 5e-2)}
_ONNX_TO_OIP = {1: "FP32", 10: "FP16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8", 11: "FP64"}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    target: TargetProfile
    golden_samples: int


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    assert target is not None
    return Options(name=config.model.name, version=config.model.version, target=target, golden_samples=config.evaluation.golden_samples)


def _tensor_specs(values, ranges: dict[str, tuple[int, int]] | None = None) -> list:
    from device_agent.bundle import TensorSpec

    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
        specs.append(TensorSpec(name=value.name, datatype=_ONNX_TO_OIP[tensor.elem_type], shape=shape,
                                value_range=(ranges or {}).get(value.name)))
    return specs


# Ops whose input (index) looks rows up in a table (index): the table's first dimension bounds the input's values.
_LOOKUPS = {"Gather": [(1, 0)], "EmbedLayerNormalization": [(0, 2), (1, 4)]}
# Ops that pass values through unchanged: a graph input seen through them is still that input, a table still that table.
_PASS_THROUGH = {"Cast", "Identity", "DequantizeLinear"}


def index_ranges(graph) -> dict[str, tuple[int, int]]:
    """The values each integer graph input may hold: 0 to the rows of every table it indexes, less one.

    Token ids past the vocabulary, or type ids past the type table, make ONNX Runtime fail inside the model; the agent
    refuses them before (device_agent.input_contract). Quantized tables are read through their DequantizeLinear.
    """
    tables = {initializer.name: list(initializer.dims) for initializer in graph.initializer}
    origin = {value.name: value.name for value in graph.input if value.type.tensor_type.elem_type in (6, 7)}
    for node in graph.node:
        if node.op_type in _PASS_THROUGH and node.input and node.output:
            if node.input[0] in origin:
                origin[node.output[0]] = origin[node.input[0]]
            if node.input[0] in tables:
                tables[node.output[0]] = tables[node.input[0]]
    ranges: dict[str, tuple[int, int]] = {}
    for node in graph.node:
        for index_at, table_at in _LOOKUPS.get(node.op_type, []):
            if len(node.input) <= max(index_at, table_at):
                continue
            source, table = origin.get(node.input[index_at]), tables.get(node.input[table_at])
            if source is None or not table:
                continue
            high = table[0] - 1 if node.op_type != "Gather" or _gather_axis(node) == 0 else None
            if high is not None:
                ranges[source] = (0, min(high, ranges.get(source, (0, high))[1]))
    return ranges


def _gather_axis(node) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)


def bundle_metrics(artifact: Artifact) -> dict:
    """The numbers a device or an operator needs, without per-class tables."""
    keep = {"accuracy", "f1_macro", "latency_p50_ms", "latency_p95_ms", "throughput", "size_mb", "top1_agreement"}
    evaluation = artifact.results.evaluation
    return {
        "reference": evaluation.reference.model_dump(include=keep, exclude_none=True) if evaluation else {},
        "final": evaluation.final.model_dump(include=keep, exclude_none=True) if evaluation else {},
        "gates": [gate.model_dump() for gate in artifact.gates],
    }


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    import numpy as np
    import onnx

    from device_agent.bundle import (
        GoldenVectors, Manifest, ModelInfo, RuntimeInfo, TargetInfo, TaskInfo, write_bundle,
    )
    from device_agent.keys import load_private_key
    from edgekit.engines import open_runner
    from edgekit.tasks import model_feeds, task_for

    target, task = options.target, task_for(artifact.task.kind)
    graph = onnx.load(str(artifact.model_path), load_external_data=False).graph
    texts = ctx.data.test.inputs[: options.golden_samples]
    # The golden outputs are the target engine's on this host: the device compares its own against them.
    session = open_runner(artifact.model_path, target.runtime.engine)
    names = session.input_names
    feeds = {k: v for k, v in model_feeds(artifact.task, texts).items() if k in names}
    outputs = dict(zip([value.name for value in graph.output], session.run(feeds), strict=True))  # both in graph order
    golden = ctx.work_dir / "golden.npz"
    np.savez(golden, **{f"input:{k}": v for k, v in feeds.items()}, **{f"output:{k}": v for k, v in outputs.items()})
    atol, rtol = GOLDEN_TOLERANCES[artifact.precision]
    drift_reference = _drift_reference(artifact, ctx)

    manifest = Manifest(
        model=ModelInfo(name=options.name, version=options.version),
        target=TargetInfo(name=target.name, profile_sha256=target.sha256(), cpu_arch=target.cpu_arch,
                          accelerator=target.accelerator, gpu_compute_capability=target.gpu_compute_capability,
                          software=target.software.pinned()),
        runtime=RuntimeInfo(engine=target.runtime.engine, execution_providers=list(target.runtime.execution_providers),
                            model_file="model.onnx", engine_build=dict(artifact.engine_build) if artifact.engine_build else None,
                            max_rows_per_run=_max_rows_per_run(artifact)),
        precision=artifact.precision,
        inputs=[spec for spec in _tensor_specs(graph.input, index_ranges(graph)) if spec.name in names],
        outputs=_tensor_specs(graph.output),
        task=TaskInfo(kind=task.bundle_kind, labels=list(artifact.task.labels)),
        preprocessing=task.bundle_preprocessing(artifact.task),
        metrics=bundle_metrics(artifact),
        golden=GoldenVectors(file="golden.npz", atol=atol, rtol=rtol),
        drift_reference=drift_reference,
    )
    bundle = ctx.work_dir / f"{options.name}-{options.version}.ekb"
    payload = {"model.onnx": artifact.model_path, "golden.npz": golden, **task.bundle_files(artifact.task)}
    write_bundle(bundle, manifest, payload, load_private_key(ctx.signing_key))
    ctx.say(f"package: signed {bundle.name} ({bundle.stat().st_size / 1e6:.1f} MB)")
    return replace(artifact, stage=Stage.BUNDLE, directory=ctx.work_dir, model_file=bundle.name)


def _max_rows_per_run(artifact: Artifact) -> int | None:
    """1 when the gates measured the model a row per run (dynamic int8): the device must not join requests either."""
    evaluation = artifact.results.evaluation
    return 1 if evaluation and evaluation.final.rows_per_run == 1 else None


def _drift_reference(artifact: Artifact, ctx: PassContext) -> dict | None:
    """The drift reference (edgekit.drift_reference) from the validation and test rows through the final model."""
    from edgekit.tasks import task_for

    try:
        reference = task_for(artifact.task.kind).drift_reference(artifact.model_path, artifact.task, (ctx.data.val, ctx.data.test))
    except ValueError as problem:  # e.g. an image task without its preprocessing: the bundle serves, unmonitored
        reference = None
        ctx.say(f"package: no drift reference ({problem}); the device will not score drift for this bundle")
    if reference is None:
        return None
    (ctx.work_dir / "drift_reference.json").write_text(reference.model_dump_json(indent=1))
    ctx.say(f"package: drift reference from {reference.reference_rows} rows, {len(reference.features)} features")
    return reference.model_dump(mode="json")


PASS = Pass(
    name="package",
    version=3,  # 3: runtime.max_rows_per_run
    takes=frozenset({Stage.EVALUATED}),
    gives=Stage.BUNDLE,
    target_specific=True,
    libraries=("onnx", "onnxruntime", "openvino"),
    options_for=options_for,
    run=run,
    signs=True,
)
