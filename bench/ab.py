"""`rnnserve bench ab --base REV`: this checkout against an earlier commit, under the same load, in turns.

A change's effect on a shared, noisy machine shows only in a comparison made at the same time: servers
built from the two trees take turns (base, this, base, this, ...) against one private redis-server, and
each load's figure is the median of its rounds. The base runs from a temporary `git worktree` with this
checkout's virtual environment and model repository.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.process import ROOT, RedisProcess, ServerProcess, free_port
from bench.suite import Load, measured_load

LOADS = (
    Load("S=256 on 8 streams", 256, 8, 40),
    Load("fan-in: 1,024 sessions, 256 steps per message", 1024, 4, 160, per_message=256),
)


@dataclass
class Figures:
    steps_per_s: list[float]
    cpu_us_per_step: list[float]


async def _measure(server: ServerProcess, load: Load) -> tuple[float, float]:
    assert server.process is not None
    summary = await measured_load(load.spec(f"127.0.0.1:{server.port}"), server.process.pid)
    if summary["errors"]:
        raise RuntimeError(f"{load.name}: errors {summary['errors']}")
    return summary["steps_per_s"], summary["cpu_us_per_step"]


async def compare(base: str, rounds: int, workers: int, model_repo: Path) -> dict[str, dict[str, Figures]]:
    figures = {tree: {load.name: Figures([], []) for load in LOADS} for tree in ("base", "this")}
    with tempfile.TemporaryDirectory(prefix="rnnserve-ab-") as tmp:
        worktree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), base], cwd=ROOT, check=True)
        redis = RedisProcess()
        redis.start()
        try:
            for _ in range(rounds):
                for tree, source in (("base", worktree), ("this", ROOT)):
                    server = ServerProcess.rnnserve(
                        free_port(), model_repo.resolve(), redis.url, "--workers", str(workers), source=source
                    )
                    server.start()
                    try:
                        for load in LOADS:
                            rate, cpu = await _measure(server, load)
                            figures[tree][load.name].steps_per_s.append(rate)
                            figures[tree][load.name].cpu_us_per_step.append(cpu)
                    finally:
                        server.stop()
        finally:
            redis.close()
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    return figures


def main(base: str, rounds: int, workers: int, model_repo: Path) -> int:
    figures = asyncio.run(compare(base, rounds, workers, model_repo))
    print(f"medians of {rounds} rounds, --workers {workers}; base {base} -> this checkout")
    print("| load | steps/s | server CPU µs/step |")
    print("| --- | ---: | ---: |")
    for load in LOADS:
        old, new = figures["base"][load.name], figures["this"][load.name]
        rate = f"{statistics.median(old.steps_per_s):.0f} → {statistics.median(new.steps_per_s):.0f}"
        cpu = f"{statistics.median(old.cpu_us_per_step):.0f} → {statistics.median(new.cpu_us_per_step):.0f}"
        print(f"| {load.name} | {rate} | {cpu} |")
    return 0
