"""A bidirectional model answers whole sequences (Infer, ModelInfer) and refuses to stream."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from export.onnx_export import export_graph
from service.api.convert import tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.repository import Manifest, Preprocessing, Provenance, TensorSpec, write_version
from tests.conftest import exchange, step_request

FEATURES, CLASSES = 6, 3


class BiClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(FEATURES, 8, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.head(y)


@pytest.fixture(scope="module")
def bi_repo(tmp_path_factory):
    torch.manual_seed(0)
    net = BiClassifier().eval()
    dynamic = {"x": {0: "batch", 1: "time"}, "scores": {0: "batch", 1: "time"}}
    data = export_graph(net, (torch.zeros(1, 4, FEATURES),), ["x"], ["scores"], dynamic)
    manifest = Manifest(
        name="bi",
        version=1,
        task="classification",
        cell="lstm",
        layers=1,
        hidden_size=8,
        bidirectional=True,
        streamable=False,
        inputs=[TensorSpec(name="x", shape=[-1, -1, FEATURES])],
        outputs=[TensorSpec(name="scores", shape=[-1, -1, CLASSES])],
        state=[],
        preprocessing=Preprocessing(kind="none"),
        validation={},
        fingerprint=hashlib.sha256(data).hexdigest(),
        provenance=Provenance(dataset="random weights", training={}, versions={}, created="test"),
    )
    repo = tmp_path_factory.mktemp("bi")
    write_version(repo, manifest, data)
    return repo, net


async def test_whole_sequences_through_infer_and_model_infer(start_server, bi_repo):
    repo, net = bi_repo
    app = await start_server(repo)
    x = np.random.default_rng(0).standard_normal((7, FEATURES)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x[None]))[0].numpy()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        reply = await pb_grpc.RnnServeStub(channel).Infer(
            pb.InferRequest(model="bi", input=pb.Tensor(shape=x.shape, data=x.ravel()))
        )
    np.testing.assert_allclose(tensor_to_array(reply.outputs["scores"]), expected, atol=1e-5, rtol=0)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        tensor = triton_aio.InferInput("x", [1, *x.shape], "FP32")
        tensor.set_data_from_numpy(x[None])
        result = await client.infer("bi", [tensor])
        np.testing.assert_allclose(result.as_numpy("scores")[0], expected, atol=1e-5, rtol=0)
        config = (await client.get_model_config("bi")).config
        assert not config.HasField("sequence_batching")
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("bi", [tensor], sequence_id=1, sequence_start=True)
        assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "ModelInfer without sequence_id" in refused.value.message()


async def test_streaming_a_bidirectional_model_is_refused(start_server, bi_repo):
    app = await start_server(bi_repo[0])
    (response,) = await exchange(
        f"127.0.0.1:{app.port}", [step_request("s", 1, np.zeros((1, FEATURES)), model="bi", start=True)]
    )
    assert response.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "needs the whole sequence" in response.error.message
