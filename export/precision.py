"""Precision variants of an exported graph.

fp16: weights and activations in half precision for GPUs, with fp32 inputs and outputs at the edge
(`keep_io_types`), so clients and the state store see the same tensors as for fp32. Deterministic: the
same fp32 bytes give the same fp16 bytes. ONNX Runtime's CPU provider has no fp16 recurrent kernels; the
service refuses to load an fp16 variant without the CUDA provider.
"""

from __future__ import annotations

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16


def to_fp16(model_bytes: bytes) -> bytes:
    model = onnx.load_from_string(model_bytes)
    converted = convert_float_to_float16(model, keep_io_types=True)
    return bytes(converted.SerializeToString())
