"""Image models take raw uint8 images; the device preprocesses them as the bundle says, with numpy only."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton

from device_agent.bundle import (
    GoldenVectors, ImagePreprocessing, Manifest, ModelInfo, RuntimeInfo, TargetInfo, TaskInfo, TensorSpec, write_bundle,
)
from device_agent.config import AgentSettings
from device_agent.errors import UserError
from device_agent.host import probe_host
from device_agent.keys import Keyring
from device_agent.preprocess import ImagePreprocessor
from device_agent.repository import Repository
from device_agent.server import create_app
from tests.support.agent import serving, wait_ready

SPEC = ImagePreprocessing(resize=8, crop=(8, 8), channel_order="RGB", layout="NCHW", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def test_constant_image_stays_constant_through_resize_and_crop():
    image = np.full((1, 12, 16, 3), 128, np.uint8)
    out = ImagePreprocessor(SPEC)(image)
    assert out.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(out, (128 / 255 - 0.5) / 0.25, rtol=1e-6)


def test_downscale_by_two_averages_neighbours():
    row = np.arange(16, dtype=np.uint8).repeat(1)[None, :].repeat(16, 0)  # 16x16 horizontal gradient
    image = np.stack([row] * 3, axis=-1)[None]
    out = ImagePreprocessor(ImagePreprocessing(resize=8, crop=(8, 8), layout="NHWC", scale=1.0))(image)
    np.testing.assert_allclose(out[0, 0, :, 0], np.arange(8) * 2 + 0.5)


def test_bgr_and_grayscale_and_bad_inputs():
    image = np.zeros((1, 8, 8, 3), np.uint8)
    image[..., 0] = 255  # red
    bgr = ImagePreprocessor(ImagePreprocessing(crop=(8, 8), channel_order="BGR", layout="NHWC", scale=1.0))(image)
    assert bgr[0, 0, 0].tolist() == [0, 0, 255]
    with pytest.raises(UserError, match="3 channels; this model takes 1"):
        ImagePreprocessor(ImagePreprocessing(crop=(8, 8), channel_order="L"))(image)
    with pytest.raises(UserError, match="smaller than the model's 16x16 crop"):
        ImagePreprocessor(ImagePreprocessing(crop=(16, 16)))(image)
    with pytest.raises(UserError, match="must be uint8"):
        ImagePreprocessor(SPEC)(image.astype(np.float32))


def _tiny_cnn(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["pixels", "W"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "D", "c"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "D"),
        numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "c"),
    ]
    graph = helper.make_graph(nodes, "tiny-cnn", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_agent_serves_raw_uint8_images(tmp_path, signing_key, keyring_dir):
    model_path = tmp_path / "model.onnx"
    _tiny_cnn(model_path)
    session = onnxruntime.InferenceSession(str(model_path))
    golden_images = np.random.default_rng(4).integers(0, 256, size=(2, 10, 12, 3), dtype=np.uint8)
    golden_input = ImagePreprocessor(SPEC)(golden_images)
    np.savez(tmp_path / "golden.npz", **{"input:pixels": golden_input, "output:logits": session.run(None, {"pixels": golden_input})[0]})
    manifest = Manifest(
        model=ModelInfo(name="tiny-cnn", version="1.0.0"),
        target=TargetInfo(name="x86-64-cpu", profile_sha256="0" * 64, cpu_arch=probe_host().cpu_arch, accelerator="cpu"),
        runtime=RuntimeInfo(engine="onnxruntime", execution_providers=["CPUExecutionProvider"], model_file="model.onnx"),
        precision="fp32",
        inputs=[TensorSpec(name="pixels", datatype="FP32", shape=["batch", 3, 8, 8])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=["batch", 3])],
        task=TaskInfo(kind="image-classification", labels=["a", "b", "c"]),
        preprocessing=SPEC,
        golden=GoldenVectors(file="golden.npz", atol=1e-5, rtol=1e-4),
    )
    bundle = tmp_path / "cnn.ekb"
    write_bundle(bundle, manifest, {"model.onnx": model_path, "golden.npz": tmp_path / "golden.npz"}, signing_key)
    settings = AgentSettings(state_dir=tmp_path / "state", keyring_dir=keyring_dir)
    repository = Repository(settings.state_dir, Keyring.load(keyring_dir))
    repository.start()
    repository.install(bundle)
    with serving(create_app(repository, settings)) as address:
        wait_ready(f"http://{address}")
        client = triton.InferenceServerClient(address)
        metadata = client.get_model_metadata("tiny-cnn")
        assert metadata["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}
        images = np.random.default_rng(5).integers(0, 256, size=(3, 9, 11, 3), dtype=np.uint8)
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        got = client.infer("tiny-cnn", [tensor]).as_numpy("logits")
        expected = session.run(None, {"pixels": ImagePreprocessor(SPEC)(images)})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
