"""edgekit.fake_quant against ONNX Runtime itself: the emulated int8 model computes what quantize_dynamic's model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.tiny_bert import MAX_LENGTH, minilm_tokenizer_file, tiny_hf_folder

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory) -> dict:
    """A tiny BERT folder, its fused float ONNX model and that model's dynamic int8 quantization, as the build makes them."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from edgekit.config import BuildConfig
    from edgekit.tasks.text_classification import TASK, load_task_data

    root = tmp_path_factory.mktemp("fake-quant")
    folder = tiny_hf_folder(root / "hf")
    TASK.export_onnx(folder, root / "fp32.onnx", 17, lambda _line: None)
    optimize_model(str(root / "fp32.onnx"), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(str(root / "fused.onnx"))
    quantize_dynamic(root / "fused.onnx", root / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"WeightSymmetric": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    data = load_task_data(BuildConfig().data)
    spec = TASK.spec(data.labels, MAX_LENGTH, minilm_tokenizer_file())
    return {"folder": folder, "root": root, "spec": spec, "texts": data.val.texts[:40]}


def _run(path: Path, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _vnni() -> bool:
    """Whether this CPU has VNNI: without it ONNX Runtime's u8s8 int8 kernels (AVX2, AVX-512 without VNNI) add pairs of
    products in saturating 16-bit lanes (vpmaddubsw), which ONNX Runtime's quantization docs warn about and the exact
    integer arithmetic edgekit.fake_quant emulates does not model."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: assume the exact kernels and let the comparison decide
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8")) or "avx2" not in flags.split()


@pytest.mark.skipif(not _vnni(), reason="this x86 CPU has no VNNI: ONNX Runtime's int8 kernels saturate 16-bit sums here "
                    "(vpmaddubsw), which the exact emulation does not model")
def test_the_fake_quantized_model_computes_what_onnx_runtime_int8_computes(tiny_int8) -> None:
    from edgekit.fake_quant import dynamic_int8
    from edgekit.tasks.text_classification import TASK

    model = TASK.load_torch(tiny_int8["folder"])
    emulation_gap, quantization_gap = [], []
    for text in tiny_int8["texts"]:  # batch 1: ONNX Runtime's per-tensor ranges are then per example, as emulated
        feeds = TASK.feeds(tiny_int8["spec"], [text])
        inputs = {name: torch.from_numpy(value) for name, value in feeds.items()}
        with torch.no_grad(), dynamic_int8(model):
            emulated = model(**inputs).logits.numpy()
        int8, fp32 = _run(tiny_int8["root"] / "int8.onnx", feeds), _run(tiny_int8["root"] / "fp32.onnx", feeds)
        emulation_gap.append(np.abs(emulated - int8).max())
        quantization_gap.append(np.abs(fp32 - int8).max())
    # Stated tolerance: 1e-4 absolute on logits of magnitude ~1-10 (float32 summation order differs, nothing else).
    assert max(emulation_gap) < 1e-4, max(emulation_gap)
    # ... while quantization itself moves them by orders of magnitude more, so an emulation that missed any step would fail.
    assert np.median(quantization_gap) > 100 * max(emulation_gap)


def test_fake_quantization_leaves_the_float_weights_and_trains_them(tiny_int8) -> None:
    from edgekit.fake_quant import dynamic_int8
    from edgekit.tasks.text_classification import TASK

    model = TASK.load_torch(tiny_int8["folder"])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    feeds = {name: torch.from_numpy(value) for name, value in TASK.feeds(tiny_int8["spec"], tiny_int8["texts"][:8]).items()}
    with dynamic_int8(model):
        model(**feeds).logits.sum().backward()  # gradients reach the float weights through the rounding
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())
    gradients = [parameter.grad for parameter in model.parameters()]
    assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in gradients[:4])


def test_per_channel_weights_match_onnx_runtimes_integers(tiny_int8) -> None:
    """The first fused QKV weight: ONNX Runtime's int8 values times their scales are the emulated weight, exactly."""
    import onnx
    from onnx import numpy_helper

    from edgekit.fake_quant import per_channel_int8
    from edgekit.tasks.text_classification import TASK

    model = TASK.load_torch(tiny_int8["folder"])
    attention = model.bert.encoder.layer[0].attention.self
    fused = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])  # [3 * hidden, hidden]
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(tiny_int8["root"] / "int8.onnx").graph.initializer}
    integers, scales = initializers["Attention_0_qkv_weight_quantized"], initializers["Attention_0_qkv_weight_scale"]
    dequantized = integers.astype(np.float32) * scales  # [hidden, 3 * hidden]: one scale per output column
    np.testing.assert_allclose(per_channel_int8(fused).detach().numpy().T, dequantized, rtol=0, atol=1e-7)


def test_rows_padded_into_a_batch_are_emulated_as_each_runs_alone(tiny_int8) -> None:
    """QAT trains on padded batches; ONNX Runtime's int8 model is scored a row per run: the ranges must ignore padding."""
    from edgekit.fake_quant import dynamic_int8
    from edgekit.tasks.text_classification import TASK

    model = TASK.load_torch(tiny_int8["folder"])
    texts = tiny_int8["texts"][:12]
    batch = {name: torch.from_numpy(value) for name, value in TASK.feeds(tiny_int8["spec"], texts).items()}
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    with torch.no_grad(), dynamic_int8(model):
        batched = model(**batch).logits.numpy()
        alone = np.concatenate([model(**{name: torch.from_numpy(value) for name, value in TASK.feeds(tiny_int8["spec"], [text]).items()}).logits.numpy()
                                for text in texts])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-4)
