"""train -> export -> publish -> serve, on real Shakespeare: what the server streams equals torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.charlm import build_manifest
from export.data import load_shakespeare
from export.nets import CharLMConfig
from export.onnx_export import export_step_graph, parity
from export.train import TrainConfig, load_checkpoint, save_checkpoint, train_charlm
from service.client import StreamClient
from service.repository import RepositoryError, read_manifest, write_version
from tests.conftest import offline_logits, one_hot_text

STREAM_STEPS = 500


@pytest.fixture(scope="module")
def corpus():
    return load_shakespeare()


@pytest.fixture(scope="module")
def tiny(corpus, tmp_path_factory):
    """A small LSTM trained for a few steps, exported and published to a repository of its own."""
    config = CharLMConfig(vocab_size=len(corpus.vocabulary), hidden_size=32, layers=2)
    train = TrainConfig(steps=20, batch_size=16, bptt=64, eval_every=20)
    result = train_charlm(corpus, config, train)
    model_bytes = export_step_graph(result.net)
    manifest = build_manifest(
        version=1,
        config=config,
        vocabulary=corpus.vocabulary,
        model_bytes=model_bytes,
        validation={"validation_perplexity": result.validation_perplexity},
        train=train,
    )
    repo = tmp_path_factory.mktemp("repo")
    write_version(repo, manifest, model_bytes)
    return result.net, model_bytes, repo


def test_training_reduces_held_out_perplexity(tiny, corpus):
    net, _, _ = tiny
    assert net.config.hidden_size == 32
    assert read_manifest(tiny[2] / "charlm" / "1").validation["validation_perplexity"] < len(
        corpus.vocabulary
    )


def test_onnx_matches_torch_and_streaming_matches_whole(tiny, corpus):
    net, model_bytes, _ = tiny
    checks = parity(net, model_bytes, corpus.test[:300])
    assert checks["parity_onnx_vs_torch"] <= 1e-5
    assert checks["parity_streamed_vs_whole"] <= 1e-5


def test_checkpoint_round_trip_is_safetensors(tiny, tmp_path):
    net, _, _ = tiny
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, net, TrainConfig())
    assert path.read_bytes()[8:9] == b"{"  # a JSON header, not a pickle
    loaded = load_checkpoint(path)
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


async def test_served_stream_equals_whole_sequence_in_torch_and_onnx(tiny, corpus, start_server):
    """500 characters of held-out text, one step per message, through a real gRPC server."""
    net, _, repo = tiny
    text = corpus.test_text[1000 : 1000 + STREAM_STEPS]
    x = one_hot_text(text, corpus.vocabulary)
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(x[None]))[0][0].numpy()
    onnx_logits = offline_logits(repo / "charlm" / "1", x)

    app = await start_server(repo)
    async with StreamClient(f"127.0.0.1:{app.port}") as client:
        session = client.session("charlm", "parity")
        streamed = np.stack([(await session.step(x[t : t + 1])).outputs["logits"][0] for t in range(len(x))])
    assert streamed.shape == (STREAM_STEPS, len(corpus.vocabulary))
    assert np.abs(streamed - torch_logits).max() <= 1e-4
    assert np.abs(streamed - onnx_logits).max() <= 1e-5


def test_repository_refuses_a_model_that_does_not_match_its_fingerprint(tiny, tmp_path):
    _, model_bytes, repo = tiny
    manifest = read_manifest(repo / "charlm" / "1")
    with pytest.raises(RepositoryError, match="not the sha256"):
        write_version(tmp_path, manifest, model_bytes + b"\0")
    target = write_version(tmp_path, manifest, model_bytes)
    (target / "model.onnx").write_bytes(model_bytes[:-1] + b"\0")
    with pytest.raises(RepositoryError, match="differs from the manifest's fingerprint"):
        read_manifest(target)


def test_manifest_refuses_a_streamable_bidirectional_model(tiny):
    manifest = read_manifest(tiny[2] / "charlm" / "1")
    with pytest.raises(ValueError, match="bidirectional"):
        type(manifest).model_validate(manifest.model_dump() | {"bidirectional": True})


def test_held_out_plays_are_not_in_the_training_text(corpus):
    train_text = "".join(np.array(list(corpus.vocabulary))[corpus.train[: len(corpus.train)]])
    assert corpus.test_text[2000:2200] not in train_text


def test_vocabulary_round_trips(corpus):
    sample = Path(__file__).read_text()[:200]
    decoded = "".join(corpus.vocabulary[i] for i in corpus.encode(sample))
    assert all(a == b or a not in corpus.vocabulary for a, b in zip(sample, decoded, strict=True))
