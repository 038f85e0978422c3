"""The package pass records which values each integer input may hold, read from the table the input indexes."""

from __future__ import annotations

import onnx
import pytest

from edgekit.passes.package import index_ranges
from tests.support.tiny_bert import VOCAB_SIZE, _tiny_classifier, export_hf_classifier

TYPE_VOCABULARY = 2  # BERT's token type table


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_hf_classifier(_tiny_classifier(3, 32, 2).eval(), tmp_path_factory.mktemp("ranges") / "model.onnx")


def test_gathers_of_the_exported_model_bound_token_and_type_ids(exported):
    ranges = index_ranges(onnx.load(str(exported)).graph)
    assert ranges == {"input_ids": (0, VOCAB_SIZE - 1), "token_type_ids": (0, TYPE_VOCABULARY - 1)}


def test_the_fused_embedding_layer_bounds_them_too(exported, tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(exported), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    assert any(node.op_type == "EmbedLayerNormalization" for node in optimized.model.graph.node), "no fusion: the test needs one"
    ranges = index_ranges(optimized.model.graph)
    assert ranges["input_ids"] == (0, VOCAB_SIZE - 1) and ranges["token_type_ids"] == (0, TYPE_VOCABULARY - 1)


def test_a_quantized_table_is_read_through_its_dequantize(exported, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(str(exported), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather", "MatMul"])
    graph = onnx.load(str(quantized)).graph
    assert any(node.op_type == "DequantizeLinear" for node in graph.node), "no quantized table: the test needs one"
    assert index_ranges(graph)["input_ids"] == (0, VOCAB_SIZE - 1)
