"""fp16 variants: reproducible, fp32 at the edge, half precision inside."""

from __future__ import annotations

import onnx

from export.quantize import to_fp16
from tests.conftest import TEST_REPO

FP32 = (TEST_REPO / "charlm" / "1" / "model.onnx").read_bytes()


def test_fp16_variant_is_reproducible_and_keeps_fp32_at_the_edge():
    half = to_fp16(FP32)
    assert half == to_fp16(FP32)
    model = onnx.load_from_string(half)
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert {t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]} == {float32}
    weights = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
    assert weights == {float16}
    lstm_inputs = {i for n in model.graph.node if n.op_type == "LSTM" for i in n.input}
    assert lstm_inputs and all(t.data_type == float16 for t in model.graph.initializer if t.name in lstm_inputs)
    assert len(half) < 0.6 * len(FP32)
