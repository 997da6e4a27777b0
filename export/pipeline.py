"""checkpoint -> ONNX graph -> parity -> variants (fp32, int8, fp16) -> held-out metric -> gate -> publish.

Versions are fixed by precision: 1 fp32, 2 int8, 3 fp16. The server starts new sessions on the newest
version it loads, so the order is the preference: int8 on CPUs, fp16 where CUDA runs (a CPU server does
not load fp16). A variant is published only if its metric passes the gate relative to fp32; one that
fails is reported with its numbers and left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.config import TASKS, GateSpec
from export.onnx_export import INPUT, Graph, cpu_session, export_net, parity, parity_excess
from export.quantize import PRECISIONS, quantized_nodes, variant
from export.tasks import Task
from export.train import TrainResult
from service.repository import Manifest, Provenance, write_version
from service.runtime import CUDA, cuda_usable

VERSIONS = {"fp32": 1, "int8": 2, "fp16": 3}
PARITY_LIMIT = 1e-5
LOADED_BATCH = 16


class ExportError(RuntimeError):
    """The exported graph does not match the trained network: nothing is published."""


@dataclass
class VariantReport:
    precision: str
    version: int
    metrics: dict[str, float] = field(default_factory=dict)
    verdict: str = ""
    published: bool = False
    latency_us: float = float("nan")
    size_bytes: int = 0
    quantized_nodes: int = 0
    fingerprint: str = ""


@dataclass
class ExportReport:
    name: str
    task: str
    metric: str
    result: TrainResult
    parity: dict[str, float]
    variants: list[VariantReport]
    trace: dict[str, np.ndarray] | None = None


def gate(task: Task, gates: GateSpec, candidate: float, reference: float) -> tuple[bool, str]:
    """(passed, why) for a variant's metric against fp32's."""
    if task.metric == "accuracy":
        drop = reference - candidate
        return (
            drop <= gates.max_accuracy_drop_points,
            f"accuracy {drop:+.2f} points (limit -{gates.max_accuracy_drop_points})",
        )
    limit = gates.max_perplexity_increase_pct if task.metric == "perplexity" else gates.max_rmse_increase_pct
    change = (candidate - reference) / reference * 100
    return change <= limit, f"{task.metric} {change:+.2f} % (limit +{limit} %)"


def evaluate_as_served(task: Task, session: ort.InferenceSession, graph: Graph) -> dict[str, float]:
    """The test metric one step per call, alone (batch 1) and among other sessions (a loaded batch)."""
    metrics = task.evaluate(session, graph, batch=1)
    if graph.state:
        metrics[f"{task.metric}_batch{LOADED_BATCH}"] = task.evaluate(session, graph, batch=LOADED_BATCH)[task.metric]
    return metrics


def gate_all(task: Task, gates: GateSpec, metrics: dict[str, float], reference: dict[str, float]) -> tuple[bool, str]:
    """The gate at batch 1 and, for streaming models, in a loaded batch: int8's dynamic quantization takes
    its activation range from the whole call, so batch-mates can cost a session accuracy."""
    verdicts = [gate(task, gates, metrics[task.metric], reference[task.metric])]
    loaded = f"{task.metric}_batch{LOADED_BATCH}"
    if loaded in metrics:
        passed, why = gate(task, gates, metrics[loaded], reference[loaded])
        verdicts.append((passed, f"batch {LOADED_BATCH}: {why}"))
    return all(passed for passed, _ in verdicts), "; ".join(why for _, why in verdicts)


def step_latency_us(session: ort.InferenceSession, graph: Graph, repeats: int = 300) -> float:
    """p50 of one call at batch 1, one time step (whole-sequence graphs: a 16-step sequence)."""
    steps = 1 if graph.state else 16
    feeds = {INPUT: np.zeros((1, steps, graph.inputs[0].shape[2]), np.float32)}
    feeds |= {s.input: np.zeros((1, *s.shape[1:]), np.float32) for s in graph.state}
    for _ in range(20):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _session(model_bytes: bytes, precision: str, threads: int) -> ort.InferenceSession | None:
    if precision != "fp16":
        return cpu_session(model_bytes, threads)
    if not cuda_usable(0):
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=[(CUDA, {"device_id": 0}), "CPUExecutionProvider"])


def export_model(
    result: TrainResult,
    task: Task,
    repo: Path,
    name: str,
    *,
    precisions: tuple[str, ...] = PRECISIONS,
    gates: GateSpec | None = None,
    parity_steps: int = 10_000,
    make_variant: Callable[[bytes, str], bytes] = variant,
) -> ExportReport:
    """Export, validate and publish every precision of `result`; see the module docstring.

    `make_variant` builds each precision from the fp32 bytes (tests hand in a deliberately broken one).
    """
    gates = gates or GateSpec()
    graph = export_net(result.net, task.outputs, task.anomaly_sigma(result.net))
    checks = parity(result.net, graph, task.parity_input(parity_steps))
    if parity_excess(checks) > PARITY_LIMIT:
        raise ExportError(f"{name}: exported graph differs from torch beyond {PARITY_LIMIT}: {checks}; not published")
    fp32_session = cpu_session(graph.onnx)
    reference = evaluate_as_served(task, fp32_session, graph)
    report = ExportReport(name, task.name, task.metric, result, checks, [])
    for precision in precisions:
        data = make_variant(graph.onnx, precision)
        candidate = dataclasses.replace(graph, onnx=data)
        row = VariantReport(precision, VERSIONS[precision], size_bytes=len(data), quantized_nodes=quantized_nodes(data))
        report.variants.append(row)
        if precision == "fp32":
            row.metrics, passed, row.verdict = reference, True, "reference"
        else:
            session = _session(data, precision, threads=0)
            if session is None:
                row.verdict = "not evaluated: fp16 needs the CUDA provider, which does not run here"
                continue
            row.metrics = evaluate_as_served(task, session, candidate)
            passed, why = gate_all(task, gates, row.metrics, reference)
            row.verdict = f"passed: {why}" if passed else f"failed: {why}"
        timing = _session(data, precision, threads=1)
        assert timing is not None
        row.latency_us = step_latency_us(timing, candidate)
        if passed:
            manifest = build_manifest(task, result, name, candidate, precision, row, reference, checks, gates)
            write_version(repo, manifest, data)
            row.published, row.fingerprint = True, manifest.fingerprint
    if task.name == "glucose":
        report.trace = task.forecast_trace(fp32_session, graph)  # type: ignore[attr-defined]
    return report


def build_manifest(
    task: Task,
    result: TrainResult,
    name: str,
    graph: Graph,
    precision: str,
    row: VariantReport,
    reference: dict[str, float],
    checks: dict[str, float],
    gates: GateSpec,
) -> Manifest:
    spec = result.spec
    validation = {f"test_{k}": v for k, v in row.metrics.items()}
    validation |= {
        f"test_{task.metric}_fp32": reference[task.metric],
        f"validation_{task.metric}_torch": result.best,
    }
    validation |= {k: v for k, v in checks.items()}
    validation |= {
        "step_latency_us_batch1_cpu": row.latency_us,
        "quantized_nodes": float(row.quantized_nodes),
    }
    validation |= {f"gate_{k}": v for k, v in gates.model_dump().items()}
    training: dict[str, float | int | str | bool] = {**spec.model_dump(), **result.train.model_dump()}
    training |= {"train_seconds": round(result.seconds, 1), "evaluations": len(result.history)}
    return Manifest(
        name=name,
        version=VERSIONS[precision],
        task=TASKS[task.name],  # type: ignore[arg-type]
        cell=spec.cell,
        layers=spec.layers,
        hidden_size=spec.hidden_size,
        bidirectional=spec.bidirectional,
        streamable=spec.streamable,
        precision=precision,  # type: ignore[arg-type]
        inputs=graph.inputs,
        outputs=graph.outputs,
        state=graph.state,
        preprocessing=task.preprocessing(),
        validation=validation,
        fingerprint=hashlib.sha256(graph.onnx).hexdigest(),
        provenance=Provenance(
            dataset=task.dataset,
            training=training,
            versions={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
            },
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ),
    )
