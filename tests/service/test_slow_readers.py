"""Clients that write and never read: the server's memory (its RSS, measured from /proc) stays bounded by
the per-stream limit (and gRPC's transport buffers), whatever the clients try to send."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np

from bench.process import ServerProcess, free_port, rss_mb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import CHANNEL_OPTIONS
from tests.conftest import TEST_REPO, step_request, vocabulary

STREAMS = 8
CHUNK = np.eye(len(vocabulary()), dtype=np.float32)[[t % len(vocabulary()) for t in range(1024)]]


async def _write_without_reading(target: str, messages: int, pid: int) -> tuple[int, float]:
    """Each stream writes its chunks (one session each) until a write has waited 3 s; returns the number
    written, and the server's RSS while it holds them (the streams still open). Nothing is read."""
    written = 0

    async def one(k: int, channel: grpc.aio.Channel) -> None:
        nonlocal written
        call = pb_grpc.RnnServeStub(channel).Stream()
        for seq in range(1, messages + 1):
            try:
                await asyncio.wait_for(call.write(step_request(f"reader-{k}", seq, CHUNK, start=seq == 1)), 3)
            except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return
            written += 1

    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(STREAMS)]
    try:
        await asyncio.gather(*(one(k, channel) for k, channel in enumerate(channels)))
        await asyncio.sleep(2)  # whatever the server took is computed and held by now
        return written, rss_mb(pid)
    finally:
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()


async def _one_chunk(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).Stream()
        await call.write(step_request("warm", 1, CHUNK, start=True))
        answer = await call.read()
        assert not answer.HasField("error")
        await call.done_writing()


def test_a_server_holds_bounded_memory_for_clients_that_never_read(tmp_path, capsys):
    """Two rounds of 8 streams that write and never read, the second offering ten times the first: the
    memory the server holds for them while they stay open (its limit's worth of steps a stream, plus what
    gRPC's transport buffers) does not grow with what they offer. (Both rounds fill what the server takes,
    so the difference between them is the allocator's noise, which reached 120 MB here: the offer grows by
    about 1 GB.)"""
    port = free_port()
    server = ServerProcess.rnnserve(port, TEST_REPO, None, metrics_port=0, log=tmp_path / "log")
    server.start()
    try:
        assert server.process is not None
        pid = server.process.pid
        target = f"127.0.0.1:{port}"
        asyncio.run(_one_chunk(target))
        started = rss_mb(pid)
        rounds = [(offered, *asyncio.run(_write_without_reading(target, offered, pid))) for offered in (40, 400)]
    finally:
        server.kill()
    with capsys.disabled():
        for offered, written, held in rounds:
            megabytes = STREAMS * offered * CHUNK.nbytes / 2**20
            print(
                f"\n{STREAMS} streams offered {STREAMS * offered} chunks ({megabytes:.0f} MB): {written} taken "
                f"or buffered; server RSS {started:.0f} MB at rest, {held:.0f} MB holding them"
            )
    # The client's count includes what its own gRPC core and both kernels buffer: reported, not judged.
    # The server's memory is: offered ten times as much, it held about the same.
    (small, _, held_small), (large, _, held_large) = rounds
    offered_more = STREAMS * (large - small) * CHUNK.nbytes / 2**20
    assert held_large - held_small < offered_more / 4
