"""`rnnserve bench engine`: the session engine alone, without gRPC: what a fan-in step costs the server's
event loop and its process, next to what the same step costs through `rnnserve serve`.

S sessions, their steps submitted K at a time (`SessionEngine.submit_many`, as a `StreamBatch` message
is), every message of a round at once, round after round, on one worker's engine in this process, over a
private redis-server. CPU per step: the event loop's thread (`time.thread_time`) and the whole
process (the runtime threads included).
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from bench.process import RedisProcess
from service.server import create_server, keep_out_of_collections
from service.sessions.steps import Step
from service.settings import RedisSettings, Settings


def _process_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


async def measure(
    model_repo: Path, redis_url: str, model: str, version: int, sessions: int, per_message: int, rounds: int
) -> dict[str, Any]:
    """Each session steps once a round (after two rounds of warm-up); every answer is checked."""
    redis = RedisSettings(url=redis_url)
    settings = Settings(model_repo=model_repo, redis=redis, host="127.0.0.1", port=0, metrics_port=None)
    app = await create_server(settings, CollectorRegistry())
    keep_out_of_collections()  # as `rnnserve serve` does once it is up
    try:
        engine = app.engine
        features = engine.registry.get(model, version).manifest.features
        inputs = np.random.default_rng(sessions).random((sessions, 1, features), dtype=np.float32)
        seqs = [0] * sessions

        async def one_round() -> None:
            messages = []
            for first in range(0, sessions, per_message):
                steps = []
                for i in range(first, min(first + per_message, sessions)):
                    seqs[i] += 1
                    steps.append(Step(model, f"engine-{i}", seqs[i], inputs[i], version=version, start=seqs[i] == 1))
                messages.append(engine.submit_many(steps))
            for answers in await asyncio.gather(*messages):
                failed = [answer for answer in answers if isinstance(answer, BaseException)]
                if failed:
                    raise RuntimeError(f"{len(failed)} steps failed, the first: {failed[0]!r}")

        for _ in range(2):
            await one_round()
        started, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), _process_cpu_s()
        for _ in range(rounds):
            await one_round()
        seconds = time.perf_counter() - started
        steps = rounds * sessions
        return {
            "model": f"{model}/{version}",
            "sessions": sessions,
            "per_message": per_message,
            "steps": steps,
            "steps_per_s": steps / seconds,
            "event_loop_cpu_us_per_step": (time.thread_time() - loop_cpu) / steps * 1e6,
            "process_cpu_us_per_step": (_process_cpu_s() - process_cpu) / steps * 1e6,
        }
    finally:
        await app.stop(grace_s=1.0)


def main(model_repo: Path, model: str, version: int, sessions: int, per_message: int, rounds: int) -> int:
    redis = RedisProcess()  # as the suite's: a Redis store, without persistence
    redis.start()
    try:
        figures = asyncio.run(measure(model_repo, redis.url, model, version, sessions, per_message, rounds))
    finally:
        redis.stop()
    print(
        f"{figures['model']}, {sessions} sessions, {per_message} steps per message, {figures['steps']} steps: "
        f"{figures['steps_per_s']:.0f} steps/s; CPU per step: event loop "
        f"{figures['event_loop_cpu_us_per_step']:.1f} µs, process {figures['process_cpu_us_per_step']:.1f} µs"
    )
    return 0
