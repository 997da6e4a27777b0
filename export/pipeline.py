"""checkpoint -> ONNX graph -> parity -> variants (fp32, int8, fp16) -> checks -> gate -> publish.

Versions are immutable. An export publishes under the model's next free version numbers, in the order
fp32, int8, fp16, and never writes over a version (sessions are pinned to theirs). Every manifest records
its lineage: the fingerprint of the fp32 graph the export made. The server starts new sessions on the
newest version it loads; as an export numbers its versions after every earlier one, that is the newest
lineage's most preferred variant that passed its gate: int8 on CPUs, fp16 where CUDA runs (a CPU server
does not load fp16), fp32 where neither passed. Rerunning an export that makes the same bytes publishes
nothing new: the version already published is reported.

The gate is decided on the validation split; the test split is only reported. fp32 must beat the task's
floor (persistence, the majority class, the unigram model), or nothing is published. A variant is
published if, on validation, one step per call alone and in a loaded batch, its metric is within the
limits of fp32's and beats the floor; if a session's outputs are bit-identical alone and among 63
batch-mates (CPU variants); and, for int8, if its integer arithmetic cannot saturate on any x86-64 CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.config import TASKS, ExportError, GateSpec
from export.onnx_export import INPUT, Graph, cpu_session, export_net, parity, parity_excess, stream
from export.quantize import (
    COMPARISONS,
    INT8_SCHEME,
    PRECISIONS,
    Feeds,
    quantized_nodes,
    saturation_free,
    variant,
)
from export.tasks import Task, better
from export.train import TrainResult
from service.repository import (
    Manifest,
    Provenance,
    RepositoryError,
    next_version,
    published_as,
    read_manifest,
    versions_of,
    write_version,
)
from service.runtime import CUDA, cuda_usable

PARITY_LIMIT = 1e-5
PUBLISH_ATTEMPTS = 5  # exports racing for the same version numbers
# The order an export judges and numbers its variants: least preferred first, so the newest is the best.
PUBLISH_ORDER = ("fp32", *COMPARISONS, "int8", "fp16")
LOADED_BATCH = 16
INVARIANCE_SEED = 7


@dataclass
class VariantReport:
    precision: str
    version: int = 0  # 0: not published
    metrics: dict[str, float] = field(default_factory=dict)  # the test split, reported
    validation: dict[str, float] = field(default_factory=dict)  # the validation split, gated
    verdict: str = ""
    published: bool = False
    latency_us: float = float("nan")  # one step, batch 1
    latency_us_batch64: float = float("nan")
    size_bytes: int = 0
    quantized_nodes: int = 0
    fingerprint: str = ""
    batch_variance: float = float("nan")  # max |a session alone - the same session among batch-mates|


@dataclass
class ExportReport:
    name: str
    task: str
    metric: str
    result: TrainResult
    parity: dict[str, float]
    variants: list[VariantReport]
    floor: float = float("nan")  # the task's baseline on validation
    lineage: str = ""
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


def evaluate_as_served(
    task: Task, session: ort.InferenceSession, graph: Graph, split: str = "test"
) -> dict[str, float]:
    """The metric one step per call, alone (batch 1) and among other sessions (a loaded batch)."""
    metrics = task.evaluate(session, graph, batch=1, split=split)
    if graph.state:
        loaded = task.evaluate(session, graph, batch=LOADED_BATCH, split=split)
        metrics[f"{task.metric}_batch{LOADED_BATCH}"] = loaded[task.metric]
    return metrics


def gate_all(
    task: Task, gates: GateSpec, metrics: dict[str, float], reference: dict[str, float], floor: float
) -> tuple[bool, str]:
    """The gate on validation figures: at batch 1 and, for streaming models, in a loaded batch, against
    fp32's; and against the task's floor."""
    verdicts = [gate(task, gates, metrics[task.metric], reference[task.metric])]
    loaded = f"{task.metric}_batch{LOADED_BATCH}"
    if loaded in metrics:
        passed, why = gate(task, gates, metrics[loaded], reference[loaded])
        verdicts.append((passed, f"batch {LOADED_BATCH}: {why}"))
    verdicts.append(beats_floor(task, metrics[task.metric], floor))
    return all(passed for passed, _ in verdicts), "; ".join(why for _, why in verdicts)


def beats_floor(task: Task, value: float, floor: float) -> tuple[bool, str]:
    passed = better(task, value, floor)
    return passed, f"{task.metric} {value:.4g} {'beats' if passed else 'does not beat'} the floor {floor:.4g}"


def batch_variance(session: ort.InferenceSession, graph: Graph, x: np.ndarray) -> float:
    """How far row 0 of x [B, T, F] is answered differently alone than in the batch (0.0: bit-identical),
    over every output and, for streaming graphs, every state after every step (one step per call), and
    for graphs that take chunks, a chunk of 8 steps against its steps."""
    if not graph.state:
        alone = session.run(None, {INPUT: x[:1]})
        together = session.run(None, {INPUT: x})
        return max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(alone, together, strict=True))
    alone_out, alone_state = stream(session, graph, x[:1])
    together_out, together_state = stream(session, graph, x)
    pairs = [(alone_out[k], together_out[k][:1]) for k in alone_out]
    pairs += [(alone_state[k], together_state[k][:1]) for k in alone_state]
    if not graph.step_only:
        chunked_out, chunked_state = stream(session, graph, x[:1], chunk=8)
        pairs += [(alone_out[k], chunked_out[k]) for k in alone_out]
        pairs += [(alone_state[k], chunked_state[k]) for k in alone_state]
    return max(float(np.abs(a - b).max()) for a, b in pairs)


def step_latency_us(session: ort.InferenceSession, graph: Graph, batch: int = 1, repeats: int = 300) -> float:
    """p50 of one call, one time step of `batch` sessions (whole-sequence graphs: a 16-step sequence)."""
    steps = 1 if graph.state else 16
    feeds = {INPUT: np.zeros((batch, steps, graph.inputs[0].shape[2]), np.float32)}
    feeds |= {s.input: np.zeros((batch, *s.shape[1:]), np.float32) for s in graph.state}
    for _ in range(20):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def calibration_feeds(task: Task, graph: Graph) -> list[Feeds]:
    """The feeds of every call as served, over the task's calibration input, states carried from fp32."""
    session = cpu_session(graph.onnx)
    feeds: list[Feeds] = []
    for x in task.calibration_input():
        if not graph.state:
            feeds.append({INPUT: x})
            continue
        states = {s.input: np.zeros((x.shape[0], *s.shape[1:]), np.float32) for s in graph.state}
        for t in range(x.shape[1]):
            feed = {INPUT: x[:, t : t + 1], **states}
            feeds.append(feed)
            new = session.run([s.output for s in graph.state], feed)
            states = {s.input: value for s, value in zip(graph.state, new, strict=True)}
    return feeds


