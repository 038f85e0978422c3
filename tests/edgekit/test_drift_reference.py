"""The build's drift reference: features through a real ONNX model, text and image, and the package pass's manifest slot."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from device_agent.bundle import ImagePreprocessing
from device_agent.telemetry_schema import DriftReference
from edgekit.drift_reference import reference_from_splits

LABELS = ("anger", "joy", "fear")


def _text_model(path: Path, vocabulary: int = 31000) -> Path:
    """logits = mean over tokens of an embedding of input_ids, times W: real ONNX, no training."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(rng.normal(size=(vocabulary, 8)).astype(np.float32), "E"),
                     numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _image_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "tiny-image",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(rng.normal(size=(64, 3)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _texts(count: int, seed: int) -> tuple[str, ...]:
    rng = np.random.default_rng(seed)
    words = ["calm", "river", "sudden", "laughter", "storm", "quiet", "bright", "gloom", "shout", "smile"]
    return tuple(" ".join(rng.choice(words, rng.integers(2, 40))) for _ in range(count))


def _split(inputs):
    from edgekit.data import Split

    return Split(inputs, np.zeros(len(inputs), dtype=np.int64))


def test_text_reference_through_the_model(tmp_path):
    from tests.support.tiny_bert import minilm_tokenizer_file

    task = SimpleNamespace(kind="text-classification", labels=LABELS, tokenizer_file=minilm_tokenizer_file(), max_length=32,
                           output_name="logits")
    reference = reference_from_splits(_text_model(tmp_path / "text.onnx"), task, [_split(_texts(600, 1)), _split(_texts(300, 2))],
                                      window_size=200)
    assert reference.reference_rows == 900 and reference.task == "text-classification"
    assert set(reference.features) == {
        "input.token_count", "input.unknown_rate", "input.truncated",
        "output.predicted_class", "output.top_probability", "output.entropy",
    }
    assert reference.features["output.predicted_class"].categories == list(LABELS)
    truncated = reference.features["input.truncated"]
    assert truncated.edges == [-0.5, 0.5, 1.5] and 0 < truncated.proportions[2] < 1  # long texts fill max_length
    for feature in reference.features.values():
        assert sum(feature.proportions) == pytest.approx(1.0)
        assert feature.thresholds.psi > 0 and feature.thresholds.js > 0


def test_image_reference_from_raw_uint8_images(tmp_path):
    spec = ImagePreprocessing(crop=(8, 8), channel_order="L", layout="NCHW")
    task = SimpleNamespace(kind="image-classification", labels=LABELS, image_preprocessing=spec, output_name="logits")
    images = np.random.default_rng(3).integers(0, 256, (700, 8, 8, 1), dtype=np.uint8)
    reference = reference_from_splits(_image_model(tmp_path / "image.onnx"), task, [_split(images)], window_size=100)
    assert {"input.brightness", "input.contrast", "output.predicted_class"} <= set(reference.features)
    assert "input.channel_mean.0" not in reference.features  # one channel: brightness says it all
    with pytest.raises(ValueError, match="image preprocessing"):
        reference_from_splits(tmp_path / "image.onnx", SimpleNamespace(kind="image-classification", labels=LABELS),
                              [_split(images)])


def test_package_pass_writes_the_reference_into_the_signed_manifest(tmp_path):
    from rich.progress import Progress

    from device_agent.bundle import read_manifest_unverified
    from device_agent.keys import generate_keypair
    from edgekit.artifact import Artifact, PassContext, Stage, TaskSpec
    from edgekit.data import TaskData
    from edgekit.passes import package
    from edgekit.targets import load_target
    from tests.support.tiny_bert import minilm_tokenizer_file

    _text_model(tmp_path / "model.onnx")
    task = TaskSpec(kind="text-classification", labels=LABELS, max_length=32, tokenizer_file=minilm_tokenizer_file(),
                    input_names=("input_ids", "attention_mask"))
    split = _split(_texts(400, 4))
    data = TaskData(labels=LABELS, train=split, val=split, test=_split(_texts(400, 5)), calibration=split, digest="d")
    generate_keypair(tmp_path / "keys")
    work = tmp_path / "work"
    work.mkdir()
    ctx = PassContext(work_dir=work, data=data, progress=Progress(disable=True),
                      signing_key=tmp_path / "keys" / "edgekit.key", say=print)
    artifact = Artifact(Stage.EVALUATED, tmp_path, "model.onnx", "digest", task)
    options = package.Options(name="tiny", version="1.0.0", target=load_target("x86-64-cpu"), golden_samples=4)
    bundle = package.run(artifact, options, ctx)
    manifest, _ = read_manifest_unverified(bundle.model_path)
    reference = DriftReference.model_validate(manifest.drift_reference)
    assert reference.reference_rows == 800
    assert json.loads((work / "drift_reference.json").read_text()) == manifest.drift_reference
