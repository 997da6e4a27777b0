"""Every shipped model version as a client sees it: the shapes it is told, and answers equal to its graph."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton_aio

from service.api.convert import tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import BatchClient, StepReply
from service.repository import MODEL_FILE, read_manifest, version_dirs
from tests.conftest import SHIPPED_REPO, exchange, logits_of, shipped_versions, step_request


def direct(model: str, version: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph itself on x [B, T, F] from zero state, in one call."""
    directory = SHIPPED_REPO / model / str(version)
    manifest = read_manifest(directory)
    session = ort.InferenceSession(str(directory / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = {s.input: np.zeros([len(x), *s.shape[1:]], np.float32) for s in manifest.state}
    names = [o.name for o in manifest.outputs]
    return dict(zip(names, session.run(names, {manifest.input.name: x, **feeds}), strict=True))


def streamed(model: str, version: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph itself on one session's x [T, F], one step per call, states carried: outputs [T, ...]."""
    directory = SHIPPED_REPO / model / str(version)
    manifest = read_manifest(directory)
    session = ort.InferenceSession(str(directory / MODEL_FILE), providers=["CPUExecutionProvider"])
    states = {s.input: np.zeros([1, *s.shape[1:]], np.float32) for s in manifest.state}
    names = [o.name for o in manifest.outputs] + [s.output for s in manifest.state]
    steps: list[list[np.ndarray]] = []
    for t in range(len(x)):
        values = session.run(names, {manifest.input.name: x[None, t : t + 1], **states})
        steps.append(values[: len(manifest.outputs)])
        states = dict(zip((s.input for s in manifest.state), values[len(manifest.outputs) :], strict=True))
    return {o.name: np.concatenate([step[i][0] for step in steps]) for i, o in enumerate(manifest.outputs)}


@pytest.fixture
async def shipped(start_server):
    return await start_server(SHIPPED_REPO)


@pytest.mark.parametrize("version", [v for p in ("fp32", "int8") for v in shipped_versions("vowels-bilstm", p)])
async def test_the_whole_sequence_classifier_answers_as_its_graph_does(shipped, version):
    """vowels-bilstm: one answer of 9 logits per utterance, int8 (the default) included."""
    x = np.random.default_rng(version).standard_normal((1, 16, 12)).astype(np.float32)
    expected = direct("vowels-bilstm", version, x)["logits"][0]
    target = f"127.0.0.1:{shipped.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await pb_grpc.RnnServeStub(channel).Infer(
            pb.InferRequest(
                model="vowels-bilstm", version=version, input=pb.Tensor(shape=x[0].shape, raw=x[0].tobytes())
            )
        )
    logits = tensor_to_array(reply.outputs["logits"])
    assert logits.shape == (9,)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    async with triton_aio.InferenceServerClient(target) as client:
        tensor = triton_aio.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("vowels-bilstm", [tensor], model_version=str(version))
        metadata = await client.get_model_metadata("vowels-bilstm", str(version))
    assert result.as_numpy("logits").shape == (1, 9)
    assert int(result.as_numpy("logits")[0].argmax()) == int(expected.argmax())
    assert [list(o.shape) for o in metadata.outputs] == [[-1, 9]]


async def test_every_streaming_version_reports_the_chunks_it_accepts_and_takes_them(shipped):
    target = f"127.0.0.1:{shipped.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        listing = await pb_grpc.RnnServeStub(channel).ListModels(pb.ListModelsRequest())
    streaming = [m for m in listing.models if m.streamable]
    shipped = [v for name, v, d in version_dirs(SHIPPED_REPO) if read_manifest(d, verify=False).streamable]
    assert len(streaming) == len(shipped) >= 9
    for info in streaming:
        features = info.inputs[0].shape[2]
        assert list(info.inputs[0].shape) == [-1, -1, features], info.name
        assert all(list(o.shape[:2]) == [-1, -1] for o in info.outputs), info.name
        x = np.random.default_rng(0).random((6, features)).astype(np.float32)
        sid = f"{info.name}-{info.version}"
        (chunk,) = await exchange(target, [step_request(sid, 1, x, model=info.name, start=True, version=info.version)])
        steps = await exchange(
            target,
            [
                step_request(sid + "s", t + 1, x[t : t + 1], model=info.name, start=t == 0, version=info.version)
                for t in range(6)
            ],
        )
        for output in info.outputs:
            whole = tensor_to_array(chunk.outputs[output.name])
            one_by_one = np.concatenate([tensor_to_array(s.outputs[output.name]) for s in steps])
            assert whole.shape[0] == 6
            np.testing.assert_allclose(whole, one_by_one, atol=1e-6, rtol=0, err_msg=sid)


async def test_an_int8_session_served_among_batch_mates_and_raced_to_two_replicas_is_its_own(
    start_server, redis_store_url
):
    """Session s0 steps on replica A in one batch with 15 sessions whose inputs are 50 times larger and, at
    the same time, the same step goes to replica B alone, ten times over. Each step is applied once (the
    other answer is its replay), and every answer equals, bit for bit, the int8 graph run on s0 alone."""
    version = shipped_versions("charlm-lstm", "int8")[-1]
    a, b = [await start_server(SHIPPED_REPO, url=redis_store_url) for _ in range(2)]
    rng = np.random.default_rng(0)
    eye = np.eye(read_manifest(SHIPPED_REPO / "charlm-lstm" / str(version)).features, dtype=np.float32)
    mine = eye[rng.integers(0, len(eye), 11)]
    served: list[np.ndarray] = []
    async with BatchClient(f"127.0.0.1:{a.port}") as gateway:
        for t in range(11):
            inputs = {"s0": mine[t : t + 1]}
            inputs |= {f"m{i}": 50 * rng.standard_normal((1, len(eye))).astype(np.float32) for i in range(15)}
            batched = gateway.step("charlm-lstm", inputs, version=version)
            if t == 0:
                served.append((await batched)["s0"].outputs["logits"][0])
                continue
            alone = exchange(f"127.0.0.1:{b.port}", [step_request("s0", t + 1, mine[t : t + 1], model="charlm-lstm")])
            replies, (other,) = await asyncio.gather(batched, alone)
            reply = replies["s0"]
            assert isinstance(reply, StepReply), reply
            assert sorted([reply.replayed, other.replayed]) == [False, True], (reply, other)
            np.testing.assert_array_equal(reply.outputs["logits"][0], logits_of(other)[0])
            served.append(reply.outputs["logits"][0])
    np.testing.assert_array_equal(np.stack(served), streamed("charlm-lstm", version, mine)["logits"])
    for replica in (a, b):  # the last step resent later, to either replica: its replay
        (resent,) = await exchange(
            f"127.0.0.1:{replica.port}", [step_request("s0", 11, mine[10:11], model="charlm-lstm")]
        )
        assert resent.replayed and np.array_equal(logits_of(resent)[0], served[-1])