def calibration_note(feeds: Sequence[Feeds]) -> str:
    rows = sum(f[INPUT].shape[0] * f[INPUT].shape[1] for f in feeds)
    return f"{rows} time steps in {len(feeds)} calls, from the training split, states carried"


def _session(model_bytes: bytes, precision: str, threads: int) -> ort.InferenceSession | None:
    if precision != "fp16":
        return cpu_session(model_bytes, threads)
    if not cuda_usable(0):
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=[(CUDA, {"device_id": 0}), "CPUExecutionProvider"])


def judge(
    task: Task,
    gates: GateSpec,
    row: VariantReport,
    session: ort.InferenceSession,
    graph: Graph,
    reference: dict[str, float],
    floor: float,
    mates: np.ndarray,
) -> tuple[bool, str]:
    """(passed, why) for one variant: the gate on validation, batch invariance, saturation."""
    if row.precision == "fp32":
        row.validation, passed, why = reference, True, "reference"
    else:
        row.validation = evaluate_as_served(task, session, graph, "validation")
        passed, why = gate_all(task, gates, row.validation, reference, floor)
    if row.precision != "fp16":  # CPU variants: a session's answer must be its own
        row.batch_variance = batch_variance(session, graph, mates)
        if row.batch_variance != 0.0:
            passed = False
            why += f"; not batch-invariant: a session alone and among batch-mates differs by {row.batch_variance:.3g}"
    if row.precision.startswith("int8"):
        free, how = saturation_free(graph.onnx)
        passed = passed and free
        why += f"; integer arithmetic {'saturation-free' if free else 'unsafe'}: {how}"
    if row.precision in COMPARISONS:
        passed, why = False, f"{why}; built for comparison only"
    return passed, why


