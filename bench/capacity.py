"""The figures the capacity model (docs/SCALING.md) is built from, measured here:

- Redis: memory per stored session, and Redis CPU per compare-and-set commit and per load, on one Redis
  and on a Redis Cluster of three primaries (each with a replica), driven through the store's own code
  (pipelined batches of 256, four at once), the Redis processes' CPU read from /proc;
- a pod: memory per cached session (the records the replica keeps, measured with tracemalloc);
- the wire: bytes per step in a `StepRequest`/`StepResponse` and in a `StepBatch` of 256.

Records have the shipped charlm-lstm's shape (h and c of two layers of 256, 84 logits): 4,550 bytes.

    rnnserve bench capacity      # -> docs/bench-capacity.json (about a minute)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.process import RedisCluster, RedisProcess, cpu_seconds
from service.api.convert import fill_tensors
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.server import open_store
from service.settings import RedisSettings
from service.state.record import SessionRecord, encode_rows
from service.state.redis_store import HASH_LAYOUT, STRING_LAYOUT
from service.state.store import ABSENT, Commit, StateStore, session_key

LAYERS, HIDDEN, FEATURES = 2, 256, 84
BATCH, CONCURRENT = 256, 4


def _records(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    states = {name: rng.random((n, LAYERS, HIDDEN), dtype=np.float32) for name in ("h", "c")}
    outputs = {"logits": rng.random((n, 1, FEATURES), dtype=np.float32)}
    return encode_rows(bytes(32), [1] * n, [0] * n, [1] * n, [bytes(16)] * n, states, outputs, ended=False)


async def _drive(
    store: StateStore, pids: list[int], sessions: int, seconds: float, replica_pids: list[int] | None = None
) -> dict[str, float]:
    """Batches of BATCH commits (and, apart, loads), CONCURRENT at once, for `seconds` each; the store's
    Redis processes' CPU per operation (primaries' and, apart, replicas')."""
    replica_pids = replica_pids or []
    keys = [session_key("rnnserve", "charlm-lstm", f"cap-{i}") for i in range(sessions)]
    blobs = _records(BATCH)
    await store.commit_many([Commit(k, None, "e:0", blobs[i % BATCH], 600) for i, k in enumerate(keys)])
    figures: dict[str, float] = {}
    for what in ("commit", "load"):
        done = 0
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        replicas_before = sum(cpu_seconds(pid) for pid in replica_pids)
        started = time.perf_counter()

        async def worker(offset: int, what: str = what, started: float = started) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() - started < seconds:
                batch = [keys[(i + j) % sessions] for j in range(BATCH)]
                if what == "commit":
                    await store.commit_many([Commit(k, None, "e:1", blobs[j], 600) for j, k in enumerate(batch)])
                else:
                    await store.load_many(batch)
                done += BATCH
                i += BATCH * CONCURRENT

        await asyncio.gather(*(worker(k * BATCH) for k in range(CONCURRENT)))
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        figures[f"{what}s_per_s"] = round(done / elapsed)
        figures[f"redis_cpu_us_per_{what}"] = round(cpu / done * 1e6, 2)
        if replica_pids:
            replicas = sum(cpu_seconds(pid) for pid in replica_pids) - replicas_before
            figures[f"replica_cpu_us_per_{what}"] = round(replicas / done * 1e6, 2)
    return figures


async def _redis_figures(seconds: float) -> dict[str, Any]:
    """One Redis (each record layout: see service/state/redis_store.py), then a cluster (hashes)."""
    single_redis: dict[str, Any] = {}
    for layout in (STRING_LAYOUT, HASH_LAYOUT):
        single = RedisProcess()
        single.start()
        try:
            assert single.process is not None
            store = open_store(RedisSettings(url=single.url, record_layout=layout))
            await store.ping()
            with redis.Redis(port=single.port) as client:
                before = int(client.info("memory")["used_memory"])
                n = 20_000
                blobs = _records(BATCH)
                keys = [session_key("rnnserve", "charlm-lstm", f"mem-{i}") for i in range(n)]
                for i in range(0, n, BATCH):
                    await store.commit_many([Commit(k, ABSENT, "e:1", blobs[0], 600) for k in keys[i : i + BATCH]])
                per_session = (int(client.info("memory")["used_memory"]) - before) / n
                usage = int(client.execute_command("MEMORY", "USAGE", keys[0]))
                client.flushall()
            single_redis[layout] = {
                "bytes_per_session": round(per_session),
                "memory_usage_of_one_key": usage,
                **await _drive(store, [single.process.pid], 50_000, seconds),
            }
            await store.close()
        finally:
            single.close()
    cluster = RedisCluster(primaries=3, replicas=1)
    cluster.start()
    try:
        store = open_store(RedisSettings(url=cluster.url))
        await store.ping()
        with redis.Redis(port=cluster.nodes[0].port) as client:
            primaries = {int(primary[1]) for _, _, primary, *_ in client.execute_command("CLUSTER", "SLOTS")}
        pids = [n.process.pid for n in cluster.nodes if n.process is not None and n.port in primaries]
        replica_pids = [n.process.pid for n in cluster.nodes if n.process is not None and n.port not in primaries]
        sharded = await _drive(store, pids, 50_000, seconds, replica_pids)
        await store.close()
    finally:
        cluster.close()
    one = single_redis[STRING_LAYOUT]
    return {
        "bytes_per_session": one.pop("bytes_per_session"),
        "memory_usage_of_one_key": one.pop("memory_usage_of_one_key"),
        "one_redis": one,
        "one_redis_hash_layout": single_redis[HASH_LAYOUT],
        "cluster_3_primaries_3_replicas": sharded,
    }


def _cache_bytes_per_session(n: int = 20_000) -> int:
    """What a replica's cache holds per session: a record with its own arrays (as the batch pipeline makes)."""
    rng = np.random.default_rng(0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = [
        SessionRecord(
            fingerprint=bytes(32),
            epoch=1,
            seq=1,
            states={name: rng.random((LAYERS, HIDDEN), dtype=np.float32) for name in ("h", "c")},
            outputs={"logits": rng.random((1, FEATURES), dtype=np.float32)},
            start_id=0,
            digest=bytes(16),
            ended=False,
        )
        for _ in range(n)
    ]
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del cache
    return round(held / n)


def _wire_bytes() -> dict[str, float]:
    x = np.zeros((1, FEATURES), np.float32)
    request = pb.StepRequest(
        model="charlm-lstm", session_id="0f8fad5bd9cb469fa16570867728950e", seq=123456, input=pb.Tensor(shape=[1, 84])
    )
    request.input.raw = x.tobytes()
    response = pb.StepResponse(model="charlm-lstm", version=7, session_id=request.session_id, seq=123456)
    fill_tensors(response.outputs, {"logits": np.zeros((1, FEATURES), np.float32)})
    batch = pb.StepBatch(id=1, steps=[request] * BATCH)
    result = pb.StepBatchResult(id=1, responses=[response] * BATCH)
    return {
        "step_request": request.ByteSize(),
        "step_response": response.ByteSize(),
        "per_step_in_a_batch_of_256_request": round(batch.ByteSize() / BATCH, 1),
        "per_step_in_a_batch_of_256_response": round(result.ByteSize() / BATCH, 1),
        "state_record": len(_records(1)[0]),
    }


def main(json_path: Path | None, seconds: float = 8.0) -> int:
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "redis": asyncio.run(_redis_figures(seconds)),
        "cache_bytes_per_session": _cache_bytes_per_session(),
        "wire_bytes": _wire_bytes(),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if json_path is not None:
        json_path.write_text(text + "\n")
    return 0
