"""Export the step graph to ONNX and check it against torch.

The graph takes x [B, T, F] and one [B, H] tensor per state, and returns outputs [B, T, ...] and the new
states. Batch and time axes are dynamic: the service runs T = 1 for single steps and T > 1 for chunks.
The TorchScript exporter is used (dynamo=False): it emits the ONNX LSTM op, which ONNX Runtime's
dynamic quantization recognises; graphs from the dynamo exporter failed quantization's shape inference.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.nets import CharLSTM, LSTMStepGraph, state_names

OPSET = 17
INPUT = "x"
OUTPUT = "logits"


def export_graph(
    module: torch.nn.Module,
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


def export_step_graph(net: CharLSTM) -> bytes:
    layers, hidden = net.config.layers, net.config.hidden_size
    pairs = state_names(layers)
    x = torch.zeros(1, 1, net.config.vocab_size)
    states = tuple(torch.zeros(1, hidden) for _ in pairs)
    dynamic = {INPUT: {0: "batch", 1: "time"}, OUTPUT: {0: "batch", 1: "time"}}
    for name_in, name_out in pairs:
        dynamic[name_in] = {0: "batch"}
        dynamic[name_out] = {0: "batch"}
    return export_graph(
        LSTMStepGraph(net),
        (x, *states),
        [INPUT, *(p[0] for p in pairs)],
        [OUTPUT, *(p[1] for p in pairs)],
        dynamic,
    )


def cpu_session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_sequence(
    session: ort.InferenceSession, x: np.ndarray, states: dict[str, np.ndarray], chunk: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Feed x [B, T, F] `chunk` steps per call, carrying the states; returns the outputs [B, T, V]."""
    pairs = [
        (i.name, o.name) for i, o in zip(session.get_inputs()[1:], session.get_outputs()[1:], strict=True)
    ]
    outputs = []
    for start in range(0, x.shape[1], chunk):
        result = session.run(None, {INPUT: x[:, start : start + chunk], **states})
        outputs.append(result[0])
        states = {name_in: value for (name_in, _), value in zip(pairs, result[1:], strict=True)}
    return np.concatenate(outputs, axis=1), states


def parity(net: CharLSTM, model_bytes: bytes, ids: np.ndarray) -> dict[str, float]:
    """Max abs logit difference: ONNX whole sequence vs torch, and ONNX one step at a time vs whole."""
    vocab = net.config.vocab_size
    x = np.eye(vocab, dtype=np.float32)[ids][None]
    with torch.no_grad():
        reference = net(torch.from_numpy(x))[0].numpy()
    session = cpu_session(model_bytes)
    hidden = net.config.hidden_size
    zeros = {name_in: np.zeros((1, hidden), np.float32) for name_in, _ in state_names(net.config.layers)}
    whole, _ = run_sequence(session, x, zeros, chunk=x.shape[1])
    streamed, _ = run_sequence(session, x, zeros, chunk=1)
    return {
        "parity_onnx_vs_torch": float(np.abs(whole - reference).max()),
        "parity_streamed_vs_whole": float(np.abs(streamed - whole).max()),
        "parity_steps": float(len(ids)),
    }


def onnx_perplexity(model_bytes: bytes, ids: np.ndarray, vocab: int, hidden: int, layers: int) -> float:
    """Held-out perplexity of the exported graph itself, streamed in chunks with the state carried."""
    session = cpu_session(model_bytes)
    x = np.eye(vocab, dtype=np.float32)[ids[:-1]][None]
    zeros = {name_in: np.zeros((1, hidden), np.float32) for name_in, _ in state_names(layers)}
    logits, _ = run_sequence(session, x, zeros, chunk=4096)
    logits = logits[0].astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]].mean()
    return float(np.exp(nll))
