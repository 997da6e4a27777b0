"""Precision variants of an exported fp32 graph.

- int8: static quantization of the matrix products (MatMul, Gemm), in ONNX's QDQ format. Activation
  ranges are calibrated once, from the training split streamed through the fp32 graph with its real
  states, and fixed in the graph; every row of a batch is quantized with those constants alone, and the
  products sum in exact integer arithmetic. A session's answer is therefore a function of its own
  inputs: the same alone and among any batch-mates, on every replica of one CPU kind (across CPU kinds the
  integers agree; the fp32 parts may differ in their last bits, as fp32 graphs' do). Weights are symmetric, per output
  channel, and 7-bit (|w| <= 64): an unsigned 8-bit activation times such a weight, summed in pairs,
  stays below 2**15, so the 16-bit intermediate sums of AVX2 kernels without VNNI cannot saturate and
  every x86-64 CPU computes the same integers. Element-wise maths (gates, norms) stays in fp32: it does
  not pay to quantize it; nor do products over a handful of raw features (see NARROW). Recurrent cells
  must be explicit matrix products: ONNX Runtime cannot quantize the ONNX LSTM / GRU / RNN ops
  statically (its only int8 LSTM, DynamicQuantizeLSTM, takes its scale from each call), so a streaming
  int8 graph is the explicit step graph, one step per call. Only products read the 8-bit grid: the
  quantizer routes every reader of a quantized tensor, and a graph output made of one, through its
  DequantizeLinear, so after it runs the element-wise readers (a GRU's blend of its old state) and the
  graph outputs (the states a session stores) are given the fp32 tensor back (`_fp32_off_products`); the
  read-out (Gemm) answers in float, so outputs keep their full range rather than the calibrated one.
- fp16: weights and activations in half precision for GPUs, with fp32 inputs and outputs at the edge
  (`keep_io_types`), so clients and the state store see the same tensors as for fp32. ONNX Runtime's CPU
  provider has no fp16 recurrent kernels: fp16 variants run, and are validated, only under CUDA.

Both are deterministic: the same fp32 bytes (and calibration feeds) give the same variant bytes.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

PRECISIONS = ("fp32", "int8", "fp16")
# Built and measured for comparison, never published: the gate refuses per-call quantization.
COMPARISONS = ("int8-dynamic",)
# Quantized, ONNX Runtime's integer kernels run them; per call (dynamic) ops make a batch share a scale.
DYNAMIC_OPS = frozenset({"DynamicQuantizeLSTM", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"})
PRODUCTS = frozenset({"MatMul", "Gemm"})
NARROW = 16  # a product over fewer inputs than this stays fp32: little to gain, and one per-tensor scale
# over a few raw features (a glucose reading, a time gap) would blur the finer of them
WEIGHT_LIMIT = 64  # |int8 weight|: 255 * 64 * 2 < 2**15, so a pair of u8 x s8 products cannot saturate
INT8_SCHEME = {
    "format": "QDQ (static)",
    "quantized_ops": f"MatMul, Gemm over {NARROW} or more inputs",
    "weights": f"int8 symmetric per output channel, 7-bit (|w| <= {WEIGHT_LIMIT})",
    "activations": "uint8 per tensor, ranges fixed at export",
    "calibration_method": "MinMax",
}

Feeds = dict[str, np.ndarray]


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._feeds: Iterator[Feeds] = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


def _quantized(model_bytes: bytes, quantize: Callable[[Path, Path], None]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model_bytes)
        with _quiet_root_logger():  # the quantizer logs advice at WARNING on the root logger
            quantize(source, target)
        return target.read_bytes()


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger().setLevel(level)


def narrow_products(model_bytes: bytes) -> list[str]:
    """The MatMul / Gemm nodes whose constant weight sums over fewer than NARROW inputs."""
    graph = onnx.load_from_string(model_bytes).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    narrow = []
    for node in graph.node:
        if node.op_type not in PRODUCTS or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        weight = shapes[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        inputs = weight[-1] if trans_b else weight[0]
        if inputs < NARROW:
            narrow.append(node.name)
    return narrow


def to_int8(model_bytes: bytes, calibration: Sequence[Feeds]) -> bytes:
    """Static int8 of `model_bytes` (see the module docstring); `calibration`: the graph's feeds, one per call."""
    if not calibration:
        raise ValueError("static int8 needs calibration feeds: none were given")

    def quantize(source: Path, target: Path) -> None:
        quantize_static(
            source,
            target,
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=sorted(PRODUCTS),
            nodes_to_exclude=narrow_products(model_bytes),
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # A read-out (Gemm) answers in float: its integer kernel (QGemm) takes a float output, so a
            # forecast or logit keeps its full range instead of the calibrated one (a clamp). MatMul
            # outputs stay requantized: ONNX Runtime fuses DQ-MatMul-Q into QLinearMatMul, and without
            # the Q it multiplies dequantized floats, whose sums depend on the batch (measured).
            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["Gemm"]},
        )

    return _fp32_off_products(_quantized(model_bytes, quantize))


