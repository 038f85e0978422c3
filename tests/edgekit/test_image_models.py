"""Image models the build advertises, built from their configs: a forward pass, ONNX export, and ONNX Runtime parity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest

from edgekit.tasks import image_models

IMAGE_SIZE = (32, 32)
CLASSES = 3
CHANNELS = 3
BATCH = 8
STEPS = 10


@pytest.fixture
def one_torch_thread():
    """Two cores shared with other processes: torch's spinning OpenMP threads slow everything down."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(model, pixels, labels, steps: int) -> list[float]:
    """A few AdamW steps on one batch in the build's training loop. Fresh from its config the model's eval-mode logits
    are ~1e-26 (small random init, BatchNorm running statistics still at their defaults), so parity on it would compare
    zeros with zeros. Returns the loss of each step."""
    from rich.progress import Progress

    from edgekit import training
    from tests.support.train import FixedBatches

    result = training.fit(model, FixedBatches([training.Batch({"pixel_values": pixels}, labels)]),
                          training.cross_entropy(lambda m, inputs: m(inputs["pixel_values"])),
                          training.FitSettings(steps, 1e-3), progress=Progress(disable=True))
    return result.losses


def test_mobilenet_v2_from_its_config_trains_exports_and_matches_onnx_runtime(tmp_path, one_torch_thread):
    import torch

    assert "config:mobilenet_v2" in image_models.KNOWN_SOURCES
    record = image_models.record_for("config:mobilenet_v2", CHANNELS, CLASSES, None, IMAGE_SIZE)
    assert record.family == "hf" and record.image_size == list(IMAGE_SIZE)
    torch.manual_seed(0)
    model = image_models.build(record)
    assert model.inner.config.model_type == "mobilenet_v2"

    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, CHANNELS, *IMAGE_SIZE, generator=generator)
    labels = torch.arange(BATCH) % CLASSES
    losses = _fit(model, pixels, labels, STEPS)
    assert min(losses[-3:]) < losses[0], f"the model learns: {losses}"

    model.eval()
    with torch.no_grad():
        expected = model(pixels).numpy()
    assert expected.shape == (BATCH, CLASSES) and np.isfinite(expected).all()
    assert np.abs(expected).mean() > 0.1, "logits of a working model, not the untrained ~0"

    path = tmp_path / "model.onnx"
    image_models.export_onnx(model, record, "pixel_values", path, 17)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["pixel_values"]
    assert [o.name for o in graph.graph.output] == ["logits"]

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"pixel_values": pixels.numpy()})  # a batch of 8 through the symbolic batch axis
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    (single,) = session.run(["logits"], {"pixel_values": pixels[:1].numpy()})
    np.testing.assert_allclose(single, expected[:1], rtol=1e-4, atol=1e-4)
