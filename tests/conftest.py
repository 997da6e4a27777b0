"""Shared fixtures: a real redis-server per test session, real gRPC servers on free ports."""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import trustme
from prometheus_client import CollectorRegistry
from pytest_redis import factories

from bench.process import RedisProcess
from export.data import encode_text
from service.api.convert import tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.repository import MANIFEST_FILE, MODEL_FILE, Precision, read_manifest, versions_of
from service.server import App, create_server
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_REPO = ROOT / "models"
SHIPPED_CHARLM = SHIPPED_REPO / "charlm-lstm"


def shipped_versions(model: str, precision: Precision) -> list[int]:
    """The shipped repository's versions of `model` in `precision`, oldest first."""
    return versions_of(SHIPPED_REPO, model, precision)


def _test_repository() -> Path:
    """charlm/1: the shipped fp32 character LSTM (its newest fp32 version) under a fixed name and version,
    so the tests do not follow the catalog's names and versions (new sessions on the shipped repository
    start on int8)."""
    repo = Path(tempfile.mkdtemp(prefix="rnnserve-tests-"))
    atexit.register(shutil.rmtree, repo, True)
    target = repo / "charlm" / "1"
    target.mkdir(parents=True)
    source = SHIPPED_CHARLM / str(shipped_versions("charlm-lstm", "fp32")[-1])
    shutil.copy(source / MODEL_FILE, target / MODEL_FILE)
    manifest = json.loads((source / MANIFEST_FILE).read_text()) | {"name": "charlm", "version": 1}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    shutil.copy(SHIPPED_CHARLM / "heldout_sample.txt", repo / "charlm" / "heldout_sample.txt")
    return repo


TEST_REPO = _test_repository()

redis_proc = factories.redis_proc(port=None)
redisdb = factories.redisdb("redis_proc")


def redis_url(proc: Any) -> str:
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture
def redis_store_url(redisdb: Any, redis_proc: Any) -> str:
    """A URL of the test session's redis-server; its database is flushed after each test."""
    return redis_url(redis_proc)


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Session-contract tests run on both stores: None is the in-memory store."""
    if request.param == "memory":
        return None
    return str(request.getfixturevalue("redis_store_url"))


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own that syncs every write to disk, to stop and start again."""
    server = RedisProcess(tmp_path, durable=True)
    server.start()
    yield server
    server.close()


ServerFactory = Callable[..., Awaitable[App]]


def redis_certificates(folder: Path) -> Path:
    """`folder`, holding what a TLS redis-server needs (`RedisProcess(tls=folder)`): ca.pem, the CA that
    signed redis.pem and redis.key (for localhost and 127.0.0.1), and other.pem, a CA that signed nothing."""
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other.pem"))
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(folder / "redis.pem"))
    issued.private_key_pem.write_to_path(str(folder / "redis.key"))
    return folder


def server_settings(repo: Path = TEST_REPO, url: str | None = None, **overrides: Any) -> Settings:
    """A test server's settings: loopback, a free port, no /metrics unless asked; None: in-memory store."""
    redis = {"url": url} | overrides.pop("redis", {})
    fields = {"host": "127.0.0.1", "port": 0, "metrics_port": None} | overrides
    return Settings(model_repo=repo, redis=redis, **fields)


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    """start_server(repo, url=None, **settings) -> a running App on a free port; None: in-memory store."""
    apps: list[App] = []

    async def start(repo: Path = TEST_REPO, url: str | None = None, **overrides: Any) -> App:
        app = await create_server(server_settings(repo, url, **overrides), CollectorRegistry())
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(grace_s=0.5)


