"""ONNX Runtime sessions for served models. Calls are blocking: run them off the event loop.

ONNX Runtime releases the GIL inside `run`, so a small thread pool lets runtime calls overlap with the
event loop and with each other.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.repository import Manifest
from service.settings import RuntimeSettings

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


class ModelRuntime:
    """One loaded graph: x [B, T, F] plus states [B, ...] in; outputs [B, T, ...] plus new states out."""

    def __init__(self, model_path: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        available = set(ort.get_available_providers())
        providers = [p for p in settings.providers if p in available]
        if not providers:
            log.warning("none of %s is available here; using CPUExecutionProvider", settings.providers)
            providers = ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.providers: list[str] = list(self._session.get_providers())
        self._input = manifest.input.name
        self._output_names = [o.name for o in manifest.outputs]
        self._state_pairs = [(s.input, s.output) for s in manifest.state]
        self._fetch = self._output_names + [out for _, out in self._state_pairs]
        graph_inputs = {i.name for i in self._session.get_inputs()}
        expected = {self._input, *(i for i, _ in self._state_pairs)}
        if graph_inputs != expected:
            raise ValueError(
                f"{model_path}: graph inputs {sorted(graph_inputs)} != manifest {sorted(expected)}"
            )

    def run(self, x: np.ndarray, states: Tensors) -> tuple[Tensors, Tensors]:
        """One call; returns (outputs by name, new states keyed by their *input* names)."""
        feeds = {self._input: x, **states}
        results = self._session.run(self._fetch, feeds)
        n = len(self._output_names)
        outputs = dict(zip(self._output_names, results[:n], strict=True))
        new_states = {inp: value for (inp, _), value in zip(self._state_pairs, results[n:], strict=True)}
        return outputs, new_states
