"""`rnnserve bench`: what one streamed step costs, next to the floors it is made of.

Floors, each measured alone: one ONNX Runtime call (batch 1, one step), one Redis round trip with a
compare-and-set commit of a real record, one gRPC stream round trip to a server that does nothing. Then the
whole step through `rnnserve serve` in its own process, with the in-memory store and with Redis; the same
session's step latency early and late in a long stream (is it flat?); and many sessions at once on one
stream (batching). Prints a table and, with --json, writes the figures.
"""

from __future__ import annotations

import asyncio
import json
import platform
import re
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from bench.process import RedisProcess, ServerProcess, free_port
from service.client import StreamClient
from service.models import ModelRegistry
from service.settings import RedisSettings, RuntimeSettings
from service.state.record import SessionRecord, encode
from service.state.redis_store import RedisStateStore
from service.state.store import Commit

# The shipped character LSTM in fp32 (2 layers, hidden 256, as every earlier run measured).
MODEL, VERSION = "charlm-lstm", 7


def summary(seconds: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in seconds)
    return {
        "p50_us": statistics.median(us),
        "p90_us": us[int(0.9 * (len(us) - 1))],
        "p99_us": us[int(0.99 * (len(us) - 1))],
        "mean_us": statistics.fmean(us),
        "n": len(us),
    }


def runtime_floor(model_repo: Path, steps: int, batches: tuple[int, ...] = (1, 64)) -> dict[str, Any]:
    """One ONNX Runtime call (one time step) at each batch size, as the server makes it."""
    model = ModelRegistry.from_repository(model_repo, RuntimeSettings()).get(MODEL, VERSION)
    out: dict[str, Any] = {}
    for batch in batches:
        x = np.zeros((batch, 1, model.manifest.features), np.float32)
        x[:, 0, 0] = 1
        states = {name: np.zeros((batch, *v.shape), v.dtype) for name, v in model.zero_states().items()}
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            model.runtime.run(x, states)
            times.append(time.perf_counter() - started)
        out[f"batch_{batch}"] = summary(times)
    return out


async def pipelined_commit_floor(model_repo: Path, redis_url: str, steps: int, batch: int) -> dict[str, Any]:
    """`batch` real records committed by compare-and-set in one pipelined round trip, as a batch is."""
    model = ModelRegistry.from_repository(model_repo, RuntimeSettings()).get(MODEL, VERSION)
    logits = np.zeros((1, model.manifest.features), np.float32)
    store = RedisStateStore(RedisSettings(url=redis_url))
    await store.ping()
    keys = [f"rnnserve:bench:{{floor-{i}}}" for i in range(batch)]
    tokens: list[str | None] = [None] * batch
    times = []
    for seq in range(1, steps + 1):
        blob = encode(SessionRecord(model.fingerprint, 1, seq, model.zero_states(), {"logits": logits}))
        commits = [Commit(key, token, f"1:{seq}", blob, ttl_s=60) for key, token in zip(keys, tokens, strict=True)]
        started = time.perf_counter()
        await store.commit_many(commits)
        times.append(time.perf_counter() - started)
        tokens = [f"1:{seq}"] * batch
    for key in keys:
        await store.delete(key)
    await store.close()
    return summary(times)


async def redis_floor(model_repo: Path, redis_url: str, steps: int) -> dict[str, Any]:
    model = ModelRegistry.from_repository(model_repo, RuntimeSettings()).get(MODEL, VERSION)
    states = model.zero_states()
    logits = np.zeros((1, model.manifest.features), np.float32)
    store = RedisStateStore(RedisSettings(url=redis_url))
    await store.ping()
    key, token = "rnnserve:bench:{floor}", None
    loads, commits = [], []
    for seq in range(1, steps + 1):
        blob = encode(SessionRecord(model.fingerprint, 1, seq, states, {"logits": logits}))
        started = time.perf_counter()
        await store.commit_many([Commit(key, token, f"1:{seq}", blob, ttl_s=60)])
        commits.append(time.perf_counter() - started)
        token = f"1:{seq}"
        started = time.perf_counter()
        await store.load_many([key])
        loads.append(time.perf_counter() - started)
    await store.delete(key)
    await store.close()
    return {"record_bytes": len(blob), "commit": summary(commits), "load": summary(loads)}


async def stream_steps(target: str, steps: int, features: int, session_id: str) -> list[float]:
    x = np.zeros((1, features), np.float32)
    x[0, 3] = 1
    async with StreamClient(target) as client:
        session = client.session(MODEL, session_id, version=VERSION)
        return [(await session.step(x)).latency_s for _ in range(steps)]


