"""Execution providers from configuration, IOBinding, and the fp16 guard, on a machine without a GPU."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import grpc
import pytest
from prometheus_client import CollectorRegistry

from export.quantize import to_fp16
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.models import ModelRegistry
from service.repository import MANIFEST_FILE, MODEL_FILE, RepositoryError
from service.runtime import cuda_usable
from service.server import create_server
from service.settings import RuntimeSettings, Settings
from tests.conftest import TEST_REPO, exchange
from tests.service.test_session_contract import TEXT, assert_matches, steps

pytestmark = pytest.mark.skipif(cuda_usable(0), reason="these tests describe a machine without a usable GPU")


async def test_io_binding_gives_the_same_outputs(start_server, store_url):
    app = await start_server(url=store_url, runtime={"io_binding": True})
    assert_matches(await exchange(f"127.0.0.1:{app.port}", steps("io", 1, len(TEXT))), first=1)


async def test_cuda_asked_for_without_a_gpu_falls_back_to_cpu_and_says_so_once(tmp_path, caplog):
    for version in (1, 2):
        shutil.copytree(TEST_REPO / "charlm" / "1", tmp_path / "charlm" / str(version))
        manifest = json.loads((tmp_path / "charlm" / str(version) / MANIFEST_FILE).read_text())
        (tmp_path / "charlm" / str(version) / MANIFEST_FILE).write_text(json.dumps(manifest | {"version": version}))
    settings = Settings(
        model_repo=tmp_path,
        port=0,
        host="127.0.0.1",
        metrics_port=None,
        runtime={"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
    )
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        app = await create_server(settings, CollectorRegistry())
    try:
        assert [m.runtime.providers[0] for m in app.engine.registry.all()] == ["CPUExecutionProvider"] * 2
        warnings = [r.getMessage() for r in caplog.records if "CUDA" in r.getMessage()]
        assert warnings == ["CUDA was asked for but does not run here; models run on the CPU"]
        labels = app.metrics.model_info.collect()[0].samples
        assert {s.labels["provider"] for s in labels} == {"CPUExecutionProvider"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            listing = await pb_grpc.RnnServeStub(channel).ListModels(pb.ListModelsRequest())
        assert [m.provider for m in listing.models] == ["CPUExecutionProvider"] * 2  # the models API says so too
    finally:
        await app.stop(grace_s=0.1)


def test_an_fp16_variant_is_not_loaded_without_cuda(tmp_path, caplog):
    source = TEST_REPO / "charlm" / "1"
    half = to_fp16((source / MODEL_FILE).read_bytes())
    target = tmp_path / "charlm" / "1"
    target.mkdir(parents=True)
    (target / MODEL_FILE).write_bytes(half)
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    manifest |= {"precision": "fp16", "fingerprint": hashlib.sha256(half).hexdigest()}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level(logging.ERROR), pytest.raises(RepositoryError, match="no servable model version"):
        ModelRegistry.from_repository(tmp_path, RuntimeSettings())
    assert any("needs the CUDA provider" in r.getMessage() for r in caplog.records)