async def written_then_read(
    target: str, open_call: Callable[[grpc.aio.Channel], Any], messages: Sequence[Any]
) -> list[Any]:
    """Write every message on one stream (`open_call(channel)`), close it, then read every answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = open_call(channel)
        for message in messages:
            await call.write(message)
        await call.done_writing()
        return [answer async for answer in call]


async def written_unread(
    app: App,
    open_call: Callable[[grpc.aio.Channel], Any],
    messages: Sequence[Any],
    low: int,
    high: int,
) -> list[Any]:
    """Write `messages` on a stream (`open_call(channel)`) and read nothing: the server must take between
    `low` and `high` charlm/1 steps, and no more, then answer every message once the client reads.

    The channel does not grow its HTTP/2 window, so the client buffers only about 64 KiB it has not
    read: what the server takes beyond its own limit is what the transport holds."""

    def landed() -> float:
        return app.metrics.steps.labels("charlm", 1)._value.get()

    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
        call = open_call(channel)

        async def send() -> None:
            for message in messages:
                await call.write(message)
            await call.done_writing()

        sending = asyncio.create_task(send())
        async with asyncio.timeout(10):
            while landed() < low:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # time to take more, were it allowed to
        assert low <= landed() <= high
        answers = [answer async for answer in call]
        await sending
    return answers


def one_hot_text(text: str, vocabulary: str) -> np.ndarray:
    return np.eye(len(vocabulary), dtype=np.float32)[encode_text(text, vocabulary)]


def variant_repo(tmp: Path, *, versions: dict[int, str]) -> Path:
    """A repository whose versions are copies of the shipped charlm with distinct fingerprints.

    `versions` maps version -> a tag written into the ONNX doc string: the weights are the same, the
    bytes (and so the fingerprint) differ.
    """
    source = TEST_REPO / "charlm" / "1"
    base = read_manifest(source)
    for version, tag in versions.items():
        model = onnx.load(str(source / MODEL_FILE))
        model.doc_string = f"rnnserve test variant {tag}"
        data = model.SerializeToString()
        target = tmp / "charlm" / str(version)
        target.mkdir(parents=True)
        (target / MODEL_FILE).write_bytes(data)
        manifest = base.model_dump(mode="json") | {
            "version": version,
            "fingerprint": hashlib.sha256(data).hexdigest(),
        }
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    sample = TEST_REPO / "charlm" / "heldout_sample.txt"
    shutil.copy(sample, tmp / "charlm" / sample.name)
    return tmp


async def exchange(target: str, requests: Sequence[pb.StepRequest]) -> list[pb.StepResponse]:
    """Send requests on one Stream, one at a time, each after the previous answer; return the answers."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).Stream()
        answers = []
        for request in requests:
            await call.write(request)
            answers.append(await call.read())
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        return answers


def step_request(
    session_id: str,
    seq: int,
    x: np.ndarray,
    *,
    model: str = "charlm",
    start: bool = False,
    end: bool = False,
    version: int = 0,
) -> pb.StepRequest:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pb.StepRequest(
        model=model,
        version=version,
        session_id=session_id,
        seq=seq,
        start=start,
        end=end,
        input=pb.Tensor(shape=x.shape, raw=x.tobytes()),
    )


def logits_of(response: pb.StepResponse) -> np.ndarray:
    assert not response.HasField("error"), response.error
    return tensor_to_array(response.outputs["logits"])


def offline_logits(version_dir: Path, x: np.ndarray) -> np.ndarray:
    """The model run on the whole sequence [T, F] in one ONNX Runtime call from zero state: [T, V]."""
    manifest = read_manifest(version_dir)
    session = ort.InferenceSession(str(version_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = {s.input: np.zeros([1, *s.shape[1:]], np.float32) for s in manifest.state}
    (logits, *_) = session.run(None, {manifest.input.name: x[None].astype(np.float32), **feeds})
    return np.asarray(logits[0])


def vocabulary(version_dir: Path = TEST_REPO / "charlm" / "1") -> str:
    return str(read_manifest(version_dir).preprocessing.vocabulary)


def held_out_text() -> str:
    return (TEST_REPO / "charlm" / "heldout_sample.txt").read_text()
