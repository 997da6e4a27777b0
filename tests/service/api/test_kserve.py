"""Existing Triton clients, unchanged, against rnnserve: the real `tritonclient[grpc]`, sync and asyncio.

The sync client blocks, and the server runs on the test's event loop: sync calls go to a thread.
"""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.process import ServerProcess, free_port
from tests.conftest import (
    TEST_REPO,
    exchange,
    held_out_text,
    logits_of,
    offline_logits,
    one_hot_text,
    step_request,
    vocabulary,
    written_unread,
)

V1 = TEST_REPO / "charlm" / "1"
VOCAB = vocabulary()
FEATURES = len(VOCAB)


def text_of(i: int, length: int) -> str:
    return held_out_text()[i * 37 : i * 37 + length]


def step_input(x: np.ndarray) -> list[triton.InferInput]:
    """x [T, F] as Triton's batched input [1, T, F]."""
    tensor = triton.InferInput("x", [1, *x.shape], "FP32")
    tensor.set_data_from_numpy(x[None].astype(np.float32))
    return [tensor]


def test_metadata_calls(start_server_sync):
    url = start_server_sync()
    client = triton.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("charlm") and client.is_model_ready("charlm", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("charlm", "7")
    server = client.get_server_metadata()
    assert server.name == "rnnserve"
    assert {"sequence", "sequence(string_id)"} <= set(server.extensions)
    metadata = client.get_model_metadata("charlm")
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        "charlm",
        ["1"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, -1, FEATURES])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("logits", "FP32", [-1, -1, FEATURES])]
    config = client.get_model_config("charlm").config
    assert config.max_batch_size == 256
    assert list(config.input[0].dims) == [-1, FEATURES]
    assert config.sequence_batching.max_sequence_idle_microseconds == 3600 * 1_000_000
    assert [s.input_name for s in config.sequence_batching.state] == ["h0", "h1", "c0", "c1"]
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [("charlm", "1", "READY")]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("nope")
    assert "StatusCode.NOT_FOUND" in str(missing.value.status())
    client.close()


def test_fifty_sequences_interleaved_on_one_stream(start_server_sync, native_target, store_url):
    """Equal to an offline run of each sequence, and to the native API streaming the same text."""
    url = start_server_sync(url=store_url)
    texts = {1000 + i: text_of(i, 8) for i in range(50)}
    rng = np.random.default_rng(11)
    position = dict.fromkeys(texts, 0)
    order = []
    while position:
        sid = int(rng.choice(sorted(position)))
        order.append((sid, position[sid]))
        position[sid] += 1
        if position[sid] == len(texts[sid]):
            del position[sid]
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client = triton.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for sid, t in order:
        x = one_hot_text(texts[sid][t], VOCAB)
        client.async_stream_infer(
            "charlm",
            step_input(x),
            request_id=f"{sid}:{t}",
            sequence_id=sid,
            sequence_start=t == 0,
            sequence_end=t == len(texts[sid]) - 1,
        )
    got: dict[tuple[int, int], np.ndarray] = {}
    for _ in order:
        result, error = results.get(timeout=30)
        assert error is None, error
        sid, t = map(int, result.get_response().id.split(":"))
        got[(sid, t)] = result.as_numpy("logits")[0, 0]
    client.stop_stream()
    client.close()
    for sid, text in texts.items():
        streamed = np.stack([got[(sid, t)] for t in range(len(text))])
        np.testing.assert_allclose(streamed, offline_logits(V1, one_hot_text(text, VOCAB)), atol=1e-5, rtol=0)
    sid, text = 1007, texts[1007]
    native = asyncio.run(native_target(sid, text))
    np.testing.assert_allclose(np.stack([got[(sid, t)] for t in range(len(text))]), native, atol=1e-6, rtol=0)


