"""ONNX Runtime sessions for served models. Calls are blocking: run them off the event loop.

ONNX Runtime releases the GIL inside `run`, so a small thread pool lets runtime calls overlap with the
event loop and with each other.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.repository import Manifest
from service.settings import RuntimeSettings

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    """Provider fallbacks are logged once per process, not per model or per call."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


@functools.cache
def cuda_usable(device_id: int) -> bool:
    """Whether the CUDA provider really runs here: listed providers only say what the wheel was built with."""
    if CUDA not in ort.get_available_providers():
        return False
    _preload_cuda_libraries()
    graph = onnx_identity_graph()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # a failed provider load is reported by the caller, once
    try:
        session = ort.InferenceSession(graph, options, providers=[(CUDA, {"device_id": device_id}), CPU])
    except Exception:  # noqa: BLE001 - any failure means: no usable CUDA
        return False
    finally:
        ort.set_default_logger_severity(2)  # the runtime's default: warnings and worse
    return CUDA in session.get_providers()


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages when that is where they are installed (ONNX
    Runtime finds them only after `onnxruntime.preload_dlls`); libraries on the system's search path need
    none of this. What it reports of libraries it did not find goes to the debug log: the probe that
    follows says, once, whether CUDA runs."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        try:
            preload()
        except Exception as err:  # noqa: BLE001 - the probe decides; this only helps it
            log.debug("onnxruntime.preload_dlls failed: %s", err)
    if said.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", said.getvalue().strip())


def onnx_identity_graph() -> bytes:
    """A one-node graph (y = Identity(x), float [1], opset 13) for probing providers.

    Serialised once with onnx.helper (make_node/make_graph/make_model, ir_version 8); the service does not
    depend on the onnx package.
    """
    return bytes.fromhex(
        "080812003a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a0a08080112040a02080162"
        "0f0a0179120a0a08080112040a02080142040a00100d"
    )


class ModelRuntime:
    """One loaded graph: x [B, T, F] plus states [B, ...] in; outputs [B, T, ...] plus new states out."""

    def __init__(self, model_path: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers: list[str | tuple[str, dict[str, object]]] = []
        for provider in settings.providers:
            if provider == CUDA:
                if cuda_usable(settings.cuda_device_id):
                    providers.append((CUDA, {"device_id": settings.cuda_device_id}))
                else:
                    _warn_once(CUDA, "CUDA was asked for but does not run here; models run on the CPU")
            elif provider in ort.get_available_providers():
                providers.append(provider)
            else:
                _warn_once(provider, "execution provider %s is not available here; skipped", provider)
        if CPU not in providers:
            providers.append(CPU)
        on_gpu = isinstance(providers[0], tuple)
        if manifest.precision == "fp16" and not on_gpu:
            # ONNX Runtime's CPU provider has no fp16 recurrent kernels (it crashed loading such a graph).
            raise ValueError(f"{model_path}: an fp16 variant needs the CUDA provider, which is not in use")
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as err:  # noqa: BLE001 - any graph ONNX Runtime refuses is unservable, not a crash
            raise ValueError(f"{model_path}: ONNX Runtime cannot load it ({type(err).__name__}: {err})") from err
        self.providers: list[str] = list(self._session.get_providers())
        self._device = "cuda" if self.providers[0] == CUDA else "cpu"
        self._device_id = settings.cuda_device_id if self._device == "cuda" else 0
        self._io_binding = settings.io_binding
        # Streaming graphs run one step per call when they take one (T fixed at 1), else a chunk per call:
        # the export checks that a chunk equals its steps. A whole-sequence graph takes the whole call.
        # int8 published before the scheme was recorded is dynamically quantized: a scale per call, so
        # there a chunk would not equal its steps; it keeps to one step per call.
        legacy_int8 = manifest.precision == "int8" and manifest.provenance.quantization is None
        self._step_only = manifest.streamable and (manifest.input.shape[1] == 1 or legacy_int8)
        self._input = manifest.input.name
        self._output_names = [o.name for o in manifest.outputs]
        self._state_pairs = [(s.input, s.output) for s in manifest.state]
        self._fetch = self._output_names + [out for _, out in self._state_pairs]
        graph_inputs = {i.name for i in self._session.get_inputs()}
        expected = {self._input, *(i for i, _ in self._state_pairs)}
        if graph_inputs != expected:
            raise ValueError(f"{model_path}: graph inputs {sorted(graph_inputs)} != manifest {sorted(expected)}")

    def run(self, x: np.ndarray, states: Tensors) -> tuple[Tensors, Tensors]:
        """x [B, T, F] from `states`; returns (outputs [B, T, ...] by name, new states keyed by input name).

        A graph that takes one step per call (time axis fixed at 1) is called T times, the states carried.
        """
        if not self._step_only or x.shape[1] == 1:
            return self._call(x, states)
        pieces: list[Tensors] = []
        for t in range(x.shape[1]):
            outputs, states = self._call(x[:, t : t + 1], states)
            pieces.append(outputs)
        return {name: np.concatenate([p[name] for p in pieces], axis=1) for name in pieces[0]}, states

    def _call(self, x: np.ndarray, states: Tensors) -> tuple[Tensors, Tensors]:
        feeds = {self._input: x, **states}
        results = self._bound_run(feeds) if self._io_binding else self._session.run(self._fetch, feeds)
        n = len(self._output_names)
        outputs = dict(zip(self._output_names, results[:n], strict=True))
        new_states = {inp: value for (inp, _), value in zip(self._state_pairs, results[n:], strict=True)}
        return outputs, new_states

    def _bound_run(self, feeds: Tensors) -> list[np.ndarray]:
        """The same call through IOBinding: ONNX Runtime allocates outputs on the model's device."""
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._fetch:
            binding.bind_output(name, self._device, self._device_id)
        self._session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())
