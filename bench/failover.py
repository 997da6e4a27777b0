"""What a primary's failover costs on Redis Cluster, with and without WAIT: steps lost, steps refused, and
the time until every session steps again.

A cluster of three primaries with a replica each (redis-server on loopback, no persistence, node timeout
1 s), one `rnnserve serve` on it, and 1,000 sessions streaming through `StreamBatch` (250 a message, four
messages in flight), each as fast as it is answered. Every few seconds a primary is SIGKILLed (each shard
in turn); its replica takes over after the node timeout and a vote. The killed node comes back 3 s after
its kill, or once its replica has taken over if that took longer, as the new primary's replica. (A node
without persistence that came back sooner would return empty as its slots' primary, and its replica would
copy the emptiness: Redis's own warning about replication without persistence.) The whole run goes once
with `--redis-wait-replicas 0` (Redis's default: a write is acknowledged before any replica holds it) and
once with 1; then both again with a replica that lags: it stops reading (SIGSTOP) half a second before its
primary is killed, and goes on once it is (what a slow link or a busy replica does).

The client numbers every step (BatchClient), so an acknowledged step that the promoted replica never
received cannot pass unseen: the session's next step is refused as out of order (FAILED_PRECONDITION,
naming the seq the store expects next) or, for a lost start, as not found. The difference between the
acknowledged seq and the stored one is the loss; such a session stops streaming. At the end every other
session's stored seq is compared with its acknowledged one.

    rnnserve bench failover --kills 3     # -> docs/bench-failover.json (about 3 minutes)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis

from bench.process import RedisCluster, ServerProcess, free_port
from service.client import BatchClient, StepReply
from service.state.store import session_key

MODEL = "charlm-lstm"
FEATURES = 84
GROUP = 250
DOWN_S = 3.0  # a killed node comes back this long after its kill, and not before its replica took over
LAG_S = 0.5  # the second pair of runs: the replica stops reading this long before its primary is killed
SETTLE_S = 3.0  # streaming between a node's return and the next kill


@dataclass
class Tally:
    acknowledged: int = 0
    refused: list[float] = field(default_factory=list)  # when each UNAVAILABLE answer came
    lost: dict[str, int] = field(default_factory=dict)  # session -> acknowledged steps the store lost
    other: list[str] = field(default_factory=list)


async def _stream(
    gateway: BatchClient, sids: list[str], x: dict[str, np.ndarray], stop: asyncio.Event, tally: Tally
) -> None:
    """The group's sessions, a step each per message, until `stop`. A step refused as UNAVAILABLE is sent
    again with the next message (the same seq and input, so an applied one is answered as a replay)."""
    live = list(sids)
    while live and not stop.is_set():
        replies = await gateway.step(MODEL, {sid: x[sid] for sid in live})
        for sid, reply in replies.items():
            if isinstance(reply, StepReply):
                tally.acknowledged += 1
                continue
            if reply.code is grpc.StatusCode.UNAVAILABLE:
                tally.refused.append(time.monotonic())
                continue
            acked = gateway.acked_seq(MODEL, sid)
            if reply.code is grpc.StatusCode.FAILED_PRECONDITION and 0 < reply.expected_seq <= acked:
                tally.lost[sid] = acked - (reply.expected_seq - 1)
            elif reply.code is grpc.StatusCode.NOT_FOUND:
                tally.lost[sid] = acked
            else:
                tally.other.append(f"{reply.code.name}: {reply.message}")
            live.remove(sid)


def _shard_keys(cluster: RedisCluster, sids: list[str]) -> list[str]:
    """A session key on each primary (the shards' order of kills)."""
    keys: dict[int, str] = {}
    for sid in sids:
        key = session_key("rnnserve", MODEL, sid)
        keys.setdefault(cluster.primary_of(key).port, key)
        if len(keys) == len(cluster.nodes) // 2:
            break
    return list(keys.values())


async def _one_run(model_repo: Path, wait: int, kills: int, sessions: int, lag_s: float) -> dict[str, Any]:
    cluster = RedisCluster(primaries=3, replicas=1, node_timeout_ms=1000)
    cluster.start()
    port = free_port()
    server = ServerProcess.rnnserve(
        port, model_repo, cluster.url, "--workers", "1", "--redis-wait-replicas", str(wait),
        "--redis-wait-timeout-ms", "500", "--redis-socket-timeout-s", "1", "--redis-connect-timeout-s", "0.5",
    )  # fmt: skip
    try:
        server.start()
        rng = np.random.default_rng(wait)
        eye = np.eye(FEATURES, dtype=np.float32)
        sids = [f"f{wait}-{i}" for i in range(sessions)]
        x = {sid: eye[rng.integers(0, FEATURES)][None, :] for sid in sids}
        shards = _shard_keys(cluster, sids)
        tally, stop = Tally(), asyncio.Event()
        windows: list[tuple[float, float]] = []
        promoted: list[float] = []
        async with BatchClient(f"127.0.0.1:{port}", reconnect_timeout_s=60) as gateway:
            groups = [
                asyncio.create_task(_stream(gateway, sids[i : i + GROUP], x, stop, tally))
                for i in range(0, len(sids), GROUP)
            ]
            started = time.monotonic()
            await asyncio.sleep(SETTLE_S)
            for k in range(kills):
                key = shards[k % len(shards)]
                victim = cluster.primary_of(key)
                if lag_s:  # the replica stops reading for a while before its primary dies: it lags
                    (lagging,) = cluster.replicas_of(victim)
                    lagging.pause()
                    await asyncio.sleep(lag_s)
                killed = time.monotonic()
                await asyncio.to_thread(victim.kill)
                if lag_s:
                    lagging.pause(False)
                await asyncio.to_thread(cluster.wait_promoted, victim, key)
                promoted.append(round(time.monotonic() - killed, 2))
                await asyncio.sleep(max(0.0, killed + DOWN_S - time.monotonic()))
                await asyncio.to_thread(victim.start)
                await asyncio.to_thread(cluster.wait_ok, [node.port for node in cluster.nodes])
                await asyncio.to_thread(cluster.wait_synced)
                await asyncio.sleep(SETTLE_S)
                windows.append((killed, time.monotonic()))
            stop.set()
            await asyncio.gather(*groups)
            elapsed = time.monotonic() - started
            acked = {sid: gateway.acked_seq(MODEL, sid) for sid in sids if sid not in tally.lost}
        behind = ahead = 0
        nodes = {node.port: redis.Redis(port=node.port) for node in cluster.nodes}
        try:
            for sid, n in acked.items():
                key = session_key("rnnserve", MODEL, sid)
                token: bytes | None = nodes[cluster.primary_of(key).port].hget(key, "token")  # type: ignore[assignment]
                stored = 0 if token is None else int(token.split(b":")[1])
                behind += stored < n
                ahead += stored > n + 1  # one more than acknowledged: a step applied whose answer never came
        finally:
            for client in nodes.values():
                client.close()
        recovery = [
            round(max((t for t in tally.refused if start <= t < end), default=start) - start, 2)
            for start, end in windows
        ]
        return {
            "wait_replicas": wait,
            "replica_lag_s": lag_s,
            "kills": kills,
            "sessions": sessions,
            "seconds": round(elapsed, 1),
            "steps_acknowledged": tally.acknowledged,
            "steps_refused_and_resent": len(tally.refused),
            "sessions_that_lost_steps": len(tally.lost),
            "acknowledged_steps_lost": sum(tally.lost.values()),
            "other_refusals": tally.other[:10],
            "sessions_behind_the_store_unseen": behind,
            "sessions_ahead_of_the_store": ahead,
            "seconds_from_kill_to_promotion": promoted,
            "seconds_from_kill_to_last_refusal": recovery,
        }
    finally:
        server.stop()
        cluster.close()


def main(model_repo: Path, json_path: Path | None, kills: int = 3, sessions: int = 1000) -> int:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        print("rnnserve bench failover: needs redis-server and redis-cli on PATH")
        return 2
    runs = [
        asyncio.run(_one_run(model_repo, wait, kills, sessions, lag_s)) for lag_s in (0.0, LAG_S) for wait in (0, 1)
    ]
    figures = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "model": MODEL, "runs": runs}
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
    print("| replica lag s | wait_replicas | kills | steps acknowledged | refused, resent | sessions that lost steps | "
          "steps lost | unseen loss | s from kill to promotion | s from kill to last refusal |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in runs:
        print(
            f"| {r['replica_lag_s']} | {r['wait_replicas']} | {r['kills']} | {r['steps_acknowledged']} | "
            f"{r['steps_refused_and_resent']} | "
            f"{r['sessions_that_lost_steps']} | {r['acknowledged_steps_lost']} | "
            f"{r['sessions_behind_the_store_unseen']} | {', '.join(map(str, r['seconds_from_kill_to_promotion']))} | "
            f"{', '.join(map(str, r['seconds_from_kill_to_last_refusal']))} |"
        )
    unseen = sum(r["sessions_behind_the_store_unseen"] for r in runs)
    ahead = sum(r["sessions_ahead_of_the_store"] for r in runs)
    waited_loss = sum(r["acknowledged_steps_lost"] for r in runs if r["wait_replicas"])
    others = sum(len(r["other_refusals"]) for r in runs)
    print(f"sessions ahead of the store: {ahead}; other refusals: {others}")
    return 0 if unseen == 0 and ahead == 0 and waited_loss == 0 and not others else 1
