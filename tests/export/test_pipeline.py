"""train -> export -> publish -> serve, on real Shakespeare: what the server streams equals torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.config import ModelSpec, TrainSpec
from export.quantize import op_counts
from export.tasks import CharLM
from export.train import load_checkpoint, save_checkpoint, train
from service.client import StreamClient
from service.repository import MODEL_FILE, read_manifest
from tests.conftest import offline_logits, one_hot_text

STREAM_STEPS = 500


@pytest.fixture(scope="module")
def task():
    return CharLM(validation_chars=5_000, test_chars=3_000)


@pytest.fixture(scope="module")
def tiny(task, tmp_path_factory):
    """A small LSTM trained for a few steps, exported, validated and published to a repository of its own."""
    from export.pipeline import export_model

    spec = ModelSpec(task="charlm", cell="lstm", layers=2, hidden_size=32)
    config = TrainSpec(steps=200, batch_size=16, bptt=64, eval_every=50)  # beats the unigram floor
    result = train(task, spec, config, progress=False)
    repo = tmp_path_factory.mktemp("repo")
    report = export_model(result, task, repo, "charlm", precisions=("fp32", "int8"), parity_steps=1000)
    return result, report, repo


def test_training_reduces_held_out_perplexity(tiny, task):
    result, report, _ = tiny
    history = [h["validation_perplexity"] for h in result.history]
    assert history[-1] < history[0] < task.vocab
    assert report.variants[0].metrics["perplexity"] < task.vocab


def test_int8_lstm_is_a_static_step_graph_of_explicit_cells(tiny):
    """The ONNX LSTM op cannot be quantized statically: int8 is the explicit step graph, one step per call."""
    _, report, repo = tiny
    int8 = report.variants[1]
    assert int8.published, int8.verdict
    assert int8.quantized_nodes == 5  # W x and U h of two layers, and the read-out
    assert int8.batch_variance == 0.0
    manifest = read_manifest(repo / "charlm" / str(int8.version))
    assert manifest.input.shape == [-1, 1, manifest.features]
    ops = op_counts((repo / "charlm" / str(int8.version) / MODEL_FILE).read_bytes())
    assert ops["LSTM"] == 0 and ops["DynamicQuantizeLSTM"] == 0 and ops["QuantizeLinear"] > 0


def test_checkpoint_round_trip_is_safetensors(tiny, task, tmp_path):
    result, _, _ = tiny
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, result, task)
    assert path.read_bytes()[8:9] == b"{"  # a JSON header, not a pickle
    loaded, _ = load_checkpoint(path, task)
    assert loaded.spec == result.spec and loaded.history == result.history
    for (name, a), (_, b) in zip(result.net.state_dict().items(), loaded.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_training_is_seeded(task):
    spec = ModelSpec(task="charlm", cell="gru", layers=1, hidden_size=8)
    config = TrainSpec(steps=3, batch_size=4, bptt=8, eval_every=3)
    first, second = (train(CharLM(validation_chars=500), spec, config, progress=False) for _ in range(2))
    for (name, a), (_, b) in zip(first.net.state_dict().items(), second.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


async def test_served_stream_equals_whole_sequence_in_torch_and_onnx(tiny, task, start_server):
    """500 characters of held-out text, one step per message, through a real gRPC server."""
    result, _, repo = tiny
    text = task.corpus.test_text[1000 : 1000 + STREAM_STEPS]
    x = one_hot_text(text, task.corpus.vocabulary)
    with torch.no_grad():
        torch_logits = result.net(torch.from_numpy(x[None]))[0][0].numpy()
    onnx_logits = offline_logits(repo / "charlm" / "1", x)

    app = await start_server(repo)
    async with StreamClient(f"127.0.0.1:{app.port}") as client:
        session = client.session("charlm", "parity", version=1)  # fp32; version 2 is int8
        streamed = np.stack([(await session.step(x[t : t + 1])).outputs["logits"][0] for t in range(len(x))])
    assert streamed.shape == (STREAM_STEPS, task.vocab)
    assert np.abs(streamed - torch_logits).max() <= 1e-4
    assert np.abs(streamed - onnx_logits).max() <= 1e-5


def test_held_out_plays_are_not_in_the_training_text(task):
    train_text = "".join(np.array(list(task.corpus.vocabulary))[task.corpus.train])
    assert task.corpus.test_text[2000:2200] not in train_text


def test_vocabulary_round_trips(task):
    sample = Path(__file__).read_text()[:200]
    decoded = "".join(task.corpus.vocabulary[i] for i in task.corpus.encode(sample))
    assert all(a == b or a not in task.corpus.vocabulary for a, b in zip(sample, decoded, strict=True))
