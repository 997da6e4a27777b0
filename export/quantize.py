"""Precision variants of an exported fp32 graph.

- int8: ONNX Runtime dynamic quantization (weights int8, activations quantized per call). It turns the
  ONNX LSTM op into DynamicQuantizeLSTM and MatMuls into MatMulInteger / DynamicQuantizeMatMul; it
  leaves the ONNX GRU and RNN ops in fp32, which is why those cells export as explicit MatMuls.
- fp16: weights and activations in half precision for GPUs, with fp32 inputs and outputs at the edge
  (`keep_io_types`), so clients and the state store see the same tensors as for fp32. ONNX Runtime's CPU
  provider has no fp16 recurrent kernels: fp16 variants run, and are validated, only under CUDA.

Both are deterministic: the same fp32 bytes give the same variant bytes.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

PRECISIONS = ("fp32", "int8", "fp16")
QUANTIZED_OPS = frozenset({"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"})


def to_int8(model_bytes: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model_bytes)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic logs advice at WARNING on the root logger
        try:
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().setLevel(quiet)
        return target.read_bytes()


def to_fp16(model_bytes: bytes) -> bytes:
    model = onnx.load_from_string(model_bytes)
    return bytes(convert_float_to_float16(model, keep_io_types=True).SerializeToString())


def variant(model_bytes: bytes, precision: str) -> bytes:
    if precision == "fp32":
        return model_bytes
    if precision == "int8":
        return to_int8(model_bytes)
    if precision == "fp16":
        return to_fp16(model_bytes)
    raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def op_counts(model_bytes: bytes) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load_from_string(model_bytes).graph.node)


def quantized_nodes(model_bytes: bytes) -> int:
    counts = op_counts(model_bytes)
    return sum(counts[op] for op in QUANTIZED_OPS)
