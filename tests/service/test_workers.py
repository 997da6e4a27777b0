"""`rnnserve serve --workers N`: N processes on one port, sessions handed between them through Redis, one
/metrics for all, a dead worker restarted, SIGTERM draining every one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.process import ROOT, RedisProcess, ServerProcess, free_port
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import CHANNEL_OPTIONS, BatchClient, StepReply
from service.server import SIBLINGS_STARTING
from service.settings import LARGE_BATCH_ROWS, RedisSettings, RuntimeSettings, Settings
from service.workers import METRICS_DIR_PREFIX, _sweep_metrics_dirs, runtime_placed, usable_cpus
from tests.conftest import (
    TEST_REPO,
    exchange,
    held_out_text,
    logits_of,
    offline_logits,
    one_hot_text,
    step_request,
    vocabulary,
)

X = one_hot_text(held_out_text()[:400], vocabulary())
EXPECTED = offline_logits(TEST_REPO / "charlm" / "1", X)
TOLERANCE = 1e-5


async def one_step(target: str, seq: int) -> tuple[int, np.ndarray]:
    """One step on a connection of its own (the kernel picks the worker per connection): (worker pid, logits)."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = pb_grpc.RnnServeStub(channel).Stream()
        await call.write(step_request("w", seq, X[seq - 1 : seq], start=seq == 1))
        answer = await call.read()
        worker = int(dict(await call.initial_metadata())["rnnserve-worker"])
        await call.done_writing()
        return worker, logits_of(answer)[0]


async def workers_reached(target: str, clients: int) -> set[int]:
    """The workers that `clients` channels open at once in one process reach, with the client's options:
    a connection each (sharing one, all would reach one worker; 12 all on one by chance: 1 in 2,048)."""
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(clients)]
    try:
        calls = [pb_grpc.RnnServeStub(channel).Stream() for channel in channels]
        metadata = await asyncio.gather(*(call.initial_metadata() for call in calls))
        for call in calls:
            await call.done_writing()
        return {int(dict(m)["rnnserve-worker"]) for m in metadata}
    finally:
        for channel in channels:
            await channel.close()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if stat.read().rpartition(")")[2].split()[1] == str(pid):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_two_workers_hand_one_session_back_and_forth(redis_store_url, tmp_path):
    metrics_port = free_port()
    log = tmp_path / "server.log"
    server = ServerProcess.rnnserve(
        free_port(), TEST_REPO, redis_store_url, "--workers", "2", metrics_port=metrics_port, log=log
    )
    server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        workers = []
        for seq in range(1, 21):
            worker, logits = await one_step(target, seq)
            workers.append(worker)
            np.testing.assert_allclose(logits, EXPECTED[seq - 1], atol=TOLERANCE, rtol=0)
        assert len(set(workers)) == 2, "both workers should have served the session"
        assert sum(a != b for a, b in zip(workers, workers[1:], strict=False)) >= 2  # handed over, more than once
        steps = re.findall(r'^rnnserve_steps_total\{model="charlm",version="1"\} (\S+)', scrape(metrics_port), re.M)
        assert [float(v) for v in steps] == [20.0]  # one figure for both workers
        assert len(await workers_reached(target, 12)) == 2

        victim = workers[-1]
        os.kill(victim, signal.SIGKILL)
        seen: set[int] = set()
        seq = 21
        deadline = time.monotonic() + 30
        while len(seen - {victim}) < 2:  # the survivor, and the victim's replacement
            assert time.monotonic() < deadline, f"workers seen: {seen}; log: {log.read_text()[-2000:]}"
            try:
                worker, logits = await one_step(target, seq)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
                continue
            np.testing.assert_allclose(logits, EXPECTED[seq - 1], atol=TOLERANCE, rtol=0)
            seen.add(worker)
            seq += 1
            await asyncio.sleep(0.05)  # the replacement takes a moment to start
        assert f"(pid {victim}) exited with status -9; restarting it" in log.read_text()
    finally:
        assert server.stop() == 0  # SIGTERM: every worker drains and exits cleanly


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ([], "needs a shared store"),
        (
            ["--redis-url", "memcached://127.0.0.1:11211"],
            "unsupported store URL scheme: the URL must start with redis://",
        ),
    ],
)
def test_settings_no_worker_can_serve_with_are_refused_before_any_starts(store, message):
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--model-repo", str(TEST_REPO), "--port", "0", "--workers", "2"]
        + store,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr and "redis" in done.stderr
    assert "[worker" not in done.stderr  # said by the parent, not by each worker as it fails
    assert "errors.pydantic.dev" not in done.stderr  # one line per problem, not a validator's report


