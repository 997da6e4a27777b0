"""Every cell x {uni, bi} x {1, 2 layers}: export parity, quantized nodes, a manifest the service loads.

CI-sized: tiny random networks (parity and structure do not need training).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from export.config import ModelSpec
from export.nets import TaskNet
from export.onnx_export import Graph, cpu_session, export_net, parity, parity_excess, stream
from export.quantize import op_counts, quantized_nodes, rounded_beyond_products, saturation_free, to_int8
from export.tasks import Glucose
from service.models import ModelRegistry
from service.repository import Manifest, Preprocessing, Provenance, read_manifest, write_version
from service.settings import RuntimeSettings

FEATURES, OUTPUTS, HIDDEN = 5, 3, 16
CASES = [
    (cell, bidirectional, layers, False)
    for cell in ("rnn", "gru", "lstm")
    for bidirectional in (False, True)
    for layers in (1, 2)
] + [(cell, False, 2, True) for cell in ("rnn", "gru", "lstm")]  # layer-normalised cells


def case_id(case: tuple[str, bool, int, bool]) -> str:
    cell, bidirectional, layers, layer_norm = case
    return f"{cell}-{'bi' if bidirectional else 'uni'}-{layers}{'-ln' if layer_norm else ''}"


def tiny(cell: str, bidirectional: bool, layers: int, layer_norm: bool) -> TaskNet:
    torch.manual_seed(layers * 10 + bidirectional)
    spec = ModelSpec(
        task="vowels" if bidirectional else "glucose",
        cell=cell,
        layers=layers,
        hidden_size=HIDDEN,
        bidirectional=bidirectional,
        layer_norm=layer_norm,
    )
    net = TaskNet(spec, FEATURES, OUTPUTS, mean=torch.full((FEATURES,), 0.1), std=torch.full((FEATURES,), 2.0))
    with torch.no_grad():  # biases away from zero, so a wrong gate order shows
        for name, param in net.named_parameters():
            if "bias" in name or name.startswith("recurrent.cells") and name.endswith(("b_ih", "b_hh")):
                param.uniform_(-0.5, 0.5)
    return net.eval()


def expected_quantized(cell: str, bidirectional: bool, layers: int, layer_norm: bool) -> int:
    """The products static int8 quantizes: those over at least 16 inputs (not W x over 5 raw features)."""
    if bidirectional:  # the ONNX recurrent ops stay fp32: only the read-out is quantized
        return 1
    return layers + (layers - 1) + 1  # U h of every layer, W x of the upper layers, and the read-out


def calibration(graph: Graph, calls: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    steps = 1 if graph.state else 7
    feeds = []
    for _ in range(calls):
        feed = {"x": rng.standard_normal((4, steps, FEATURES)).astype(np.float32)}
        feed |= {s.input: rng.uniform(-1, 1, (4, *s.shape[1:])).astype(np.float32) for s in graph.state}
        feeds.append(feed)
    return feeds


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_export_parity_and_quantized_nodes(case):
    net = tiny(*case)
    graph = export_net(net, ["y"])
    x = np.random.default_rng(0).standard_normal((1, 300 if not case[1] else 40, FEATURES)).astype(np.float32)
    checks = parity(net, graph, x)
    worst = max(v for k, v in checks.items() if k.startswith("parity_") and "vs" in k)
    assert worst <= 1e-5, checks
    assert checks["parity_tensors"] == len(graph.outputs) + len(graph.state)
    # int8 is made from explicit cells (a plain LSTM's ONNX LSTM op cannot be quantized statically)
    source = export_net(net, ["y"], explicit=True)
    assert source.step_only != case[1] and parity_excess(parity(net, source, x[:, :50])) <= 1e-5
    int8 = to_int8(source.onnx, calibration(source))
    assert quantized_nodes(int8) == expected_quantized(*case), op_counts(int8)
    assert saturation_free(int8)[0] and quantized_nodes(graph.onnx) == 0
    assert op_counts(int8)["DynamicQuantizeLSTM"] == 0
    # only products read the 8-bit grid: a GRU's blend and every stored state get the fp32 tensor
    assert rounded_beyond_products(int8) == []


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_manifest_is_valid_and_the_service_runs_the_graph(case, tmp_path):
    cell, bidirectional, layers, layer_norm = case
    net = tiny(*case)
    graph = export_net(net, ["y"])
    manifest = Manifest(
        name="tiny",
        version=1,
        task="classification" if bidirectional else "forecast",
        cell=cell,
        layers=layers,
        hidden_size=HIDDEN,
        bidirectional=bidirectional,
        streamable=not bidirectional,
        inputs=graph.inputs,
        outputs=graph.outputs,
        state=graph.state,
        preprocessing=Preprocessing(kind="none"),
        validation={},
        fingerprint=hashlib.sha256(graph.onnx).hexdigest(),
        provenance=Provenance(dataset="random", training={}, versions={}, created="test"),
    )
    write_version(tmp_path, manifest, graph.onnx)
    assert read_manifest(tmp_path / "tiny" / "1") == manifest
    model = ModelRegistry.from_repository(tmp_path, RuntimeSettings()).get("tiny")
    x = np.random.default_rng(1).standard_normal((2, 6, FEATURES)).astype(np.float32)
    states = {name: np.zeros((2, *value.shape), np.float32) for name, value in model.zero_states().items()}
    outputs, new_states = model.runtime.run(x, states)  # T = 6 in one call, even for one-step graphs
    if bidirectional:
        with torch.no_grad():
            expected = net.classify(torch.from_numpy(x), torch.tensor([6, 6])).numpy()
        np.testing.assert_allclose(outputs["y"], expected, atol=1e-5, rtol=0)
        return
    reference, reference_states = stream(cpu_session(graph.onnx), graph, x, chunk=1)
    np.testing.assert_allclose(outputs["y"], reference["y"], atol=1e-6, rtol=0)
    for name, value in new_states.items():
        np.testing.assert_allclose(value, reference_states[name], atol=1e-6, rtol=0)
    assert manifest.input.shape[1] == (-1 if cell == "lstm" and not layer_norm else 1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_streamed_state_does_not_drift_over_10000_steps(cell):
    """The long-range check: ONNX one step per call for 10,000 steps against torch on the whole sequence."""
    net = tiny(cell, False, 2, False)
    graph = export_net(net, ["y"])
    x = np.random.default_rng(2).standard_normal((1, 10_000, FEATURES)).astype(np.float32)
    assert parity(net, graph, x)["parity_streamed_vs_torch"] <= 1e-5


def test_forecaster_graph_scores_anomalies_against_the_previous_forecast():
    torch.manual_seed(5)
    net = TaskNet(ModelSpec(task="glucose", cell="gru", layers=1, hidden_size=HIDDEN), FEATURES, 1, output_shift=3.0)
    net.eval()
    graph = export_net(net, ["forecast", "anomaly"], anomaly_sigma=2.0)
    assert [s.input for s in graph.state][-1] == "last_forecast"
    x = np.abs(np.random.default_rng(3).standard_normal((1, 20, FEATURES))).astype(np.float32) + 1
    session = cpu_session(graph.onnx)
    out, _ = stream(session, graph, x)
    forecast, anomaly = out["forecast"][0, :, 0], out["anomaly"][0, :, 0]
    assert anomaly[0] == 0  # nothing forecast before the first reading
    previous = forecast[:-1]
    expected = np.abs(x[0, 1:, 0] - previous) / 2.0 * (previous > 0)
    np.testing.assert_allclose(anomaly[1:], expected, rtol=1e-5, atol=1e-6)
    # The last forecast is state: a session resumed elsewhere scores its next reading the same way.
    first, states = stream(session, graph, x[:, :10])
    second, _ = stream(session, graph, x[:, 10:], states=states)
    np.testing.assert_allclose(second["anomaly"][0, 0, 0], anomaly[10], rtol=1e-6)
    np.testing.assert_allclose(first["forecast"][0, :, 0], forecast[:10], rtol=1e-6)


def test_parity_compares_every_output_and_state_over_every_sequence():
    """A forecaster's anomaly score and last-forecast state are compared too, over several sessions: a graph
    whose anomaly divides by another sigma, or whose state runs away, fails though its forecast matches."""
    torch.manual_seed(6)
    net = TaskNet(ModelSpec(task="glucose", cell="lstm", layers=2, hidden_size=HIDDEN), FEATURES, 1, output_shift=3.0)
    net.eval()
    graph = export_net(net, ["forecast", "anomaly"], anomaly_sigma=2.0)
    rng = np.random.default_rng(7)
    sessions = [np.abs(rng.standard_normal((1, n, FEATURES))).astype(np.float32) + 1 for n in (30, 1, 200)]
    checks = parity(net, graph, sessions)
    assert checks["parity_streamed_vs_torch"] <= 1e-5, checks
    assert (checks["parity_steps"], checks["parity_sequences"], checks["parity_tensors"]) == (231, 3, 7)
    other_sigma = dataclasses.replace(graph, onnx=export_net(net, ["forecast", "anomaly"], anomaly_sigma=2.2).onnx)
    assert parity(net, other_sigma, sessions)["parity_streamed_vs_torch"] > 1e-3


def test_a_glucose_session_s_first_gap_reads_as_the_usual_gap():
    """Clients send 0 minutes for a session's first reading; the network reads the usual gap, not an outlier."""
    task = Glucose()
    net = task.build_net(ModelSpec(task="glucose", cell="gru", layers=1, hidden_size=HIDDEN)).eval()
    assert 4.0 <= task.series.typical_gap <= 6.0
    first = np.array([[[120.0, 0.0]]], np.float32)
    usual = np.array([[[120.0, task.series.typical_gap]]], np.float32)
    with torch.no_grad():
        assert torch.equal(net(torch.from_numpy(first))[0], net(torch.from_numpy(usual))[0])
        assert not torch.equal(net(torch.from_numpy(first))[0], net(torch.from_numpy(usual * np.float32([1, 3])))[0])
    normalised = (np.concatenate(task.series.train)[:, 1] - task.series.mean[1]) / task.series.std[1]
    assert normalised.min() < -3  # the raw zeros, which the network never sees as such
    graph = export_net(net, task.outputs, 2.0)
    served_first, served_usual = (stream(cpu_session(graph.onnx), graph, x)[0]["forecast"] for x in (first, usual))
    assert np.array_equal(served_first, served_usual)
