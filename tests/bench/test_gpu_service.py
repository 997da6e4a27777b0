"""The GPU node's service benchmark, rehearsed on the CPU provider so it is known to run when a GPU is lent."""

from __future__ import annotations

import json

from bench.gpu_service import LOADS, main
from bench.step_latency import VERSION


def test_prepare_and_measure_the_service_on_cpu(tmp_path, capsys):
    prepared = tmp_path / "gpu"
    assert main(["prepare", "--out", str(prepared)]) == 0
    assert (prepared / "repo" / "charlm-lstm" / str(VERSION + 1) / "model.onnx").is_file()  # the fp16 variant
    figures = tmp_path / "service.json"
    arguments = ["measure", "--prepared", str(prepared), "--providers", "cpu", "--scale", "1000"]
    assert main([*arguments, "--json", str(figures), "--logs", str(tmp_path / "logs")]) == 0
    results = json.loads(figures.read_text())
    assert results["store"] == "redis"  # the copied redis-server (and its libraries) ran
    started = [run for run in results["runs"] if "providers" in run]
    assert len(started) == 2  # one worker, and one per core
    assert all(run["providers"] == {f"charlm-lstm/{VERSION}": "CPUExecutionProvider"} for run in started)
    measured = [run["figures"] for run in results["runs"] if "figures" in run]
    assert len(measured) == 2 * len(LOADS)
    assert all(f["steps"] > 0 and not f["errors"] for f in measured), measured
    assert "fan-in: 1,024 sessions, 256 steps per message" in capsys.readouterr().out