def test_metrics_directories_of_dead_parents_are_swept(tmp_path, monkeypatch):
    """A parent killed with SIGKILL leaves its /metrics directory behind; the next one removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"{METRICS_DIR_PREFIX}{gone.pid}-x1"
    live = tmp_path / f"{METRICS_DIR_PREFIX}{os.getppid()}-x2"  # another process, alive
    # Named after this process, which has made none yet: a predecessor's (pid 1 in a container, every time).
    own = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}-x4"
    other = tmp_path / "rnnserve-tests-x3"
    for path in (dead, live, own, other):
        path.mkdir()
    _sweep_metrics_dirs()
    assert not dead.exists() and not own.exists() and live.exists() and other.exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_held_by_another_server_is_refused(workers, redis_store_url):
    first = ServerProcess.rnnserve(free_port(), TEST_REPO, redis_store_url, "--workers", "1")
    first.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--model-repo", str(TEST_REPO), "--host", "127.0.0.1"]
            + [
                "--port",
                str(first.port),
                "--workers",
                workers,
                "--redis-url",
                redis_store_url,
                "--metrics-port",
                "none",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        first.stop()
    assert done.returncode == 2, done.stderr
    assert "is another server using it" in done.stderr


@pytest.mark.parametrize("when", ["starting", "just started"])
def test_sigterm_at_any_moment_drains_and_exits_cleanly(redis_store_url, tmp_path, when):
    """A worker that is told to stop while it starts, or the moment it reports ready, still drains."""
    for attempt in range(3):
        log = tmp_path / f"server-{attempt}.log"
        server = ServerProcess.rnnserve(free_port(), TEST_REPO, redis_store_url, "--workers", "2", log=log)
        if when == "starting":  # the workers exist and are loading their models
            server.start(wait=False)
            assert server.process is not None
            deadline = time.monotonic() + 30
            while len(children(server.process.pid)) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        else:
            server.start()
        assert server.stop() == 0, log.read_text()


def test_sigterm_while_a_worker_fails_to_restart_still_stops_the_server(tmp_path):
    """Redis is gone and a worker dies: its restarts fail, with growing backoff. A SIGTERM then (as in a
    rollout during the outage) stops the server at once rather than being forgotten."""
    redis = RedisProcess(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    log = tmp_path / "server.log"
    server = ServerProcess.rnnserve(free_port(), TEST_REPO, redis.url, "--workers", "2", log=log)
    server.start()
    try:
        assert server.process is not None
        workers = children(server.process.pid)
        redis.stop()
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(1.2)  # the replacement is starting (and will fail: no store)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(20)
        assert time.monotonic() - started < 15, log.read_text()[-2000:]
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        redis.close()


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", None),  # no quota: the CPUs the process may run on
        ("200000 100000\n", 2),  # a container limited to 2 CPUs
        ("150000 100000\n", 2),  # 1.5 CPUs: rounded up, a worker does not need a whole CPU busy
        ("50000 100000\n", 1),
        ("garbage", None),
    ],
)
def test_the_default_worker_count_follows_the_containers_cpu_limit(tmp_path, cpu_max, expected):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    visible = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (visible if expected is None else min(visible, expected))
    assert usable_cpus(tmp_path / "absent") == visible


@pytest.mark.parametrize("extra", [0, 1])
def test_large_batches_run_on_the_event_loop_where_workers_fill_the_cpus(extra):
    """With a worker per usable CPU (or more), a large batch's runtime call runs on its event loop: a runtime
    thread would only contend with the other workers. With fewer, a runtime thread runs it beside the event
    loop. Small batches run on the event loop either way; a setting given is kept."""
    cpus = usable_cpus()
    settings = Settings(redis=RedisSettings(url="redis://127.0.0.1:1/0"))
    filled = runtime_placed(settings, cpus + extra).runtime
    assert filled.inline_min_rows == LARGE_BATCH_ROWS
    assert [filled.inline(rows) for rows in (1, 8, 9, LARGE_BATCH_ROWS - 1, LARGE_BATCH_ROWS, 1024)] == [
        True,
        True,
        False,
        False,
        True,
        True,
    ]
    if cpus > 1:
        fewer = runtime_placed(settings, cpus - 1).runtime
        assert fewer.inline_min_rows == 0
        assert [fewer.inline(rows) for rows in (8, 9, LARGE_BATCH_ROWS, 1024)] == [True, False, False, False]
    chosen = settings.model_copy(update={"runtime": RuntimeSettings(inline_min_rows=512)})
    assert runtime_placed(chosen, cpus + extra).runtime.inline_min_rows == 512
    assert Settings().runtime.inline(LARGE_BATCH_ROWS) is False  # a server not started by `serve_workers`


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def serving(target: str, timeout_s: float = 60) -> None:
    """Until the server's health says SERVING."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                if (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status == SERVING:
                    return
            assert time.monotonic() < deadline, "the server did not come up"
            await asyncio.sleep(0.02)


