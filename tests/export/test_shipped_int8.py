"""Every shipped version computed on this CPU: a session's answers are its own, bit for bit, alone or among
63 batch-mates far larger than it, over 50 streamed steps, and a chunk equals its steps. And every int8
graph, read as a graph (not run on whatever CPU the test lands on): static quantization, no per-call
scale, weights of 7 bits, so no x86-64 CPU's integer kernels saturate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.quantize import rounded_beyond_products
from service.repository import MODEL_FILE, Manifest, read_manifest, version_dirs
from tests.conftest import ROOT, SHIPPED_REPO

CPU_VERSIONS = [
    pytest.param(directory, id=f"{name}-{version}")
    for name, version, directory in version_dirs(SHIPPED_REPO)
    if read_manifest(directory, verify=False).precision in ("fp32", "int8")
]
INT8_VERSIONS = [p for p in CPU_VERSIONS if read_manifest(p.values[0], verify=False).precision == "int8"]
PER_CALL_OPS = {"DynamicQuantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulInteger"}


def test_every_shipped_model_has_an_int8_version_or_its_report_says_why_not():
    models = {name for name, _, _ in version_dirs(SHIPPED_REPO)}
    with_int8 = {p.values[0].parent.name for p in INT8_VERSIONS}
    assert len(with_int8) >= 5
    for name in models - with_int8:
        report = json.loads((ROOT / "docs" / "models" / f"{name}.json").read_text())
        (int8,) = [v for v in report["variants"] if v["precision"] == "int8"]
        assert not int8["published"] and int8["verdict"].startswith("failed: "), int8


def inputs(manifest: Manifest, steps: int) -> np.ndarray:
    """x [64, steps, F]: a session in row 0, batch-mates up to 100 times its size in the others."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, steps, manifest.features)).astype(np.float32)
    x[1:] *= rng.uniform(1.0, 100.0, (63, 1, 1)).astype(np.float32)
    return x


def streamed(session: ort.InferenceSession, manifest: Manifest, x: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Every output over time, then every final state, `chunk` steps per call, from zero state."""
    states = {s.input: np.zeros((len(x), *s.shape[1:]), np.float32) for s in manifest.state}
    fetch = [o.name for o in manifest.outputs] + [s.output for s in manifest.state]
    outputs: list[list[np.ndarray]] = [[] for _ in manifest.outputs]
    for start in range(0, x.shape[1], chunk):
        values = session.run(fetch, {manifest.input.name: x[:, start : start + chunk], **states})
        for seen, value in zip(outputs, values, strict=False):
            seen.append(value)
        states = dict(zip((s.input for s in manifest.state), values[len(manifest.outputs) :], strict=True))
    return [np.concatenate(seen, axis=1) for seen in outputs] + list(states.values())


@pytest.mark.parametrize("directory", CPU_VERSIONS)
def test_a_session_is_answered_alone_as_among_batch_mates(directory: Path):
    manifest = read_manifest(directory)
    session = ort.InferenceSession(str(directory / MODEL_FILE), providers=["CPUExecutionProvider"])
    if not manifest.streamable:
        x = inputs(manifest, 20)
        alone, together = session.run(None, {manifest.input.name: x[:1]}), session.run(None, {manifest.input.name: x})
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(alone, together, strict=True))
        return
    x = inputs(manifest, 50)
    alone = streamed(session, manifest, x[:1], chunk=1)
    together = streamed(session, manifest, x, chunk=1)
    assert alone[0].shape[1] == 50
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b[:1]), float(np.abs(a - b[:1]).max())
    if manifest.input.shape[1] != 1:  # a graph that takes chunks: 8 steps (2 at the end) per call equal its steps
        chunked = streamed(session, manifest, x[:1], chunk=8)
        assert all(np.array_equal(a, b) for a, b in zip(alone, chunked, strict=True))


@pytest.mark.parametrize("directory", INT8_VERSIONS)
def test_int8_is_static_with_seven_bit_weights_and_says_how_it_was_made(directory: Path):
    manifest = read_manifest(directory)
    graph = onnx.load(str(directory / MODEL_FILE)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & PER_CALL_OPS, ops & PER_CALL_OPS
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & dequantized]
    assert len(products) >= (2 if manifest.streamable else 1)  # a whole-sequence graph: its read-out
    weights = [
        numpy_helper.to_array(t).astype(np.int32)
        for t in graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 2
    ]
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64  # 255 * 64 * 2 < 2**15
    # only products read the 8-bit grid: stored states and a GRU's blend are fp32
    assert rounded_beyond_products((directory / MODEL_FILE).read_bytes()) == []
    quantization = manifest.provenance.quantization
    assert quantization is not None and quantization["format"] == "QDQ (static)"
    assert "training split" in quantization["calibration_data"]
    fp32 = [read_manifest(d) for n, _, d in version_dirs(SHIPPED_REPO) if n == manifest.name]
    assert manifest.lineage in {m.fingerprint for m in fp32 if m.precision == "fp32"}


def steady_forecast(directory: Path, level: float, steps: int = 60) -> float:
    """The forecast after `steps` readings of `level` mg/dL, 5 minutes apart."""
    manifest = read_manifest(directory)
    session = ort.InferenceSession(str(directory / MODEL_FILE), providers=["CPUExecutionProvider"])
    states = {s.input: np.zeros((1, *s.shape[1:]), np.float32) for s in manifest.state}
    fetch = ["forecast"] + [s.output for s in manifest.state]
    for t in range(steps):
        x = np.array([[[level, 0.0 if t == 0 else 5.0]]], np.float32)
        forecast, *new_states = session.run(fetch, {manifest.input.name: x, **states})
        states = dict(zip((s.input for s in manifest.state), new_states, strict=True))
    return float(forecast.ravel()[0])


@pytest.mark.parametrize("directory", [p for p in INT8_VERSIONS if p.values[0].parent.name.startswith("glucose")])
def test_an_int8_forecast_is_not_clamped_to_its_calibrated_range(directory: Path):
    """The sensor reads 40-400 mg/dL; calibration rarely meets either end. A read-out on the 8-bit grid
    stopped glucose-lstm's forecasts at 44.4 and 380.3 mg/dL (1.3 mg/dL steps): the int8 forecast must
    follow its fp32 lineage at both ends."""
    manifest = read_manifest(directory)
    (fp32,) = [d for _, _, d in version_dirs(SHIPPED_REPO) if read_manifest(d).fingerprint == manifest.lineage]
    for level in (40.0, 400.0):
        assert abs(steady_forecast(directory, level) - steady_forecast(fp32, level)) < 1.5, level