MakeVariant = Callable[[bytes, str, Sequence[Feeds]], bytes]


def export_model(
    result: TrainResult,
    task: Task,
    repo: Path,
    name: str,
    *,
    precisions: tuple[str, ...] = PRECISIONS,
    gates: GateSpec | None = None,
    parity_steps: int = 10_000,
    make_variant: MakeVariant = variant,
) -> ExportReport:
    """Export, check, gate and publish every precision of `result`; see the module docstring.

    Nothing is published until every variant is judged. `make_variant` builds each precision from fp32
    bytes (tests hand in deliberately broken ones).
    """
    gates = gates or GateSpec()
    precisions = tuple(sorted(dict.fromkeys(precisions), key=PUBLISH_ORDER.index))
    graph = export_net(result.net, task.outputs, task.anomaly_sigma(result.net))
    checks = parity(result.net, graph, task.parity_inputs(parity_steps))
    if parity_excess(checks) > PARITY_LIMIT:
        raise ExportError(f"{name}: exported graph differs from torch beyond {PARITY_LIMIT}: {checks}; not published")
    fp32_session = cpu_session(graph.onnx)
    reference = evaluate_as_served(task, fp32_session, graph, "validation")
    floor = task.floor("validation")
    passed, why = beats_floor(task, reference[task.metric], floor)
    if not passed:
        raise ExportError(f"{name}: fp32 on validation: {why}; a model no better than the baseline is not published")
    same_interface(repo, name, TASKS[task.name], graph)
    report = ExportReport(
        name, task.name, task.metric, result, checks, [], floor, hashlib.sha256(graph.onnx).hexdigest()
    )
    mates = task.invariance_input(np.random.default_rng(INVARIANCE_SEED))
    publishable: list[tuple[VariantReport, Graph, list[Feeds]]] = []
    for precision in precisions:
        source = graph
        if precision == "int8" and graph.state and not graph.step_only:
            source = export_net(result.net, task.outputs, graph.anomaly_sigma, explicit=True)
            explicit = parity(result.net, source, task.parity_inputs(min(parity_steps, 2000)))
            if parity_excess(explicit) > PARITY_LIMIT:
                raise ExportError(f"{name}: the explicit step graph differs from torch: {explicit}; not published")
        calibration = calibration_feeds(task, source) if precision == "int8" else []
        data = make_variant(source.onnx, precision, calibration)
        candidate = dataclasses.replace(source, onnx=data)
        row = VariantReport(precision, size_bytes=len(data), quantized_nodes=quantized_nodes(data))
        report.variants.append(row)
        session = fp32_session if precision == "fp32" else _session(data, precision, threads=0)
        if session is None:
            row.verdict = "not evaluated: fp16 needs the CUDA provider, which does not run here"
            continue
        row.metrics = evaluate_as_served(task, session, candidate, "test")
        passed, why = judge(task, gates, row, session, candidate, reference, floor, mates)
        if precision == "fp32" and not passed:
            raise ExportError(f"{name}: fp32 {why}; not published")
        row.verdict = why if precision == "fp32" else f"{'passed' if passed else 'failed'}: {why}"
        timing = _session(data, precision, threads=1)
        assert timing is not None
        row.latency_us = step_latency_us(timing, candidate)
        row.latency_us_batch64 = step_latency_us(timing, candidate, batch=64, repeats=100)
        if passed:
            row.fingerprint = hashlib.sha256(data).hexdigest()
            publishable.append((row, candidate, calibration))
    publish(
        repo,
        name,
        publishable,
        lambda row, graph, feeds: build_manifest(
            task, result, name, graph, row, reference, checks, gates, report, feeds
        ),
    )
    if task.name == "glucose":
        report.trace = task.forecast_trace(fp32_session, graph)  # type: ignore[attr-defined]
    return report