async def test_a_worker_takes_no_stream_and_is_unready_until_every_worker_is_up(start_server):
    """A stream taken while one worker alone listened would stay on it, however the connections spread
    once all listen: until the server's workers are all up, a worker refuses streams (UNAVAILABLE, the
    client retries) and its health says NOT_SERVING; its unary calls are served."""
    app = await start_server()
    app.gate.hold(SIBLINGS_STARTING)
    app.readiness.update(workers_ok=False)
    target = f"127.0.0.1:{app.port}"
    first = step_request("s", 1, np.eye(84, dtype=np.float32)[:1], start=True)
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
        stream = pb_grpc.RnnServeStub(channel).Stream()
        await stream.write(first)
        await stream.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [answer async for answer in stream]
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "still starting" in (refused.value.details() or "")
        assert (await pb_grpc.RnnServeStub(channel).ListModels(pb.ListModelsRequest())).models
        app.siblings_started()
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING
        (answer,) = await exchange(target, [first])
        assert not answer.HasField("error") and answer.seq == 1


async def test_a_gateway_spreads_over_a_restarted_servers_workers(redis_store_url, tmp_path):
    """A gateway's streams reconnect as soon as a restarted server listens, which its first worker does
    before the second: they are placed only once both are up (until then a worker refuses streams), so
    they spread 2:2 after every restart. A placement may still settle 3:1 or 4:0: a stream whose eight new
    connections in a row all land on a process that has one (1 in 256 with two workers) takes it that none
    is free (`Spread`), and seen twice in about 130 restarts; the gateway's rebalancing evens that out,
    hence the seconds allowed. From the first SERVING on, connections reach both workers."""
    from collections import Counter

    x = np.eye(84, dtype=np.float32)[:1]
    port = free_port()
    server = ServerProcess.rnnserve(port, TEST_REPO, redis_store_url, "--workers", "2", log=tmp_path / "log")
    server.start(wait=False)
    target = f"127.0.0.1:{port}"
    try:
        async with BatchClient(target, streams=4, reconnect_timeout_s=60, rebalance_s=0.5) as gateway:
            for round_ in range(8):
                deadline = time.monotonic() + 30
                while True:
                    groups = [{f"g{g}-{i}": x for i in range(8)} for g in range(12)]  # all four streams busy
                    replies = await asyncio.gather(*(gateway.step("charlm", group) for group in groups))
                    assert all(isinstance(r, StepReply) for answered in replies for r in answered.values()), replies
                    if sorted(Counter(gateway.workers).values()) == [2, 2]:
                        break
                    assert time.monotonic() < deadline, (round_, gateway.workers, gateway.moves)
                await serving(target)
                assert len(await workers_reached(target, 12)) == 2, f"SERVING with one worker up (round {round_})"
                server.kill()
                server.start(wait=False)  # the gateway's streams reconnect as soon as a worker listens
    finally:
        server.stop()


def test_a_serving_process_keeps_what_starting_made_out_of_full_collections():
    """A full garbage collection walks every object in reach: a server that left its startup (modules,
    message classes, models) there paid for it on every one, at fan-in a sixth of its CPU a step."""
    script = f"""
import asyncio, gc, os, signal
from pathlib import Path
from service.server import serve
from service.settings import Settings

def ready():
    print("frozen", gc.get_freeze_count(), "in reach", len(gc.get_objects()), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

settings = Settings(model_repo=Path({str(TEST_REPO)!r}), host="127.0.0.1", port=0, metrics_port=None)
asyncio.run(serve(settings, on_ready=ready))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    frozen, in_reach = map(int, re.fullmatch(r"frozen (\d+) in reach (\d+)\n", done.stdout).groups())  # type: ignore[union-attr]
    assert frozen > 10_000  # the modules alone make tens of thousands
    assert in_reach < frozen / 10
