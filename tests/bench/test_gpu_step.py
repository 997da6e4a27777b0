"""The GPU benchmark's script, rehearsed on the CPU provider so it is known to run when a GPU is lent."""

from __future__ import annotations

import json

from bench.gpu_step import main


def test_prepare_and_measure_on_cpu(tmp_path, capsys):
    graphs = tmp_path / "graphs"
    assert main(["prepare", "--out", str(graphs)]) == 0
    assert sorted(p.name for p in graphs.glob("*.onnx")) == [
        "gru_fp16.onnx",
        "gru_fp32.onnx",
        "lstm_fp16.onnx",
        "lstm_fp32.onnx",
    ]
    out = tmp_path / "cpu.json"
    assert (
        main(
            [
                "measure",
                "--graphs",
                str(graphs),
                "--provider",
                "cpu",
                "--batches",
                "1,4",
                "--steps",
                "5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert [(r["graph"], r["batch"]) for r in results["rows"]] == [
        ("lstm", 1),
        ("lstm", 4),
        ("gru", 1),
        ("gru", 4),
    ]
    for row in results["rows"]:
        for style in ("run", "iobinding"):
            assert row[style]["p50_us"] > 0 and row[style]["per_session_us"] <= row[style]["p50_us"]
    assert {p["max_abs_vs_cpu_fp32"] for p in results["parity"]} == {0.0}
    assert "| lstm | fp32 | 4 |" in capsys.readouterr().out
