"""What acknowledging a step only once a replica holds it costs (`redis.wait_replicas`).

A primary and one replica (redis-server, no persistence, loopback) and `rnnserve serve` with
`--redis-wait-replicas 0` and `1` in turns, under the same loads: one session ping-pong, and 256 sessions
on 8 streams. The turns alternate (A B A B ...) so that a noisy machine shifts both alike; the figures are
the medians of the rounds.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.load import LoadSpec, run_load
from bench.process import RedisProcess, ServerProcess, free_port

LOADS = {"S=1, ping-pong": (1, 300, 1), "S=256 on 8 streams": (256, 40, 8)}


def main(model_repo: Path, json_path: Path | None, rounds: int = 3) -> int:
    with tempfile.TemporaryDirectory(prefix="rnnserve-replication-") as tmp:
        primary = RedisProcess(Path(tmp))
        primary.start()
        replica = RedisProcess(replica_of=primary.port)
        replica.start()
        figures: dict[str, dict[str, list[dict[str, Any]]]] = {}
        try:
            for _ in range(rounds):
                for wait in ("0", "1"):
                    port = free_port()
                    server = ServerProcess.rnnserve(port, model_repo, primary.url, "--redis-wait-replicas", wait)
                    server.start()
                    try:
                        for name, (sessions, steps, streams) in LOADS.items():
                            spec = LoadSpec(f"127.0.0.1:{port}", sessions, steps, streams)
                            summary = asyncio.run(run_load(spec)).summary()
                            figures.setdefault(name, {}).setdefault(wait, []).append(summary)
                    finally:
                        server.stop()
        finally:
            replica.close()
            primary.close()
    table = [
        "| load | wait_replicas | steps/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_wait in figures.items():
        for wait, runs in by_wait.items():
            median = {key: statistics.median(r[key] for r in runs) for key in ("steps_per_s", "p50_us", "p99_us")}
            errors = sum(sum(r["errors"].values()) for r in runs)
            medians.setdefault(name, {})[wait] = median | {"errors": errors}
            table.append(
                f"| {name} | {wait} | {median['steps_per_s']:.0f} | {median['p50_us'] / 1000:.2f} | "
                f"{median['p99_us'] / 1000:.2f} | {errors} |"
            )
    print("\n".join(table))
    if json_path is not None:
        json_path.write_text(json.dumps({"rounds": rounds, "medians": medians, "runs": figures}, indent=2) + "\n")
    return 0
