"""The gate, decided on validation: a variant worse than fp32 beyond its limit, whose answers depend on its
batch-mates, or a model no better than the task's floor, is reported with its numbers and not published."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import onnx
import pytest
import torch
from onnx import numpy_helper

from export.config import GateSpec, ModelSpec, TrainSpec
from export.nets import TaskNet
from export.pipeline import ExportError, export_model, gate
from export.quantize import variant
from export.tasks import Glucose, Vowels
from export.train import train
from service.repository import MODEL_FILE, RepositoryError, next_version, read_manifest, version_dirs, write_version
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def glucose_model():
    task = Glucose()
    spec = ModelSpec(task="glucose", cell="gru", layers=1, hidden_size=32)
    config = TrainSpec(steps=300, eval_every=100, batch_size=32, bptt=32, learning_rate=3e-3)
    return task, train(task, spec, config, progress=False)  # beats persistence on validation


def shifted(amount: float):
    """The real variants, except int8 made with its read-out bias shifted by `amount`."""

    def make(model_bytes: bytes, precision: str, calibration) -> bytes:
        if precision == "int8":
            model = onnx.load_from_string(model_bytes)
            biases = [t for t in model.graph.initializer if t.name.endswith("head.bias")]
            assert biases
            for tensor in biases:
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + amount, tensor.name))
            model_bytes = model.SerializeToString()
        return variant(model_bytes, precision, calibration)

    return make


broken = shifted(0.5)  # a plausible, wrong model


def test_a_broken_variant_is_reported_and_not_published(glucose_model, tmp_path):
    task, result = glucose_model
    report = export_model(
        result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=300, make_variant=broken
    )
    fp32, int8 = report.variants
    assert fp32.published and fp32.verdict == "reference"
    assert not int8.published and int8.verdict.startswith("failed: rmse +")
    assert int8.validation["rmse"] > fp32.validation["rmse"] * 1.03  # decided on validation
    assert f"{(int8.validation['rmse'] / fp32.validation['rmse'] - 1) * 100:+.2f} %" in int8.verdict
    assert [v for _, v, _ in version_dirs(tmp_path)] == [1]
    manifest = read_manifest(tmp_path / "g" / "1")
    assert manifest.validation["test_rmse"] == fp32.metrics["rmse"]  # test: reported
    assert manifest.validation["validation_rmse"] == fp32.validation["rmse"]
    assert manifest.validation["gate_max_rmse_increase_pct"] == 3.0
    assert (
        manifest.validation["validation_rmse_floor"]
        == task.floor("validation")
        > manifest.validation["validation_rmse"]
    )
    assert manifest.lineage == manifest.fingerprint


def test_a_sound_int8_variant_is_published_beside_fp32(glucose_model, tmp_path):
    task, result = glucose_model
    report = export_model(result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=300)
    int8 = report.variants[1]
    assert int8.published == int8.verdict.startswith("passed"), int8.verdict
    assert int8.quantized_nodes == 2  # U h of the explicit GRU layer, and the read-out (W x: 2 raw features)
    assert int8.published, int8.verdict
    assert int8.batch_variance == 0.0 and "saturation-free" in int8.verdict
    manifest = read_manifest(tmp_path / "g" / "2")
    assert manifest.precision == "int8" and manifest.lineage == read_manifest(tmp_path / "g" / "1").fingerprint
    assert manifest.provenance.quantization is not None
    assert manifest.provenance.quantization["calibration_method"] == "MinMax"
    assert "from the training split" in manifest.provenance.quantization["calibration_data"]


def test_per_call_quantization_is_refused_as_not_batch_invariant(glucose_model, tmp_path):
    """int8-dynamic (a batch shares its activation scale) passes the accuracy limits and is still refused."""
    task, result = glucose_model
    report = export_model(result, task, tmp_path, "g", precisions=("fp32", "int8-dynamic"), parity_steps=100)
    dynamic = report.variants[1]
    assert not dynamic.published and dynamic.verdict.startswith("failed:")
    assert dynamic.batch_variance > 0 and "not batch-invariant" in dynamic.verdict
    assert "per-call quantization" in dynamic.verdict
    assert [v for _, v, _ in version_dirs(tmp_path)] == [1]


def test_a_model_no_better_than_the_floor_publishes_nothing(tmp_path):
    task = Glucose()
    spec = ModelSpec(task="glucose", cell="gru", layers=1, hidden_size=4)
    useless = train(task, spec, TrainSpec(steps=2, eval_every=1, batch_size=4, bptt=8), progress=False)
    with pytest.raises(ExportError, match="does not beat the floor"):
        export_model(useless, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=100)
    assert not (tmp_path / "g").exists()


def test_fp16_is_reported_not_published_without_cuda(glucose_model, tmp_path):
    task, result = glucose_model
    report = export_model(result, task, tmp_path, "g", precisions=("fp32", "fp16"), parity_steps=100)
    fp16 = report.variants[1]
    assert not fp16.published and "needs the CUDA provider" in fp16.verdict
    assert fp16.metrics == {} and [v for _, v, _ in version_dirs(tmp_path)] == [1]


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
        first_gap=float(result.net.first_gap),
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


def test_versions_are_immutable_and_each_export_takes_the_next_numbers(glucose_model, tmp_path):
    """A re-export never writes over a version; the newest version is the newest lineage's best gated
    variant, so a new fp32 whose int8 fails its gate is newer than the old model's int8."""
    task, result = glucose_model
    export_model(result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=100)
    first = {v: (d / MODEL_FILE).read_bytes() for _, v, d in version_dirs(tmp_path)}
    assert sorted(first) == [1, 2]

    rerun = export_model(result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=100)
    assert [(v.version, v.published) for v in rerun.variants] == [(1, True), (2, True)]
    assert "already published as version 2" in rerun.variants[1].verdict
    assert sorted(v for _, v, _ in version_dirs(tmp_path)) == [1, 2]

    # Only int8 differs (a new quantizer, say): the whole set again, so int8 stays newer than its fp32.
    nudged = export_model(
        result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=100, make_variant=shifted(1e-4)
    )
    assert [(v.version, v.published) for v in nudged.variants] == [(3, True), (4, True)]
    assert read_manifest(tmp_path / "g" / "3").fingerprint == read_manifest(tmp_path / "g" / "1").fingerprint

    retrained = copy.deepcopy(result.net)
    with torch.no_grad():
        retrained.head.bias += 1e-3  # other weights: a new lineage
    second = export_model(
        dataclasses.replace(result, net=retrained),
        task,
        tmp_path,
        "g",
        precisions=("int8", "fp32"),  # judged and numbered fp32 first whatever the order asked
        parity_steps=100,
        make_variant=broken,
    )
    assert [(v.precision, v.version, v.published) for v in second.variants] == [("fp32", 5, True), ("int8", 0, False)]
    assert {v: (d / MODEL_FILE).read_bytes() for _, v, d in version_dirs(tmp_path) if v in (1, 2)} == first
    old, new = read_manifest(tmp_path / "g" / "4"), read_manifest(tmp_path / "g" / "5")
    assert new.lineage == new.fingerprint == second.lineage != old.lineage
    assert max(v for _, v, _ in version_dirs(tmp_path)) == 5 and new.precision == "fp32"

    with pytest.raises(RepositoryError, match="versions are immutable; publish under the next free number \\(6\\)"):
        write_version(tmp_path, old, (tmp_path / "g" / "4" / MODEL_FILE).read_bytes())


