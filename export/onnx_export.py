"""Export trained networks to ONNX graphs the service runs, and check them against torch.

Streamable models become step graphs: x [B, T, F] and one [B, H] tensor per state in; outputs
[B, T, ...] and the new states out. A plain LSTM exports as the ONNX LSTM op with a dynamic time axis
(a chunk of steps in one call). Every other streamable stack (GRU, RNN, layer-normalised cells), and a
plain LSTM's int8 variant, exports as explicit matrix products, one step per call (T fixed at 1): ONNX
Runtime quantizes MatMuls statically, not the recurrent ops (see quantize.py). Bidirectional models
export as a whole-sequence graph. The TorchScript exporter is used (dynamo=False): graphs from the dynamo
exporter failed quantization's shape inference.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.nets import TaskNet, state_names
from service.repository import StatePair, TensorSpec

OPSET = 17
INPUT = "x"
LAST_FORECAST = ("last_forecast", "last_forecast_out")


@dataclass(frozen=True)
class Graph:
    """An exported graph and what its manifest says about it."""

    onnx: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StatePair]
    anomaly_sigma: float | None = None  # a forecaster's: its anomaly output divides by it

    @property
    def step_only(self) -> bool:
        return self.inputs[0].shape[1] == 1


def export_graph(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """ONNX bytes of `module` through the TorchScript exporter, at our pinned opset."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        path = Path(tmp) / "graph.onnx"
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and batch-size notices
        torch.onnx.export(
            module.eval(),
            example,
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
        return path.read_bytes()


class FusedStep(nn.Module):
    """A plain LSTM stack as the ONNX LSTM op: any number of steps per call."""

    def __init__(self, net: TaskNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, new_states = self.net(x, list(states))
        return (out, *new_states)


class ExplicitStep(nn.Module):
    """One step of explicit cells: x [B, 1, F] -> outputs [B, 1, ...]."""

    def __init__(self, net: TaskNet) -> None:
        super().__init__()
        self.net = net
        self.cells = nn.ModuleList(net.recurrent.explicit_cells())
        self.lstm = net.spec.cell == "lstm"

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = len(self.cells)
        h, c = list(states[:layers]), list(states[layers:])
        inp = self.net.normalise(x[:, 0])
        for i, cell in enumerate(self.cells):
            new = cell(inp, h[i], c[i] if self.lstm else None)
            h[i] = new[0]
            if self.lstm:
                c[i] = new[1]
            inp = h[i]
        return (self.net.read_out(inp)[:, None], *h, *c)


class Forecast(nn.Module):
    """A forecaster's step graph plus a streaming anomaly score.

    anomaly[t] = |reading[t] - forecast made at t-1| / sigma (sigma: the validation residual spread),
    0 where no forecast exists yet. The last forecast is one more state pair, so the score survives
    replicas like the rest of the state.
    """

    sigma: torch.Tensor

    def __init__(self, step: nn.Module, sigma: float) -> None:
        super().__init__()
        self.step = step
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *recurrent, last = states
        forecast, *new_states = self.step(x, *recurrent)
        previous = torch.cat([last[:, None], forecast[:, :-1]], dim=1)
        anomaly = torch.abs(x[..., :1] - previous) / self.sigma * (previous > 0).to(x.dtype)
        return (forecast, anomaly, *new_states, forecast[:, -1])


class WholeSequence(nn.Module):
    """A bidirectional classifier over whole sequences: x [B, T, F] -> logits [B, C]."""

    def __init__(self, net: TaskNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.net.recurrent(self.net.normalise(x))
        return self.net.read_out(y.mean(dim=1))


def export_net(
    net: TaskNet, output_names: list[str], anomaly_sigma: float | None = None, *, explicit: bool = False
) -> Graph:
    """The graph the service runs for `net`, with its manifest description.

    `explicit`: a plain LSTM as explicit matrix products too (the step graph static int8 is made from).
    """
    net = net.eval()
    spec, features = net.spec, net.features
    if not spec.streamable:
        x = torch.zeros(1, 3, features)
        onnx = export_graph(
            WholeSequence(net),
            (x,),
            [INPUT],
            output_names,
            {INPUT: {0: "batch", 1: "time"}, output_names[0]: {0: "batch"}},
        )
        return Graph(
            onnx,
            [TensorSpec(name=INPUT, shape=[-1, -1, features])],
            [TensorSpec(name=output_names[0], shape=[-1, net.outputs])],
            [],
        )
    fused = spec.cell == "lstm" and not spec.layer_norm and not explicit
    step: nn.Module = FusedStep(net) if fused else ExplicitStep(net)
    time_axis = -1 if fused else 1
    pairs = state_names(spec.cell, spec.layers)
    widths = [spec.hidden_size] * len(pairs)
    outputs = [TensorSpec(name=output_names[0], shape=[-1, time_axis, net.outputs])]
    if anomaly_sigma is not None:
        step = Forecast(step, anomaly_sigma)
        outputs.append(TensorSpec(name=output_names[1], shape=[-1, time_axis, 1]))
        pairs, widths = [*pairs, LAST_FORECAST], [*widths, 1]
    example = (torch.zeros(1, 1, features), *(torch.zeros(1, w) for w in widths))
    dynamic = {INPUT: {0: "batch", 1: "time"} if fused else {0: "batch"}}
    dynamic |= {o.name: ({0: "batch", 1: "time"} if fused else {0: "batch"}) for o in outputs}
    dynamic |= {name: {0: "batch"} for pair in pairs for name in pair}
    onnx = export_graph(
        step,
        example,
        [INPUT, *(p[0] for p in pairs)],
        [o.name for o in outputs] + [p[1] for p in pairs],
        dynamic,
    )
    return Graph(
        onnx,
        [TensorSpec(name=INPUT, shape=[-1, time_axis, features])],
        outputs,
        [StatePair(input=i, output=o, shape=[-1, w]) for (i, o), w in zip(pairs, widths, strict=True)],
        anomaly_sigma,
    )


def cpu_session(model_bytes: bytes, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def stream(
    session: ort.InferenceSession,
    graph: Graph,
    x: np.ndarray,
    chunk: int = 1,
    states: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Feed x [B, T, F] `chunk` steps per call (1 for step-only graphs), carrying the states.

    Returns the outputs concatenated over time, and the final states.
    """
    if graph.step_only:
        chunk = 1
    batch = x.shape[0]
    states = states or {s.input: np.zeros((batch, *s.shape[1:]), np.float32) for s in graph.state}
    names = [o.name for o in graph.outputs]
    fetch = names + [s.output for s in graph.state]
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, x.shape[1], chunk):
        results = session.run(fetch, {INPUT: x[:, start : start + chunk], **states})
        for name, value in zip(names, results, strict=False):
            pieces[name].append(value)
        states = {s.input: value for s, value in zip(graph.state, results[len(names) :], strict=True)}
    return {name: np.concatenate(values, axis=1) for name, values in pieces.items()}, states


def parity(net: TaskNet, graph: Graph, sequences: np.ndarray | list[np.ndarray]) -> dict[str, float]:
    """How far the exported graph is from the trained network over held-out sequences, each [1, T, F].

    Streaming graphs run each sequence as a session does, one step per call from zero state, and every
    output at every step and every final state is compared (a forecaster's anomaly score against the same
    formula on torch's forecasts, its last-forecast state against torch's last forecast):

    - parity_streamed_vs_torch: against torch (fp32) on the whole sequence at once (whole-sequence graphs:
      parity_onnx_vs_torch, one call per sequence, every output);
    - parity_onnx_vs_fp64 and parity_torch_fp32_vs_fp64: each against torch in float64 on the whole
      sequence, the closest to exact arithmetic available: over long streams, torch's own fp32 error is
      of the same size as the difference between the two fp32 engines.

    Differences are in the network's own units (before the read-out's scale to task units, such as mg/dL;
    an anomaly score's as the forecast difference that would move it as much), and a state's relative to
    its largest magnitude where that exceeds 1 (an LSTM's cell state is unbounded), so one limit fits
    every task and tensor.
    """
    net = net.eval()
    sequences = [sequences] if isinstance(sequences, np.ndarray) else sequences
    session = cpu_session(graph.onnx)
    compared = {
        "parity_steps": float(sum(x.shape[1] for x in sequences)),
        "parity_sequences": float(len(sequences)),
        "parity_tensors": float(len(graph.outputs) + len(graph.state)),
    }
    if not graph.state:
        whole = 0.0
        with torch.no_grad():
            for x in sequences:
                expected = net.classify(torch.from_numpy(x), torch.tensor([x.shape[1]])).numpy()
                whole = max(whole, *(float(np.abs(got - expected).max()) for got in session.run(None, {INPUT: x})))
        return {"parity_onnx_vs_torch": whole, **compared}
    exact_net = copy.deepcopy(net).double()
    units = _own_units(net, graph)
    worst = {"torch": 0.0, "fp64": 0.0, "torch_fp64": 0.0, "excess": 0.0}
    for x in sequences:
        outputs, states = stream(session, graph, x, chunk=1)
        with torch.no_grad():
            reference = _reference(net, graph, torch.from_numpy(x))
            exact = _reference(exact_net, graph, torch.from_numpy(x).double())
        for name, value in {**outputs, **states}.items():
            got, unit = value.astype(np.float64), units.get(name, 1.0)
            if name in states and name not in units:  # an LSTM's cell state is unbounded: relative beyond 1
                unit = max(1.0, float(np.abs(exact[name]).max()))
            vs_torch = float(np.abs(got - reference[name]).max()) / unit
            vs_fp64 = float(np.abs(got - exact[name]).max()) / unit
            torch_vs_fp64 = float(np.abs(reference[name] - exact[name]).max()) / unit
            worst["torch"] = max(worst["torch"], vs_torch)
            worst["fp64"] = max(worst["fp64"], vs_fp64)
            worst["torch_fp64"] = max(worst["torch_fp64"], torch_vs_fp64)
            # per tensor and sequence: torch's own error on one tensor never excuses the graph's on another
            worst["excess"] = max(worst["excess"], min(vs_torch, vs_fp64 - torch_vs_fp64))
    return {
        "parity_streamed_vs_torch": worst["torch"],
        "parity_onnx_vs_fp64": worst["fp64"],
        "parity_torch_fp32_vs_fp64": worst["torch_fp64"],
        "parity_excess": worst["excess"],
        **compared,
    }


def _own_units(net: TaskNet, graph: Graph) -> dict[str, float]:
    """What a difference in each task-unit tensor is divided by to be in the network's own units."""
    scale = float(net.output_scale)
    units = {graph.outputs[0].name: scale, LAST_FORECAST[0]: scale}
    if graph.anomaly_sigma is not None:  # anomaly = |reading - forecast| / sigma
        units[graph.outputs[1].name] = scale / graph.anomaly_sigma
    return units


def _reference(net: TaskNet, graph: Graph, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every output and final state from `net` (fp32 or float64) on the whole sequence from zero state,
    named as the graph names them; a forecaster's anomaly score by the formula its graph computes."""
    first, states = net(x, [s.to(x.dtype) for s in net.recurrent.zero_state(1)])
    forecast = first.numpy().astype(np.float64)
    tensors = {graph.outputs[0].name: forecast}
    recurrent = [s.input for s in graph.state if s.input != LAST_FORECAST[0]]
    tensors |= {name: value.numpy().astype(np.float64) for name, value in zip(recurrent, states, strict=True)}
    if graph.anomaly_sigma is not None:
        previous = np.concatenate([np.zeros_like(forecast[:, :1]), forecast[:, :-1]], axis=1)
        reading = x.numpy().astype(np.float64)[..., :1]
        sigma = float(np.float32(graph.anomaly_sigma))
        tensors[graph.outputs[1].name] = np.abs(reading - previous) / sigma * (previous > 0)
        tensors[LAST_FORECAST[0]] = forecast[:, -1]
    return tensors


def parity_excess(checks: dict[str, float]) -> float:
    """How much worse the exported graph is than the network it came from, in the output units.

    The graph passes when it matches torch fp32 within the limit, or when its own error against float64
    is no more than torch fp32's own error plus the limit: two fp32 engines may legitimately differ by
    as much as each differs from exact arithmetic. Judged tensor by tensor and sequence by sequence
    (`parity_excess`, the worst of them).
    """
    if "parity_onnx_vs_torch" in checks:
        return checks["parity_onnx_vs_torch"]
    return checks["parity_excess"]