def _fp32_off_products(model_bytes: bytes) -> bytes:
    """The QDQ graph with its 8-bit grid seen by products alone: every other reader of a dequantized
    activation reads the fp32 tensor it was quantized from, and a graph output that the quantizer made a
    DequantizeLinear output is the fp32 tensor again (under its own name; the products read the rounded
    copy under a new one)."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    kernels = {n.output[0] for n in _quantized_products(graph)}
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in weights:
            continue
        source = producers.get(q.input[0])
        if source is not None and source.output[0] in kernels:
            continue  # a quantized product's own output: its integer kernel answers on that grid (QLinearMatMul)
        exact, rounded = q.input[0], dq.output[0]
        if rounded in outputs:  # swap names: the graph output becomes the fp32 tensor
            renamed = f"{rounded}_rounded"
            for node in graph.node:
                node.input[:] = [renamed if i == rounded else rounded if i == exact else i for i in node.input]
                node.output[:] = [renamed if o == rounded else rounded if o == exact else o for o in node.output]
            exact, rounded = rounded, renamed
        for node in graph.node:
            if node.op_type not in PRODUCTS:
                node.input[:] = [exact if i == rounded else i for i in node.input]
    onnx.checker.check_model(model)
    return model.SerializeToString()


def to_int8_dynamic(model_bytes: bytes) -> bytes:
    """ONNX Runtime's dynamic quantization, for comparison: activation scales taken per call, 8-bit weights."""
    return _quantized(model_bytes, lambda source, target: quantize_dynamic(source, target, weight_type=QuantType.QInt8))


def to_fp16(model_bytes: bytes) -> bytes:
    model = onnx.load_from_string(model_bytes)
    return bytes(convert_float_to_float16(model, keep_io_types=True).SerializeToString())


def variant(model_bytes: bytes, precision: str, calibration: Sequence[Feeds] = ()) -> bytes:
    if precision == "fp32":
        return model_bytes
    if precision == "int8":
        return to_int8(model_bytes, calibration)
    if precision == "fp16":
        return to_fp16(model_bytes)
    if precision == "int8-dynamic":
        return to_int8_dynamic(model_bytes)
    raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS + COMPARISONS)}")


def op_counts(model_bytes: bytes) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load_from_string(model_bytes).graph.node)


def quantized_nodes(model_bytes: bytes) -> int:
    """Matrix products fed by a dequantized weight (static int8), plus per-call quantized ops (dynamic)."""
    graph = onnx.load_from_string(model_bytes).graph
    static = len(_quantized_products(graph))
    dynamic = sum(1 for n in graph.node if n.op_type in DYNAMIC_OPS - {"DynamicQuantizeLinear"})
    dynamic += sum(1 for n in graph.node if n.op_type == "MatMulInteger")
    return static + dynamic


def _quantized_products(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The MatMul / Gemm nodes whose weight comes dequantized (int8), not those left in fp32 (narrow)."""
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return [n for n in graph.node if n.op_type in PRODUCTS and any(i in dequantized for i in n.input[1:])]


def rounded_beyond_products(model_bytes: bytes) -> list[str]:
    """Where the 8-bit grid reaches beyond the quantized MatMul products: a reader other than a product (or
    a graph output) of a dequantized activation, except a quantized MatMul's own output, and any requantized
    read-out (Gemm) output. Empty for every int8 graph `to_int8` makes."""
    graph = onnx.load_from_string(model_bytes).graph
    weights = {t.name for t in graph.initializer}
    kernels = {n.output[0] for n in _quantized_products(graph) if n.op_type == "MatMul"}
    readouts = {o for n in graph.node if n.op_type == "Gemm" for o in n.output}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights]
    found = [f"requantized read-out {n.input[0]}" for n in quantize if n.input[0] in readouts]
    quantized = {n.output[0] for n in quantize if n.input[0] not in kernels}
    rounded = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized}
    found += [f"{n.op_type} {n.name}" for n in graph.node if n.op_type not in PRODUCTS and rounded & set(n.input)]
    return found + [f"graph output {o.name}" for o in graph.output if o.name in rounded]


def int8_weight_bound(model_bytes: bytes) -> int:
    """The largest |value| among the graph's int8 and uint8 initialisers of two or more dimensions (weights)."""
    bound = 0
    for tensor in onnx.load_from_string(model_bytes).graph.initializer:
        if tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(tensor.dims) >= 2:
            values = numpy_helper.to_array(tensor).astype(np.int32)
            bound = max(bound, int(np.abs(values).max(initial=0)))
    return bound


def saturation_free(model_bytes: bytes) -> tuple[bool, str]:
    """Whether every x86-64 CPU computes the same integers for this graph, and why not if not."""
    counts = op_counts(model_bytes)
    dynamic = sorted(op for op in DYNAMIC_OPS if counts[op])
    if dynamic:
        return False, f"per-call quantization ({', '.join(dynamic)}): a batch shares one scale"
    bound = int8_weight_bound(model_bytes)
    if bound > WEIGHT_LIMIT:
        return False, f"int8 weights reach {bound}, above {WEIGHT_LIMIT}: AVX2 kernels without VNNI saturate"
    return True, f"static, weights within {bound} <= {WEIGHT_LIMIT}"