def test_an_export_racing_another_for_its_numbers_numbers_again(glucose_model, tmp_path, monkeypatch):
    """A rival export publishes version 2 after this one counted 1 as free: this one collides on its highest
    number before publishing anything, counts again, and publishes its set as 3 and 4, int8 newest."""
    task, result = glucose_model
    rival = tmp_path / "g" / "2"
    counted = iter([1])

    def stale_then_true(repo, name):
        stale = next(counted, None)
        if stale is None:
            return next_version(repo, name)
        shutil.copytree(tmp_path / "seed" / "g" / "1", rival)  # the rival's version lands meanwhile
        return stale

    export_model(result, task, tmp_path / "seed", "g", precisions=("fp32",), parity_steps=100)
    rival_bytes = (tmp_path / "seed" / "g" / "1" / MODEL_FILE).read_bytes()
    monkeypatch.setattr("export.pipeline.next_version", stale_then_true)
    report = export_model(result, task, tmp_path, "g", precisions=("fp32", "int8"), parity_steps=100)
    assert [(v.precision, v.version, v.published) for v in report.variants] == [("fp32", 3, True), ("int8", 4, True)]
    assert sorted(v for _, v, _ in version_dirs(tmp_path)) == [2, 3, 4]
    assert (rival / MODEL_FILE).read_bytes() == rival_bytes  # untouched


def test_an_export_that_would_break_the_name_s_clients_is_refused(glucose_model, tmp_path):
    task, result = glucose_model
    shutil.copytree(ROOT / "models" / "charlm-rnn", tmp_path / "charlm-rnn")
    shipped = sorted(v for _, v, _ in version_dirs(tmp_path))
    with pytest.raises(ExportError, match=f"charlm-rnn/{shipped[-1]} is a language_model model taking 84 features"):
        export_model(result, task, tmp_path, "charlm-rnn", precisions=("fp32",), parity_steps=100)
    assert sorted(v for _, v, _ in version_dirs(tmp_path)) == shipped  # nothing published


def test_only_ascii_numbers_an_int64_holds_name_versions(tmp_path):
    for odd in ("9" * 16, "²", "١٢", "-3"):
        (tmp_path / "m" / odd).mkdir(parents=True)
    assert version_dirs(tmp_path) == [] and next_version(tmp_path, "m") == 1


def test_a_deleted_versions_number_is_never_published_again(tmp_path):
    """Clients may have pinned a number: after its version is deleted, the next export takes a new one."""
    shipped = ROOT / "models" / "charlm-rnn" / "8"
    manifest = read_manifest(shipped)
    write_version(tmp_path, manifest.model_copy(update={"version": 7}), (shipped / MODEL_FILE).read_bytes())
    assert next_version(tmp_path, "charlm-rnn") == 8
    shutil.rmtree(tmp_path / "charlm-rnn" / "7")
    assert version_dirs(tmp_path) == []  # the mark is never taken for a version
    assert next_version(tmp_path, "charlm-rnn") == 8
    write_version(tmp_path, manifest.model_copy(update={"version": 3}), (shipped / MODEL_FILE).read_bytes())
    assert next_version(tmp_path, "charlm-rnn") == 8  # a lower number published by hand lowers nothing
