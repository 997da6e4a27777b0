"""One ONNX Runtime step of the LSTM and GRU step graphs, by batch size, precision and call style.

    python -m bench.gpu_step prepare --out DIR            # on a machine with torch: the graphs to measure
    python -m bench.gpu_step measure --graphs DIR --provider cuda --json out.json

`prepare` writes lstm_fp32 (the shipped charlm), gru_fp32 (a GRU step graph of the same size, seeded
random weights: latency does not depend on training) and their fp16 variants. `measure` needs only
onnxruntime (onnxruntime-gpu for `--provider cuda`) and numpy. For every graph and precision, in a child
process of its own (a provider that crashes loading a graph costs one row, not the run):

- `run`: numpy in, numpy out, the states fed back from the outputs: what the service does today;
- `iobinding`: inputs and states as device tensors, outputs bound to preallocated device tensors, the
  state buffers swapped between steps: the floor when state stays on the device;
- `cudagraph` (CUDA, fixed batch): the same bindings replayed as captured CUDA graphs, two of them
  ping-ponging the state buffers.

Parity: the fp32 graph on the provider against the same graph on the CPU, 1,000 streamed steps at batch
1 (max abs logit difference); fp16 against the CPU fp32 graph over the same steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ("lstm", "gru")
PRECISIONS = ("fp32", "fp16")
PARITY_STEPS = 1000


# -- prepare (torch) ---------------------------------------------------------------------------------


def prepare(out: Path) -> None:
    import torch

    from bench.step_latency import MODEL, VERSION
    from export.onnx_export import export_graph
    from export.quantize import to_fp16

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "models" / MODEL / str(VERSION) / "model.onnx", out / "lstm_fp32.onnx")

    class GRUStep(torch.nn.Module):
        def __init__(self, features: int, hidden: int, layers: int) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(features, hidden, layers, batch_first=True)
            self.head = torch.nn.Linear(hidden, features)

        def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y, h = self.gru(x, torch.stack(states))
            return (self.head(y), *h.unbind(0))

    torch.manual_seed(1234)
    features, hidden, layers = 84, 256, 2
    names = [f"h{i}" for i in range(layers)]
    dynamic = {"x": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}}
    dynamic |= {n: {0: "batch"} for n in names} | {f"{n}_out": {0: "batch"} for n in names}
    example = (torch.zeros(1, 1, features), *(torch.zeros(1, hidden) for _ in names))
    gru = export_graph(
        GRUStep(features, hidden, layers),
        example,
        ["x", *names],
        ["logits", *(f"{n}_out" for n in names)],
        dynamic,
    )
    (out / "gru_fp32.onnx").write_bytes(gru)
    for graph in GRAPHS:
        (out / f"{graph}_fp16.onnx").write_bytes(to_fp16((out / f"{graph}_fp32.onnx").read_bytes()))
    print(f"wrote {sorted(p.name for p in out.glob('*.onnx'))} to {out}")


# -- measure (onnxruntime only) ------------------------------------------------------------------------


def _session(path: Path, provider: str, cuda_graph: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if provider == "cpu":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    cuda_options = {"device_id": 0, "enable_cuda_graph": "1" if cuda_graph else "0"}
    session = ort.InferenceSession(
        str(path), options, providers=[("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDA provider not in use: {session.get_providers()}")
    return session


def _signature(session: ort.InferenceSession) -> tuple[int, list[tuple[str, str, int]]]:
    """(features, [(state input, state output, width)])."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    states = [(i.name, o.name, int(i.shape[1])) for i, o in zip(inputs[1:], outputs[1:], strict=True)]
    return int(inputs[0].shape[2]), states


def _inputs(features: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    x = np.zeros((batch, 1, features), np.float32)
    x[np.arange(batch), 0, rng.integers(0, features, batch)] = 1
    return x


def _time(call: Any, steps: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    us = sorted(t * 1e6 for t in times)
    return {
        "p50_us": statistics.median(us),
        "p90_us": us[int(0.9 * (len(us) - 1))],
        "mean_us": statistics.fmean(us),
    }


def _plain(session: ort.InferenceSession, features: int, states: list[Any], batch: int, steps: int) -> Any:
    x = _inputs(features, batch, np.random.default_rng(batch))
    feeds = {name: np.zeros((batch, width), np.float32) for name, _, width in states}
    fetch = ["logits", *(out for _, out, _ in states)]

    def call() -> None:
        results = session.run(fetch, {"x": x, **feeds})
        for (name, _, _), value in zip(states, results[1:], strict=True):
            feeds[name] = value

    return _time(call, steps)


def _bound(
    session: ort.InferenceSession,
    device: str,
    features: int,
    states: list[Any],
    batch: int,
    steps: int,
    graphs: bool,
) -> Any:
    x = ort.OrtValue.ortvalue_from_numpy(_inputs(features, batch, np.random.default_rng(batch)), device, 0)
    logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, features], np.float32, device, 0)
    buffers = [
        [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, width), np.float32), device, 0) for _ in range(2)]
        for _, _, width in states
    ]
    bindings = []
    for side in (0, 1):  # side 0 reads buffer 0 and writes buffer 1; side 1 the other way round
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", x)
        binding.bind_ortvalue_output("logits", logits)
        for (name, out, _), pair in zip(states, buffers, strict=True):
            binding.bind_ortvalue_input(name, pair[side])
            binding.bind_ortvalue_output(out, pair[1 - side])
        options = ort.RunOptions()
        if graphs:
            options.add_run_config_entry("gpu_graph_id", str(side + 1))
        bindings.append((binding, options))
    turn = [0]

    def call() -> None:
        binding, options = bindings[turn[0]]
        session.run_with_iobinding(binding, options)
        turn[0] ^= 1

    return _time(call, steps)


