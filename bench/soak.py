"""Soak: many concurrent sessions stream for minutes against two replicas on one Redis; per minute, the
steps, the errors, the latency percentiles and each replica's memory.

Every session steps at a fixed rate (open loop: a step's latency counts from when it fell due). Streams
carry the sessions; at every minute each stream ends and opens again on the other replica, so every
session is continued by a replica that did not serve its last step. A step refused in-band is sent again
(the same seq and input: a resend of an applied step is a replay), so no session skips a step. At the end
each session's stored seq is compared with the steps the client saw acknowledged: any difference is a
lost or doubled step.

    rnnserve bench soak --minutes 10 --sessions 1000    # -> docs/bench-soak.json
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
from hdrh.histogram import HdrHistogram

from bench.process import RedisProcess, ServerProcess, free_port, rss_mb
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import CHANNEL_OPTIONS
from service.server import open_store
from service.settings import RedisSettings
from service.state.record import decode
from service.state.store import Stored, session_key

MAX_LATENCY_US = 60_000_000
_CODES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass
class Minute:
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_LATENCY_US, 3))
    steps: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rss_mb: list[float] = field(default_factory=list)
    redis_mb: float = 0.0

    def summary(self, seconds: float) -> dict[str, Any]:
        h = self.histogram
        return {
            "steps": self.steps,
            "steps_per_s": round(self.steps / seconds, 1),
            "p50_ms": h.get_value_at_percentile(50) / 1000,
            "p99_ms": h.get_value_at_percentile(99) / 1000,
            "max_ms": h.get_max_value() / 1000,
            "errors": dict(self.errors),
            "rss_mb": self.rss_mb,
            "redis_mb": self.redis_mb,
        }


class _Stream:
    """Some sessions, on one stream per minute, each to the replica the minute gives it."""

    def __init__(self, sessions: list[str], model: str, x: np.ndarray, interval_s: float, offset_s: float) -> None:
        self.sessions = sessions
        self.model = model
        self.tensor = pb.Tensor(shape=x.shape, raw=x.tobytes())
        self.interval_s = interval_s  # between two steps of this stream
        self.offset_s = offset_s
        self.acked = dict.fromkeys(sessions, 0)
        self.sent_at: dict[str, float] = {}  # in flight: when each step fell due
        self.late: dict[str, list[float]] = {sid: [] for sid in sessions}  # due while the last was in flight
        self.writing = asyncio.Lock()
        self.call: Any = None
        self.record = Minute()
        self.ticking = False
        self.drained = asyncio.Event()

    def request(self, sid: str) -> pb.StepRequest:
        seq = self.acked[sid] + 1
        return pb.StepRequest(model=self.model, session_id=sid, seq=seq, start=seq == 1, input=self.tensor)

    async def minute(self, channel: grpc.aio.Channel, until: float, record: Minute) -> None:
        """Steps fall due until `until`; then the stream waits for its answers (30 s at most) and ends."""
        self.call = pb_grpc.RnnServeStub(channel).Stream()
        self.record = record
        self.ticking = True
        self.drained = asyncio.Event()
        tasks = [asyncio.create_task(self._tick(until)), asyncio.create_task(self._read())]
        try:
            await asyncio.wait_for(self.drained.wait(), until - time.perf_counter() + 30)
        except TimeoutError:
            record.errors["stream not drained"] += 1
        finally:
            self.call.cancel()
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() != grpc.StatusCode.CANCELLED:
                    record.errors[f"stream {outcome.code().name}"] += 1

    async def _send(self, sid: str, due: float) -> None:
        self.sent_at[sid] = due
        async with self.writing:
            await self.call.write(self.request(sid))

    async def _tick(self, until: float) -> None:
        for sid in self.sessions:  # in flight when the last stream ended, or fallen due meanwhile
            if sid in self.sent_at:
                await self._send(sid, self.sent_at[sid])
            elif self.late[sid]:
                await self._send(sid, self.late[sid].pop(0))
        i, due = 0, time.perf_counter() + self.offset_s
        while due < until:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sid = self.sessions[i % len(self.sessions)]
            if sid in self.sent_at:
                self.late[sid].append(due)
            else:
                await self._send(sid, due)
            i, due = i + 1, due + self.interval_s
        self.ticking = False
        if not self.sent_at:
            self.drained.set()

    async def _read(self) -> None:
        try:
            async for response in self.call:
                sid = response.session_id
                due = self.sent_at.pop(sid, None)
                if due is None:
                    continue
                self.record.histogram.record_value(max(1, int((time.perf_counter() - due) * 1e6)))
                if response.HasField("error"):
                    self.record.errors[_CODES.get(response.error.code, str(response.error.code))] += 1
                    await self._send(sid, due)  # the same step again
                    continue
                self.record.steps += 1
                self.acked[sid] = response.seq
                if self.late[sid]:
                    await self._send(sid, self.late[sid].pop(0))
                if not self.ticking and not self.sent_at:
                    self.drained.set()
        finally:  # the stream broke or ended: what is in flight goes again on the next one
            self.drained.set()


async def run(
    model_repo: Path,
    minutes: int,
    sessions: int,
    streams: int,
    rate: float,
    model: str,
    log: Path | None,
    minute_s: float = 60,
) -> dict[str, Any]:
    """`minutes` rounds of `minute_s` seconds each (a test makes them short); then each session's stored seq,
    read through the service's own store, against the last seq the client saw acknowledged."""
    store = RedisProcess()
    store.start()
    replicas = [
        ServerProcess.rnnserve(free_port(), model_repo, store.url, "--workers", "1", metrics_port=0, log=log)
        for _ in range(2)
    ]
    try:
        for replica in replicas:
            replica.start()
        pids = [replica.process.pid for replica in replicas if replica.process is not None]
        run_id = uuid.uuid4().hex[:6]
        ids = [f"soak-{run_id}-{i}" for i in range(sessions)]
        features = 84
        x = np.random.default_rng(0).random((1, features)).astype(np.float32)
        interval = streams / (sessions * rate)
        lanes = [_Stream(ids[k::streams], model, x, interval, k * interval / streams) for k in range(streams)]
        channels = [
            [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}", options=CHANNEL_OPTIONS) for _ in range(2)]
            for r in replicas
        ]
        client = redis.Redis.from_url(store.url)
        figures = []
        rss_start = [rss_mb(pid) for pid in pids]
        for m in range(minutes):
            record = Minute()
            started = time.perf_counter()
            until = started + minute_s
            await asyncio.gather(
                *(lane.minute(channels[(k + m) % 2][k % 2], until, record) for k, lane in enumerate(lanes))
            )
            record.rss_mb = [rss_mb(pid) for pid in pids]
            record.redis_mb = round(int(client.info("memory")["used_memory"]) / 2**20, 1)
            figures.append(record.summary(time.perf_counter() - started))
            print(f"minute {m + 1}: {json.dumps(figures[-1])}", flush=True)
        reader = open_store(RedisSettings(url=store.url))  # reads either record layout, as a replica does
        try:
            loaded = await reader.load_many([session_key("rnnserve", model, sid) for sid in ids])
        finally:
            await reader.close()
        acked = {sid: n for lane in lanes for sid, n in lane.acked.items()}
        mismatched = [
            sid
            for sid, found in zip(ids, loaded, strict=True)
            if not isinstance(found, Stored) or decode(found.record).seq != acked.get(sid)
        ]
        for pair in channels:
            for channel in pair:
                await channel.close()
        client.close()
        return {
            "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(),
            "model": model,
            "sessions": sessions,
            "streams": streams,
            "rate_per_session": rate,
            "minutes": figures,
            "rss_start_mb": rss_start,
            "steps_acknowledged": sum(acked.values()),
            "sessions_not_matching_the_store": len(mismatched),
        }
    finally:
        for replica in replicas:
            replica.stop()
        store.close()


def main(
    model_repo: Path, minutes: int, sessions: int, streams: int, rate: float, model: str, json_path: Path | None
) -> int:
    figures = asyncio.run(run(model_repo, minutes, sessions, streams, rate, model, None))
    text = json.dumps(figures, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    errors = sum(sum(m["errors"].values()) for m in figures["minutes"])
    print(
        f"{figures['steps_acknowledged']} steps acknowledged, {errors} refused in-band and resent, "
        f"{figures['sessions_not_matching_the_store']} sessions whose stored seq differs from the acknowledged"
    )
    return 0 if figures["sessions_not_matching_the_store"] == 0 else 1