async def test_asyncio_client_streams_with_string_ids(start_server, store_url):
    app = await start_server(url=store_url)
    texts = {f"sensor/{i}": text_of(i, 6) for i in range(5)}

    async def requests():
        for t in range(6):
            for sid, text in texts.items():
                yield {
                    "model_name": "charlm",
                    "inputs": step_input(one_hot_text(text[t], VOCAB)),
                    "sequence_id": sid,
                    "sequence_start": t == 0,
                    "sequence_end": t == 5,
                    "request_id": f"{sid}|{t}",
                }

    got = {}
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            sid, t = result.get_response().id.split("|")
            got[(sid, int(t))] = result.as_numpy("logits")[0, 0]
    for sid, text in texts.items():
        streamed = np.stack([got[(sid, t)] for t in range(6)])
        np.testing.assert_allclose(streamed, offline_logits(V1, one_hot_text(text, VOCAB)), atol=1e-5, rtol=0)


async def test_unary_sequence_steps_and_whole_sequences(start_server, store_url):
    app = await start_server(url=store_url)
    text = text_of(3, 10)
    x = one_hot_text(text, VOCAB)
    expected = offline_logits(V1, x)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        first = await client.infer("charlm", step_input(x[:4]), sequence_id=42, sequence_start=True)
        rest = [
            (await client.infer("charlm", step_input(x[t : t + 1]), sequence_id=42, sequence_end=t == 9))
            for t in range(4, 10)
        ]
        whole = await client.infer("charlm", step_input(x))  # no sequence: fresh state, nothing kept
        asked = await client.infer("charlm", step_input(x[:2]), outputs=[triton_aio.InferRequestedOutput("logits")])
    streamed = np.concatenate([first.as_numpy("logits")[0]] + [r.as_numpy("logits")[0] for r in rest])
    np.testing.assert_allclose(streamed, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(whole.as_numpy("logits")[0], expected, atol=1e-5, rtol=0)
    assert asked.as_numpy("logits").shape == (1, 2, FEATURES)


async def test_typed_contents_and_batches_without_a_sequence(start_server):
    """FP32 in InferTensorContents (not raw bytes), a batch of two sequences, through tritonclient's stubs."""
    app = await start_server()
    a, b = one_hot_text(text_of(1, 5), VOCAB), one_hot_text(text_of(2, 5), VOCAB)
    batch = np.stack([a, b])
    request = service_pb2.ModelInferRequest(model_name="charlm", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=batch.shape)
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        response = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.id == "typed" and response.outputs[0].datatype == "FP32"
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(logits[0], offline_logits(V1, a), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[1], offline_logits(V1, b), atol=1e-5, rtol=0)


async def test_statistics_count_inferences(start_server):
    app = await start_server()
    x = one_hot_text(text_of(0, 3), VOCAB)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        for _ in range(3):
            await client.infer("charlm", step_input(x))
        with pytest.raises(InferenceServerException):
            await client.infer("charlm", step_input(x[:, :5]))
        stats = (await client.get_inference_statistics("charlm")).model_stats[0]
    assert (stats.name, stats.version, stats.inference_count, stats.execution_count) == ("charlm", "1", 3, 3)
    assert stats.inference_stats.success.count == 3 and stats.inference_stats.fail.count == 1
    assert stats.last_inference > 0


ERRORS = [
    ("unknown model", dict(model_name="nope"), "StatusCode.NOT_FOUND", "no model 'nope'"),
    ("odd version", dict(model_version="²"), "StatusCode.INVALID_ARGUMENT", "is not a positive integer"),
    (
        "wrong shape",
        dict(x=np.zeros((1, 3, 7), np.float32)),
        "StatusCode.INVALID_ARGUMENT",
        "unexpected shape for input 'x' for model 'charlm'. Expected [-1,-1,84], got [1, 3, 7]",
    ),
    ("missing start", dict(sequence_id=777), "StatusCode.NOT_FOUND", "must specify the START flag"),
    (
        "batch in a sequence",
        dict(x=np.zeros((2, 1, FEATURES), np.float32), sequence_id=5, sequence_start=True),
        "StatusCode.INVALID_ARGUMENT",
        "must specify batch-size 1",
    ),
]


def _infer_args(case: dict) -> tuple[str, list[triton.InferInput], dict]:
    x = case.get("x", one_hot_text("a", VOCAB)[None])
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    kwargs = {k: v for k, v in case.items() if k in ("sequence_id", "sequence_start", "model_version")}
    return case.get("model_name", "charlm"), [tensor], kwargs


@pytest.mark.parametrize(("name", "case", "status", "message"), ERRORS, ids=[e[0] for e in ERRORS])
async def test_unary_errors(start_server, name, case, status, message):
    app = await start_server()
    model, inputs, kwargs = _infer_args(case)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer(model, inputs, **kwargs)
    assert info.value.status() == status
    assert message in info.value.message()


@pytest.mark.parametrize(("name", "case", "status", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_stream_errors_are_in_band_and_the_stream_stays_open(start_server_sync, name, case, status, message):
    url = start_server_sync()
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client = triton.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    model, inputs, kwargs = _infer_args(case)
    client.async_stream_infer(model, inputs, **kwargs)
    result, error = results.get(timeout=10)
    assert result is None and message in error.message()
    client.async_stream_infer("charlm", step_input(one_hot_text("b", VOCAB)), sequence_id=9, sequence_start=True)
    result, error = results.get(timeout=10)
    assert error is None and result.as_numpy("logits").shape == (1, 1, FEATURES)
    client.stop_stream()
    client.close()


def test_triton_grpc_error_header_ends_the_stream_with_a_status(start_server_sync):
    url = start_server_sync()
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client = triton.InferenceServerClient(url)
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), headers={"triton_grpc_error": "true"}
    )
    model, inputs, kwargs = _infer_args(next(e[1] for e in ERRORS if e[0] == "missing start"))
    client.async_stream_infer(model, inputs, **kwargs)
    result, error = results.get(timeout=10)
    assert result is None
    assert error.status() == "StatusCode.NOT_FOUND" and "must specify the START flag" in error.message()
    with pytest.raises(InferenceServerException, match="no longer in valid state"):
        client.async_stream_infer("charlm", step_input(one_hot_text("b", VOCAB)))
    client.stop_stream()
    client.close()


def test_sequence_continues_after_the_server_is_killed_and_restarted(redis_store_url):
    text = text_of(5, 30)
    x = one_hot_text(text, VOCAB)
    port = free_port()
    url = f"127.0.0.1:{port}"
    first = ServerProcess.rnnserve(port, TEST_REPO, redis_store_url)
    first.start()
    second = ServerProcess.rnnserve(port, TEST_REPO, redis_store_url)
    try:
        client = triton.InferenceServerClient(url)
        got = [
            client.infer("charlm", step_input(x[t : t + 1]), sequence_id="kill-me", sequence_start=t == 0).as_numpy(
                "logits"
            )[0, 0]
            for t in range(15)
        ]
        client.close()
        first.kill()
        second.start()
        client = triton.InferenceServerClient(url)
        got += [
            client.infer("charlm", step_input(x[t : t + 1]), sequence_id="kill-me", sequence_end=t == 29).as_numpy(
                "logits"
            )[0, 0]
            for t in range(15, 30)
        ]
        client.close()
    finally:
        second.stop()
    np.testing.assert_allclose(np.stack(got), offline_logits(V1, x), atol=1e-5, rtol=0)


@pytest.fixture
def start_server_sync():
    """For tests that drive the blocking client: a server on a loop in a thread of its own."""
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    apps = []

    def start(**overrides):
        from prometheus_client import CollectorRegistry

        from service.server import create_server
        from tests.conftest import server_settings

        settings = server_settings(**overrides)
        app = asyncio.run_coroutine_threadsafe(create_server(settings, CollectorRegistry()), loop).result(60)
        apps.append(app)
        return f"127.0.0.1:{app.port}"

    yield start
    for app in apps:
        asyncio.run_coroutine_threadsafe(app.stop(grace_s=0.5), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def native_target(start_server_sync):
    """Stream a text through the native API of a fresh server: logits [T, V]."""
    url = start_server_sync()

    async def run(sid: int, text: str) -> np.ndarray:
        x = one_hot_text(text, VOCAB)
        requests = [step_request(f"native-{sid}", t + 1, x[t : t + 1], start=t == 0) for t in range(len(text))]
        return np.stack([logits_of(r)[0] for r in await exchange(url, requests)])

    return run


async def test_a_sequence_reports_the_version_it_is_pinned_to(start_server, tmp_path):
    from tests.conftest import variant_repo

    app = await start_server(variant_repo(tmp_path, versions={1: "a", 2: "b"}))
    x = one_hot_text(text_of(4, 3), VOCAB)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        first = await client.infer("charlm", step_input(x[:1]), sequence_id=7, sequence_start=True, model_version="1")
        later = await client.infer("charlm", step_input(x[1:2]), sequence_id=7)  # no version: the pinned one
        fresh = await client.infer("charlm", step_input(x[:1]), sequence_id=8, sequence_start=True)
    assert first.get_response().model_version == "1"
    assert later.get_response().model_version == "1"
    assert fresh.get_response().model_version == "2"


async def test_any_string_sequence_id_works(start_server):
    """Triton takes any string as a sequence id; rnnserve percent-encodes it onto its session ids."""
    app = await start_server()
    x = one_hot_text(text_of(6, 4), VOCAB)
    odd = "user {17} é/42"
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        got = [
            (await client.infer("charlm", step_input(x[t : t + 1]), sequence_id=odd, sequence_start=t == 0)).as_numpy(
                "logits"
            )[0, 0]
            for t in range(4)
        ]
        with pytest.raises(InferenceServerException) as too_long:
            await client.infer("charlm", step_input(x[:1]), sequence_id="é" * 30, sequence_start=True)
    np.testing.assert_allclose(np.stack(got), offline_logits(V1, x), atol=1e-5, rtol=0)
    assert too_long.value.status() == "StatusCode.INVALID_ARGUMENT"


async def test_an_in_band_error_names_the_request_it_answers(start_server):
    """Clients pair answers with requests by id (answers of different sequences come in any order)."""
    app = await start_server()
    good = service_pb2.ModelInferRequest(model_name="charlm", id="good-1")
    tensor = good.inputs.add(name="x", datatype="FP32", shape=[1, 1, FEATURES])
    tensor.contents.fp32_contents.extend(one_hot_text("a", VOCAB).ravel().tolist())
    bad = service_pb2.ModelInferRequest(model_name="nope", model_version="3", id="bad-7")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        for request in (bad, good):
            await call.write(request)
        await call.done_writing()
        answers = {r.infer_response.id: r async for r in call}
    assert set(answers) == {"bad-7", "good-1"}
    assert "no model 'nope/3'" in answers["bad-7"].error_message
    assert (answers["bad-7"].infer_response.model_name, answers["bad-7"].infer_response.model_version) == ("nope", "3")
    assert not answers["good-1"].error_message


async def test_a_triton_client_that_does_not_read_holds_a_bounded_number_of_time_steps(start_server):
    """40 sequence requests of 64 time steps each, written and not read: the stream takes about 512 time
    steps' worth (8 requests, each counted as rows × time steps) and waits; every one is answered, in
    order, once the client reads."""
    app = await start_server(max_inflight_per_stream=512)
    chunk = np.eye(FEATURES, dtype=np.float32)[[t % FEATURES for t in range(64)]]

    def request(i: int) -> service_pb2.ModelInferRequest:
        message = service_pb2.ModelInferRequest(model_name="charlm", id=str(i))
        message.parameters["sequence_id"].int64_param = 7
        message.parameters["sequence_start"].bool_param = i == 0
        message.inputs.add(name="x", datatype="FP32", shape=[1, 64, FEATURES])
        message.raw_input_contents.append(chunk.tobytes())
        return message

    answers = await written_unread(
        app,
        lambda channel: service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(),
        [request(i) for i in range(40)],
        8,
        12,
    )
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(40)]
    assert not any(a.error_message for a in answers)