def _stream(session: ort.InferenceSession, features: int, states: list[Any], steps: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    feeds = {name: np.zeros((1, width), np.float32) for name, _, width in states}
    fetch = ["logits", *(out for _, out, _ in states)]
    logits = []
    for _ in range(steps):
        results = session.run(fetch, {"x": _inputs(features, 1, rng), **feeds})
        logits.append(results[0][0, 0])
        for (name, _, _), value in zip(states, results[1:], strict=True):
            feeds[name] = value
    return np.stack(logits)


def measure_one(graphs: Path, graph: str, precision: str, provider: str, batches: list[int], steps: int) -> Any:
    """Everything for one graph and precision; runs in a child process."""
    path = graphs / f"{graph}_{precision}.onnx"
    device = "cuda" if provider == "cuda" else "cpu"
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* pip packages
    session = _session(path, provider)
    features, states = _signature(session)
    rows = []
    for batch in batches:
        row: dict[str, Any] = {"graph": graph, "precision": precision, "batch": batch}
        for style in ("run", "iobinding", "cudagraph"):
            if style == "cudagraph" and provider != "cuda":
                continue
            try:
                if style == "run":
                    cell = _plain(session, features, states, batch, steps)
                else:
                    graphs_on = style == "cudagraph"
                    bound = _session(path, provider, cuda_graph=True) if graphs_on else session
                    cell = _bound(bound, device, features, states, batch, steps, graphs=graphs_on)
                cell["per_session_us"] = cell["p50_us"] / batch
            except Exception as err:  # noqa: BLE001 - one failed style is one cell of the table
                cell = {"error": f"{type(err).__name__}: {err}"[:300]}
            row[style] = cell
        rows.append(row)
    reference = _stream(_session(graphs / f"{graph}_fp32.onnx", "cpu"), features, states, PARITY_STEPS)
    streamed = _stream(session, features, states, PARITY_STEPS)
    diff = np.abs(streamed - reference)
    parity = {
        "graph": graph,
        "precision": precision,
        "steps": PARITY_STEPS,
        "max_abs_vs_cpu_fp32": float(diff.max()),
        "mean_abs_vs_cpu_fp32": float(diff.mean()),
    }
    return {"rows": rows, "parity": parity, "providers": session.get_providers()}


def _child(queue: Any, *args: Any) -> None:
    try:
        queue.put(measure_one(*args))
    except Exception as err:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(err).__name__}: {err}"[:500]})


def measure(graphs: Path, provider: str, batches: list[int], steps: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {
        "provider": provider,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "device": _device_name() if provider == "cuda" else None,
        "rows": [],
        "parity": [],
        "errors": [],
    }
    for graph in GRAPHS:
        for precision in PRECISIONS:
            if provider == "cpu" and precision == "fp16":
                results["errors"].append(f"{graph} fp16: skipped on the CPU provider (no fp16 recurrent kernels)")
                continue
            queue = context.Queue()
            child = context.Process(target=_child, args=(queue, graphs, graph, precision, provider, batches, steps))
            child.start()
            child.join(600)
            outcome = queue.get() if not queue.empty() else {"error": f"child exited with {child.exitcode}"}
            if "error" in outcome:
                results["errors"].append(f"{graph} {precision}: {outcome['error']}")
                continue
            results["rows"] += outcome["rows"]
            results["parity"].append(outcome["parity"])
    return results


def _device_name() -> dict[str, str]:
    import subprocess

    query = "name,driver_version,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except OSError as err:
        return {"error": str(err)}
    return dict(zip(query.split(","), (part.strip() for part in out.split(",")), strict=False))


def table(results: dict[str, Any]) -> str:
    styles = ["run", "iobinding", "cudagraph"] if results["provider"] == "cuda" else ["run", "iobinding"]
    head = "| graph | precision | batch | " + " | ".join(f"{s} p50 µs (per session)" for s in styles) + " |"
    lines = [head, "| --- | --- | ---: |" + " ---: |" * len(styles)]
    for row in results["rows"]:
        cells = []
        for style in styles:
            cell = row.get(style, {})
            cells.append("error" if "error" in cell else f"{cell['p50_us']:.0f} ({cell['per_session_us']:.2f})")
        lines.append(f"| {row['graph']} | {row['precision']} | {row['batch']} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in results["parity"]:
        lines.append(
            f"parity {p['graph']} {p['precision']} vs CPU fp32 over {p['steps']} streamed steps: "
            f"max {p['max_abs_vs_cpu_fp32']:.2e}, mean {p['mean_abs_vs_cpu_fp32']:.2e}"
        )
    lines += [f"error: {e}" for e in results["errors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("--out", type=Path, required=True)
    run = commands.add_parser("measure")
    run.add_argument("--graphs", type=Path, required=True)
    run.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    run.add_argument("--batches", default="1,8,64,256,1024")
    run.add_argument("--steps", type=int, default=200)
    run.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out)
        return 0
    results = measure(args.graphs, args.provider, [int(b) for b in args.batches.split(",")], args.steps)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if not results["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
