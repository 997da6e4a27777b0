"""Export trained networks to ONNX graphs the service runs, and check them against torch.

Streamable models become step graphs: x [B, T, F] and one [B, H] tensor per state in; outputs
[B, T, ...] and the new states out. A plain LSTM exports as the ONNX LSTM op with a dynamic time axis
(ONNX Runtime's dynamic quantization turns it into DynamicQuantizeLSTM). Every other streamable stack
(GRU, RNN, layer-normalised cells) exports as explicit matrix products, one step per call (T fixed at 1):
the ONNX GRU and RNN ops stay fp32 under dynamic quantization, MatMuls do not. Bidirectional models
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


def export_net(net: TaskNet, output_names: list[str], anomaly_sigma: float | None = None) -> Graph:
    """The graph the service runs for `net`, with its manifest description."""
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
    fused = spec.cell == "lstm" and not spec.layer_norm
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


def parity(net: TaskNet, graph: Graph, x: np.ndarray) -> dict[str, float]:
    """How far the exported graph is from the trained network over x [1, T, F].

    - parity_streamed_vs_torch: the graph streamed one step per call against torch (fp32) on the whole
      sequence at once (whole-sequence graphs: parity_onnx_vs_torch, one call each);
    - parity_onnx_vs_fp64 and parity_torch_fp32_vs_fp64: each against torch in float64 on the whole
      sequence, the closest to exact arithmetic available: over long streams, torch's own fp32 error is
      of the same size as the difference between the two fp32 engines.

    Differences are in the network's own output units (before the read-out's scale to task units, such
    as mg/dL), so one limit fits every task.
    """
    net = net.eval()
    session = cpu_session(graph.onnx)
    first = graph.outputs[0].name
    with torch.no_grad():
        if not graph.state:
            reference = net.classify(torch.from_numpy(x), torch.tensor([x.shape[1]])).numpy()
            (got,) = session.run([first], {INPUT: x})
            return {"parity_onnx_vs_torch": float(np.abs(got - reference).max()), "parity_steps": float(x.shape[1])}
        reference = net(torch.from_numpy(x))[0].numpy()
        exact_net = copy.deepcopy(net).double()
        exact_state = [s.double() for s in exact_net.recurrent.zero_state(1)]
        exact = exact_net(torch.from_numpy(x).double(), exact_state)[0].numpy()
    streamed = stream(session, graph, x, chunk=1)[0][first].astype(np.float64)
    scale = float(net.output_scale)
    return {
        "parity_streamed_vs_torch": float(np.abs(streamed - reference).max()) / scale,
        "parity_onnx_vs_fp64": float(np.abs(streamed - exact).max()) / scale,
        "parity_torch_fp32_vs_fp64": float(np.abs(reference - exact).max()) / scale,
        "parity_steps": float(x.shape[1]),
    }


def parity_excess(checks: dict[str, float]) -> float:
    """How much worse the exported graph is than the network it came from, in the output units.

    The graph passes when it matches torch fp32 within the limit, or when its own error against float64
    is no more than torch fp32's own error plus the limit: two fp32 engines may legitimately differ by
    as much as each differs from exact arithmetic.
    """
    if "parity_onnx_vs_torch" in checks:
        return checks["parity_onnx_vs_torch"]
    return min(checks["parity_streamed_vs_torch"], checks["parity_onnx_vs_fp64"] - checks["parity_torch_fp32_vs_fp64"])