def same_interface(repo: Path, name: str, task: str, graph: Graph) -> None:
    """Refuse to publish under a name whose newest version clients call differently (task, features, outputs)."""
    versions = versions_of(repo, name) if repo.is_dir() else []
    if not versions:
        return
    newest = read_manifest(repo / name / str(versions[-1]), verify=False)
    ours = (task, graph.inputs[0].shape[2], [o.name for o in graph.outputs])
    theirs = (newest.task, newest.features, [o.name for o in newest.outputs])
    if ours != theirs:
        raise ExportError(
            f"{name}/{newest.version} is a {theirs[0]} model taking {theirs[1]} features and answering "
            f"{', '.join(theirs[2])}; this one is a {ours[0]} model taking {ours[1]} and answering "
            f"{', '.join(ours[2])}: its clients would break. Publish it under another name"
        )


def publish(
    repo: Path,
    name: str,
    publishable: list[tuple[VariantReport, Graph, list[Feeds]]],
    manifest_of: Callable[[VariantReport, Graph, list[Feeds]], Manifest],
) -> None:
    """Publish the variants that passed, in preference order, under the next free version numbers.

    If every one of them is already published (a rerun that made the same bytes), nothing is written. If
    only some are, the whole set is published again under new numbers, so the newest version stays the
    most preferred variant of the latest export (publishing only the new one would number it after a
    more preferred variant, or after a newer lineage).
    """
    if not publishable:
        return
    existing = [published_as(repo, name, row.fingerprint) for row, _, _ in publishable]
    if all(version is not None for version in existing):
        for (row, _, _), version in zip(publishable, existing, strict=True):
            row.version, row.published = version or 0, True
            row.verdict += f"; already published as version {version}"
        return
    for attempt in range(PUBLISH_ATTEMPTS):
        first = next_version(repo, name)
        for number, (row, _, _) in enumerate(publishable, start=first):
            row.version = number
        # The most preferred (highest) first: a server polling meanwhile never starts sessions on a less
        # preferred variant of this export, and a rival export that took the same numbers collides here,
        # before any of this set is published, and numbers again.
        ordered = list(reversed(publishable))
        try:
            row, graph, feeds = ordered[0]
            write_version(repo, manifest_of(row, graph, feeds), graph.onnx)
        except RepositoryError:
            if attempt == PUBLISH_ATTEMPTS - 1 or not (repo / name / str(row.version)).exists():
                raise
            continue
        row.published = True
        for row, graph, feeds in ordered[1:]:
            write_version(repo, manifest_of(row, graph, feeds), graph.onnx)
            row.published = True
        return


def build_manifest(
    task: Task,
    result: TrainResult,
    name: str,
    graph: Graph,
    row: VariantReport,
    reference: dict[str, float],
    checks: dict[str, float],
    gates: GateSpec,
    report: ExportReport,
    calibration: Sequence[Feeds],
) -> Manifest:
    spec = result.spec
    validation = {f"test_{k}": v for k, v in row.metrics.items()}
    validation |= {f"validation_{k}": v for k, v in row.validation.items()}
    validation |= {
        f"validation_{task.metric}_fp32": reference[task.metric],
        f"validation_{task.metric}_floor": report.floor,
        f"validation_{task.metric}_torch": result.best,
    }
    validation |= {k: v for k, v in checks.items()}
    validation |= {
        "step_latency_us_batch1_cpu": row.latency_us,
        "step_latency_us_batch64_cpu": row.latency_us_batch64,
        "quantized_nodes": float(row.quantized_nodes),
        "batch_variance": row.batch_variance,
    }
    validation |= {f"gate_{k}": v for k, v in gates.model_dump().items()}
    training: dict[str, float | int | str | bool] = {**spec.model_dump(), **result.train.model_dump()}
    training |= {"train_seconds": round(result.seconds, 1), "evaluations": len(result.history)}
    quantization = INT8_SCHEME | {"calibration_data": calibration_note(calibration)} if calibration else None
    return Manifest(
        name=name,
        version=row.version,
        task=TASKS[task.name],  # type: ignore[arg-type]
        cell=spec.cell,
        layers=spec.layers,
        hidden_size=spec.hidden_size,
        bidirectional=spec.bidirectional,
        streamable=spec.streamable,
        precision=row.precision,  # type: ignore[arg-type]
        inputs=graph.inputs,
        outputs=graph.outputs,
        state=graph.state,
        preprocessing=task.preprocessing(),
        validation=validation,
        fingerprint=row.fingerprint,
        lineage=report.lineage,
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
            quantization=quantization,
        ),
    )
