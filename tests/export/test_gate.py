"""The gate: a variant worse than fp32 beyond its limit is reported with its numbers and not published."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
from onnx import numpy_helper

from export.config import GateSpec, ModelSpec, TrainSpec
from export.nets import TaskNet
from export.pipeline import ExportError, export_model, gate
from export.quantize import variant
from export.tasks import Glucose, Vowels
from export.train import train
from service.repository import read_manifest, version_dirs


@pytest.fixture(scope="module")
def glucose_model():
    task = Glucose()
    spec = ModelSpec(task="glucose", cell="gru", layers=1, hidden_size=16)
    return task, train(task, spec, TrainSpec(steps=40, eval_every=20, batch_size=32, bptt=32), progress=False)


def broken(model_bytes: bytes, precision: str) -> bytes:
    """The real variant, except int8 with its read-out bias shifted: a plausible, wrong model."""
    data = variant(model_bytes, precision)
    if precision != "int8":
        return data
    model = onnx.load_from_string(data)
    for tensor in model.graph.initializer:
        if tensor.name.endswith("head.bias"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + 0.5, tensor.name))
    return model.SerializeToString()


def test_a_broken_variant_is_reported_and_not_published(glucose_model, tmp_path):
    task, result = glucose_model
    report = export_model(
        result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=300, make_variant=broken
    )
    fp32, int8 = report.variants
    assert fp32.published and fp32.verdict == "reference"
    assert not int8.published and int8.verdict.startswith("failed: rmse +")
    assert int8.metrics["rmse"] > fp32.metrics["rmse"] * 1.03
    assert [v for _, v, _ in version_dirs(tmp_path)] == [1]
    manifest = read_manifest(tmp_path / "g" / "1")
    assert manifest.validation["test_rmse"] == fp32.metrics["rmse"]
    assert manifest.validation["gate_max_rmse_increase_pct"] == 3.0
    assert manifest.validation["test_persistence_rmse"] > 0


def test_a_sound_int8_variant_is_published_beside_fp32(glucose_model, tmp_path):
    task, result = glucose_model
    report = export_model(result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=300)
    int8 = report.variants[1]
    assert int8.published == int8.verdict.startswith("passed"), int8.verdict
    assert int8.quantized_nodes == 3  # W x and U h of one explicit GRU layer, and the read-out
    if int8.published:
        assert read_manifest(tmp_path / "g" / "2").precision == "int8"


def test_fp16_is_reported_not_published_without_cuda(glucose_model, tmp_path):
    task, result = glucose_model
    report = export_model(result, task, tmp_path, "g", precisions=("fp32", "fp16"), parity_steps=100)
    fp16 = report.variants[1]
    assert not fp16.published and "needs the CUDA provider" in fp16.verdict
    assert fp16.metrics == {} and not (tmp_path / "g" / "3").exists()


def test_export_refuses_a_graph_that_does_not_match_torch(glucose_model, tmp_path):
    """An exporter bug (the graph computing something other than torch's forward) publishes nothing."""
    task, result = glucose_model

    class Drifting(TaskNet):
        def forward(self, x, state=None):
            out, state = super().forward(x, state)
            return out + 1e-2, state

    drifting = Drifting(
        result.spec,
        2,
        1,
        mean=result.net.mean,
        std=result.net.std,
        output_scale=float(result.net.output_scale),
        output_shift=float(result.net.output_shift),
    )
    drifting.load_state_dict(result.net.state_dict())
    with pytest.raises(ExportError, match="differs from torch"):
        export_model(
            dataclasses.replace(result, net=drifting.eval()),
            task,
            tmp_path,
            "g",
            precisions=("fp32",),
            parity_steps=100,
        )
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    ("metric", "candidate", "reference", "passed"),
    [
        ("perplexity", 5.10, 5.0, True),
        ("perplexity", 5.11, 5.0, False),
        ("rmse", 10.29, 10.0, True),
        ("rmse", 10.31, 10.0, False),
        ("accuracy", 95.0, 96.0, True),
        ("accuracy", 94.9, 96.0, False),
    ],
)
def test_gate_limits(metric, candidate, reference, passed):
    task = type("T", (), {"metric": metric})()
    assert gate(task, GateSpec(), candidate, reference)[0] is passed  # type: ignore[arg-type]


def test_vowels_task_reads_the_ts_files():
    data = Vowels().data
    assert len(data.classes) == 9
    assert {s.shape[1] for s in data.test.sequences} == {12}
    assert 7 <= min(len(s) for s in data.test.sequences) and max(len(s) for s in data.test.sequences) <= 29
    assert len(data.train.sequences) + len(data.validation.sequences) == 270 and len(data.test.sequences) == 370
