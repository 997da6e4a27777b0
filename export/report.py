"""What a person wants to look at after `make models`: plots and tables, per model and for all of them.

<dir>/<model>.md, <model>-training.png (and <model>-forecast.png for forecasters), <model>.json
<dir>/../MODELS.md: one table over every model, rebuilt from the JSON summaries
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from export.pipeline import ExportReport  # noqa: E402


def _training_plot(report: ExportReport, path: Path) -> None:
    history = report.result.history
    steps = [h["step"] for h in history]
    figure, left = plt.subplots(figsize=(7, 3.5))
    left.plot(steps, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("train loss", color="tab:blue")
    right = left.twinx()
    right.plot(steps, [h[f"validation_{report.metric}"] for h in history], color="tab:red", marker="o")
    right.set_ylabel(f"validation {report.metric}", color="tab:red")
    left.set_title(f"{report.name}: training")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _forecast_plot(report: ExportReport, path: Path) -> None:
    assert report.trace is not None
    trace = report.trace
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, height_ratios=[3, 1])
    steps = range(len(trace["reading"]))
    top.plot(steps, trace["reading"], color="black", linewidth=1, label="reading")
    top.plot(
        range(1, len(trace["forecast"]) + 1),
        trace["forecast"],
        color="tab:orange",
        linewidth=1,
        label="forecast made one step before",
    )
    top.set_ylabel("glucose (mg/dL)")
    top.legend(loc="upper right")
    top.set_title(f"{report.name}: held-out readings and one-step forecasts (fp32)")
    bottom.plot(steps, trace["anomaly"], color="tab:red", linewidth=1)
    bottom.set_ylabel("anomaly (σ)")
    bottom.set_xlabel("step (about 5 minutes each)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary(report: ExportReport) -> dict[str, Any]:
    spec = report.result.spec
    return {
        "name": report.name,
        "task": report.task,
        "metric": report.metric,
        "cell": spec.cell,
        "layers": spec.layers,
        "hidden_size": spec.hidden_size,
        "bidirectional": spec.bidirectional,
        "layer_norm": spec.layer_norm,
        "train_seconds": round(report.result.seconds, 1),
        "validation_best": report.result.best,
        "parity": report.parity,
        "floor": report.floor,
        "lineage": report.lineage,
        "variants": [
            {
                "precision": v.precision,
                "version": v.version,
                "published": v.published,
                "verdict": v.verdict,
                "metrics": v.metrics,
                "validation": v.validation,
                "latency_us": _rounded(v.latency_us),
                "latency_us_batch64": _rounded(v.latency_us_batch64),
                "size_bytes": v.size_bytes,
                "quantized_nodes": v.quantized_nodes,
                "batch_variance": None if math.isnan(v.batch_variance) else v.batch_variance,
            }
            for v in report.variants
        ],
    }


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 1)


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def variant_table(data: dict[str, Any]) -> list[str]:
    metric = data["metric"]
    loaded = f"{metric}_batch16"
    lines = [
        f"| version | precision | validation {metric} | test {metric} | test, batch 16 | gate (on validation) "
        "| step µs, batch 1 | step µs, batch 64 | size | quantized nodes |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for v in data["variants"]:
        version = v["version"] if v["published"] else "not published"
        lines.append(
            f"| {version} | {v['precision']} | {_cell(v['validation'].get(metric))} | "
            f"{_cell(v['metrics'].get(metric))} | {_cell(v['metrics'].get(loaded))} | {v['verdict']} | "
            f"{_cell(v['latency_us'], 0)} | {_cell(v['latency_us_batch64'], 0)} | {v['size_bytes'] / 1e6:.2f} MB | "
            f"{v['quantized_nodes']} |"
        )
    return lines


def write_report(report: ExportReport, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = summary(report)
    (directory / f"{report.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    _training_plot(report, directory / f"{report.name}-training.png")
    lines = [
        f"# {report.name}",
        "",
        f"Task `{report.task}`; {data['cell'].upper()}, {data['layers']} layer(s), hidden {data['hidden_size']}"
        f"{', bidirectional' if data['bidirectional'] else ''}{', layer norm' if data['layer_norm'] else ''}; "
        f"trained {data['train_seconds']} s; best validation {report.metric} {report.result.best:.4f}.",
        "",
        *variant_table(data),
        "",
        f"Floor on validation ({FLOORS[report.metric]}): {report.metric} {report.floor:.4f}. Lineage (the fp32 "
        f"graph's sha256): `{report.lineage[:16]}`.",
        "",
        "Parity (fp32 ONNX against torch): " + ", ".join(f"{k} {v:.3g}" for k, v in report.parity.items()),
        "",
        f"![training]({report.name}-training.png)",
    ]
    if report.trace is not None:
        _forecast_plot(report, directory / f"{report.name}-forecast.png")
        persistence = next(v["metrics"].get("persistence_rmse") for v in data["variants"] if v["metrics"])
        lines += [
            "",
            f"Persistence baseline (next = current) on the same readings: RMSE {persistence:.3f} mg/dL.",
            "",
            f"![forecast]({report.name}-forecast.png)",
        ]
    path = directory / f"{report.name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _metric_cell(by_precision: dict[str, Any], precision: str, metric: str, split: str = "metrics") -> str:
    row = by_precision.get(precision)
    if not row or metric not in row.get(split, {}):  # summaries written before validation was gated lack it
        return "—"
    return f"{row[split][metric]:.3f}" + ("" if row["published"] else " (refused)")


FLOORS = {
    "perplexity": "the unigram model",
    "rmse": "persistence, next = current",
    "accuracy": "the majority class",
}


def write_index(directory: Path, target: Path) -> None:
    """One table over every model summarised in `directory`."""
    rows = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    lines = [
        "# Models",
        "",
        "Written by `make models` (`python -m export.catalog`); each model's page has its plots and every figure.",
        "",
        "An export publishes under the model's next free version numbers (fp32, then int8, then fp16) and never",
        "over an existing version. The gate is decided on the validation split: fp32 must beat the floor, and a",
        "variant must stay within +2 % perplexity, +3 % RMSE or -1 accuracy point of fp32, one step per call",
        "alone and in a batch of 16, beat the floor, answer a session bit-identically alone and among 63",
        "batch-mates, and (int8) use 7-bit weights so that no x86-64 CPU saturates. Test figures are reported,",
        "never gated on. fp16 is validated only where the CUDA provider runs; elsewhere it is reported and not",
        "published. int8-dynamic is the per-call quantization earlier versions shipped, built for comparison",
        "only: it is always refused, since a batch shares its activation scale.",
        "",
        "| model | task | cell | metric | floor (validation) | fp32 validation / test | int8 validation / test "
        "| int8-dynamic test | versions | fp32 step µs (batch 1 / 64) | int8 step µs (batch 1 / 64) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for data in rows:
        by = {v["precision"]: v for v in data["variants"]}
        metric = data["metric"]
        cell = data["cell"].upper() + (" bi" if data["bidirectional"] else "")
        figures = " | ".join(
            f"{_metric_cell(by, p, metric, 'validation')} / {_metric_cell(by, p, metric)}" for p in ("fp32", "int8")
        )
        versions = ", ".join(f"{v['version']} {v['precision']}" for v in data["variants"] if v["published"])
        latency = " | ".join(
            f"{_cell(by.get(p, {}).get('latency_us'), 0)} / {_cell(by.get(p, {}).get('latency_us_batch64'), 0)}"
            for p in ("fp32", "int8")
        )
        lines.append(
            f"| [{data['name']}](models/{data['name']}.md) | {data['task']} | {cell} | {metric} | "
            f"{_cell(data.get('floor'))} | {figures} | {_metric_cell(by, 'int8-dynamic', metric)} | {versions} | "
            f"{latency} |"
        )
    target.write_text("\n".join(lines) + "\n")