async def concurrent_sessions(target: str, sessions: int, steps: int, features: int) -> dict[str, float]:
    x = np.zeros((1, features), np.float32)
    x[0, 5] = 1
    async with StreamClient(target) as client:

        async def run(i: int) -> None:
            session = client.session(MODEL, f"load-{i}", version=VERSION)
            for _ in range(steps):
                await session.step(x)

        started = time.perf_counter()
        await asyncio.gather(*(run(i) for i in range(sessions)))
        elapsed = time.perf_counter() - started
    return {
        "sessions": sessions,
        "steps": sessions * steps,
        "seconds": elapsed,
        "steps_per_s": sessions * steps / elapsed,
    }


def mean_batch_size(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = float(re.search(r"^rnnserve_batch_size_sum\{[^}]*\} (\S+)", text, re.M).group(1))  # type: ignore[union-attr]
    count = float(re.search(r"^rnnserve_batch_size_count\{[^}]*\} (\S+)", text, re.M).group(1))  # type: ignore[union-attr]
    return total / count


async def run(model_repo: Path, redis_url: str | None, steps: int, long_steps: int, sessions: int) -> dict[str, Any]:
    features = ModelRegistry.from_repository(model_repo, RuntimeSettings()).get(MODEL, VERSION).manifest.features
    own_redis = None
    if redis_url is None:
        own_redis = RedisProcess()
        own_redis.start()
        redis_url = own_redis.url
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "onnxruntime": onnxruntime.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        results["runtime"] = await asyncio.to_thread(runtime_floor, model_repo, steps)
        results["redis"] = await redis_floor(model_repo, redis_url, steps)
        echo_port = free_port()
        echo = ServerProcess(echo_port, ["--port", str(echo_port)], module="bench.echo")
        echo.start()
        try:
            results["grpc_echo"] = summary(await stream_steps(f"127.0.0.1:{echo.port}", steps, features, "echo"))
        finally:
            echo.stop()
        for store, url in (("memory", None), ("redis", redis_url)):
            metrics_port = free_port()
            server = ServerProcess.rnnserve(free_port(), model_repo, url, metrics_port=metrics_port)
            server.start()
            target = f"127.0.0.1:{server.port}"
            try:
                results[f"step_{store}"] = summary(await stream_steps(target, steps, features, "single"))
                if store == "redis":
                    long = await stream_steps(target, long_steps, features, "long")
                    head, tail = summary(long[:1000]), summary(long[-1000:])
                    results["flatness"] = {
                        "steps": long_steps,
                        "first_1000": head,
                        "last_1000": tail,
                        "p50_ratio_last_over_first": tail["p50_us"] / head["p50_us"],
                    }
                    load = await concurrent_sessions(target, sessions, max(10, steps // 10), features)
                    load["mean_batch_size"] = mean_batch_size(metrics_port)
                    results["concurrent"] = load
            finally:
                server.stop()
    finally:
        if own_redis is not None:
            own_redis.close()
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        ("ONNX Runtime call, batch 1, T=1", results["runtime"]["batch_1"]),
        ("ONNX Runtime call, batch 64, T=1", results["runtime"]["batch_64"]),
        ("Redis: load one record", results["redis"]["load"]),
        ("Redis: CAS commit of one record", results["redis"]["commit"]),
        ("gRPC stream round trip, echo server", results["grpc_echo"]),
        ("rnnserve step, in-memory store", results["step_memory"]),
        ("rnnserve step, Redis store", results["step_redis"]),
        (f"  same, steps 1-1000 of {results['flatness']['steps']}", results["flatness"]["first_1000"]),
        (f"  same, last 1000 of {results['flatness']['steps']}", results["flatness"]["last_1000"]),
    ]
    lines = ["| what | p50 µs | p90 µs | p99 µs | n |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in rows:
        lines.append(f"| {name} | {s['p50_us']:.0f} | {s['p90_us']:.0f} | {s['p99_us']:.0f} | {s['n']} |")
    load = results["concurrent"]
    lines.append("")
    lines.append(
        f"{load['sessions']} sessions at once on one stream (Redis store): "
        f"{load['steps_per_s']:.0f} steps/s, "
        f"mean batch {load['mean_batch_size']:.1f}; "
        f"record {results['redis']['record_bytes']} bytes; "
        f"late/early p50 ratio {results['flatness']['p50_ratio_last_over_first']:.2f}"
    )
    return "\n".join(lines)


def main(
    model_repo: Path,
    redis_url: str | None,
    steps: int,
    long_steps: int,
    sessions: int,
    json_path: Path | None,
) -> int:
    results = asyncio.run(run(model_repo, redis_url, steps, long_steps, sessions))
    print(table(results))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")
    return 0
