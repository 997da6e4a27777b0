"""`rnnserve bench suite`: the load figures docs/BENCHMARKS.md publishes, from one run.

Starts a private redis-server, the bare echo server and `rnnserve serve` (in the configurations the
scenarios need), measures the floors (one ONNX Runtime step, one Redis compare-and-set), then each
scenario against the server and, at the same concurrency, against the echo server; a fan-in scenario
between two measurements of the floors at its batch size. Ratios come from figures measured in this one
run. Writes JSON, prints a table, and plots latency against load.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import resource
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import onnxruntime

from bench.load import LoadSpec, run_load
from bench.process import RedisProcess, ServerProcess, cpu_seconds, cpu_split, free_port
from bench.step_latency import MODEL, VERSION, pipelined_commit_floor, redis_floor, runtime_floor


@dataclass(frozen=True)
class Scenario:
    name: str
    sessions: int
    streams: int
    steps: int
    store: str = "redis"  # redis | memory | redis-aof (Redis syncing every write to its append-only file)
    workers: int = 1
    protocol: str = "native"
    rate: float | None = None
    echo: bool = True  # also run it against the echo server
    per_message: int = 1  # fan-in: steps per StreamBatch message
    sdk: bool = False  # fan-in through `BatchClient` (the load generator's CPU is then the SDK's)

    @property
    def server(self) -> tuple[str, int]:
        return self.store, self.workers


SCENARIOS = [
    Scenario("S=1, durable", 1, 1, 2000),
    Scenario("S=256 on 8 streams, durable", 256, 8, 40),
    Scenario("S=256 on 8 streams, in-memory", 256, 8, 40, store="memory", echo=False),
    Scenario("S=256 on 8 streams, durable, 2 workers", 256, 8, 40, workers=2, echo=False),
    Scenario("S=256 on 8 streams, durable, Triton protocol", 256, 8, 40, protocol="triton"),
    Scenario("S=1024 on 16 streams, durable", 1024, 16, 10),
]
FAN_IN = [
    Scenario(f"fan-in: 1,024 sessions, {k} steps per message, durable", 1024, 4, 40 if k > 1 else 4, per_message=k)
    for k in (1, 16, 64, 256)
] + [
    # The default on this machine (one worker per core with Redis). The kernel spreads connections, not
    # streams, over the workers: the load generator's four connections split 2:2, 3:1 or 4:0 by chance.
    Scenario(
        "fan-in: 1,024 sessions, 256 steps per message, durable, 2 workers", 1024, 4, 40, workers=2, per_message=256
    ),
    # The same through the client SDK's `BatchClient`, as a gateway built on it sends: its CPU a step shows
    # in the load generator's column.
    Scenario(
        "fan-in: 1,024 sessions, 256 steps per message, durable, 2 workers, through BatchClient",
        1024,
        4,
        40,
        workers=2,
        echo=False,
        per_message=256,
        sdk=True,
    ),
    # The same on a Redis that syncs every write to disk before it answers (appendfsync always).
    Scenario(
        "fan-in: 1,024 sessions, 256 steps per message, Redis appendfsync always, 2 workers",
        1024,
        4,
        40,
        store="redis-aof",
        workers=2,
        echo=False,
        per_message=256,
    ),
]
SWEEP_RATES = (250, 500, 1000, 1500, 2000, 2500, 3000, 4000)
SWEEP = Scenario("open loop, S=256 on 8 streams, durable", 256, 8, 12, echo=False)


class Servers:
    """One rnnserve per (store, workers) configuration, started when first needed."""

    def __init__(self, model_repo: Path, redis_urls: dict[str, str]) -> None:
        self.model_repo = model_repo
        self.redis_urls = redis_urls  # by store; the in-memory store has none
        self.running: dict[tuple[str, int], tuple[ServerProcess, int]] = {}

    def target(self, scenario: Scenario) -> tuple[str, int]:
        if scenario.server not in self.running:
            store, workers = scenario.server
            metrics_port = free_port()
            server = ServerProcess.rnnserve(
                free_port(),
                self.model_repo,
                self.redis_urls.get(store),
                "--workers",
                str(workers),
                metrics_port=metrics_port,
            )
            server.start()
            self.running[scenario.server] = (server, metrics_port)
        server, metrics_port = self.running[scenario.server]
        return f"127.0.0.1:{server.port}", metrics_port

    def pid(self, scenario: Scenario) -> int:
        process = self.running[scenario.server][0].process
        assert process is not None
        return process.pid

    def stop(self) -> None:
        for server, _ in self.running.values():
            server.stop()


def batch_totals(metrics_port: int) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    sums = [float(v) for v in re.findall(r"^rnnserve_batch_size_sum\{[^}]*\} (\S+)", text, re.M)]
    counts = [float(v) for v in re.findall(r"^rnnserve_batch_size_count\{[^}]*\} (\S+)", text, re.M)]
    return sum(sums), sum(counts)


@dataclass(frozen=True)
class Load:
    """A named load: S sessions × T steps over K streams, K steps per message (fan-in) if above 1."""

    name: str
    sessions: int
    streams: int
    steps: int
    per_message: int = 1

    def spec(self, target: str, *, version: int = VERSION, scale: int = 1) -> LoadSpec:
        """The load generator's spec for it, on MODEL; `scale` divides the steps (a rehearsal)."""
        steps = max(2, self.steps // scale)
        return LoadSpec(
            target, self.sessions, steps, self.streams, model=MODEL, version=version, per_message=self.per_message
        )


def _client_cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


async def measured_load(
    spec: LoadSpec, pid: int, metrics_port: int | None = None, redis_pid: int | None = None
) -> dict[str, Any]:
    """`spec` against a running server (`pid`: its process) after a short warm-up: the load generator's
    summary, with the server's CPU per step and, given its metrics port, its mean batch.

    Also where the machine's CPU went, per step: the server's event loops (`cpu_loop_us_per_step`) and its
    other threads (runtime calls; `cpu_threads_us_per_step`), the load generator (this process), and
    given its process, Redis."""
    warm_up = replace(spec, steps=2, rate=None, sessions=min(spec.sessions, 64))
    await run_load(warm_up)  # a server's first steps pay for lazy set-up: not what is measured
    before = batch_totals(metrics_port) if metrics_port else (0.0, 0.0)
    cpu_before, split_before, client_before = cpu_seconds(pid), cpu_split(pid), _client_cpu_seconds()
    redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
    summary = (await run_load(spec)).summary()
    cpu_after, split_after, client_after = cpu_seconds(pid), cpu_split(pid), _client_cpu_seconds()
    redis_after = cpu_seconds(redis_pid) if redis_pid else 0.0
    steps = max(1, summary["steps"])
    # What the server spends per step, whatever the machine's noise does to latency.
    summary["cpu_us_per_step"] = (cpu_after - cpu_before) * 1e6 / steps
    summary["cpu_loop_us_per_step"] = (split_after[0] - split_before[0]) * 1e6 / steps
    summary["cpu_threads_us_per_step"] = (split_after[1] - split_before[1]) * 1e6 / steps
    summary["client_cpu_us_per_step"] = (client_after - client_before) * 1e6 / steps
    if redis_pid:
        summary["redis_cpu_us_per_step"] = (redis_after - redis_before) * 1e6 / steps
    if metrics_port:
        after = batch_totals(metrics_port)
        summary["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
    return summary


async def measure(
    scenario: Scenario, servers: Servers, echo: str, features: int, redis_pids: dict[str, int] | None = None
) -> dict[str, Any]:
    spec = LoadSpec(
        target="",
        sessions=scenario.sessions,
        steps=scenario.steps,
        streams=scenario.streams,
        protocol=scenario.protocol,
        model=MODEL,
        version=VERSION,
        features=features,
        rate=scenario.rate,
        per_message=scenario.per_message,
        sdk=scenario.sdk,
    )
    target, metrics_port = servers.target(scenario)
    redis = (redis_pids or {}).get(scenario.store)
    server = await measured_load(replace(spec, target=target), servers.pid(scenario), metrics_port, redis)
    out = {"scenario": asdict(scenario), "server": server}
    if scenario.echo:
        out["echo"] = (await run_load(replace(spec, target=echo))).summary()
    return out


async def run(model_repo: Path, only: list[str] | None, quick: bool) -> dict[str, Any]:
    redis = RedisProcess()
    redis.start()
    synced = RedisProcess(durable=True)
    synced.start()
    echo = ServerProcess(free_port(), [], module="bench.echo")
    echo.args = ["--port", str(echo.port)]
    echo.start()
    redis_urls = {"redis": redis.url, "redis-aof": synced.url}
    servers = Servers(model_repo, redis_urls)
    assert redis.process is not None and synced.process is not None
    redis_pids = {"redis": redis.process.pid, "redis-aof": synced.process.pid}
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "onnxruntime": onnxruntime.__version__,
            "cpus": len(os.sched_getaffinity(0)),
        },
        "scenarios": [],
    }
    scale = 10 if quick else 1
    try:
        floor_steps = 2000 // scale
        floor_calls = max(20, floor_steps // 10)  # runtime calls and commits of a batch, each floor
        results["floors"] = {
            "runtime": (await asyncio.to_thread(runtime_floor, model_repo, floor_steps))["batch_1"],
            "redis_commit": (await redis_floor(model_repo, redis.url, floor_steps))["commit"],
        }
        batches = tuple(s.per_message for s in FAN_IN if s.per_message > 1)
        runtime = await asyncio.to_thread(runtime_floor, model_repo, floor_calls, batches)
        results["batch_floors"] = {
            str(batch): {
                "runtime": runtime[f"batch_{batch}"],
                "commit": await pipelined_commit_floor(model_repo, redis.url, floor_calls, batch),
                "commit_synced": await pipelined_commit_floor(model_repo, synced.url, floor_calls, batch),
            }
            for batch in batches
        }
        features = 84
        for scenario in SCENARIOS + FAN_IN:
            if only and scenario.name not in only:
                continue
            scenario = replace(scenario, steps=max(2, scenario.steps // scale))
            # A fan-in load is judged against the floors measured just before and just after it: this
            # machine's speed drifts by a quarter within minutes, so floors measured at the start of the
            # run made the same code's ratio range from 0.33 to 0.49.
            beside = scenario.per_message > 1 and scenario.store in redis_urls
            if beside:
                before = await batch_floors(model_repo, redis_urls[scenario.store], scenario.per_message, floor_calls)
            measured = await measure(scenario, servers, f"127.0.0.1:{echo.port}", features, redis_pids)
            if beside:
                after = await batch_floors(model_repo, redis_urls[scenario.store], scenario.per_message, floor_calls)
                measured["floors"] = {"before": before, "after": after}
            results["scenarios"].append(measured)
        if not only or SWEEP.name in only:
            for rate in SWEEP_RATES:
                sweep = replace(SWEEP, name=f"{SWEEP.name} at {rate}/s", rate=float(rate))
                results["scenarios"].append(await measure(sweep, servers, f"127.0.0.1:{echo.port}", features))
    finally:
        servers.stop()
        echo.stop()
        redis.close()
        synced.close()
    return results


async def batch_floors(model_repo: Path, redis_url: str, batch: int, calls: int) -> dict[str, Any]:
    """Both floors at `batch`, measured now: one ONNX Runtime call, and one pipelined compare-and-set on the
    Redis at `redis_url` (p50 of `calls` each, per call of `batch` sessions)."""
    runtime = await asyncio.to_thread(runtime_floor, model_repo, calls, (batch,))
    commit = await pipelined_commit_floor(model_repo, redis_url, calls, batch)
    return {"runtime": runtime[f"batch_{batch}"], "commit": commit}


def floor_ratio(row: dict[str, Any]) -> tuple[float, float, float] | None:
    """A fan-in row's steps/s against the rate its slower floor allows, for the floors measured just before
    and just after its load: (against their mean, against the one before, against the one after). None for a
    row measured without them."""
    floors, batch = row.get("floors"), row["scenario"]["per_message"]
    if not floors:
        return None
    allowed = [
        1e6 * batch / max(floors[when]["runtime"]["p50_us"], floors[when]["commit"]["p50_us"])
        for when in ("before", "after")
    ]
    rate = row["server"]["steps_per_s"]
    return rate / (sum(allowed) / 2), rate / allowed[0], rate / allowed[1]


def table(results: dict[str, Any]) -> str:
    floors = results["floors"]
    columns = " | ".join(
        ("scenario", "steps/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "errors", "mean batch")
        + ("server CPU µs/step", "echo steps/s", "vs echo")
    )
    lines = [f"| {columns} |", "| --- " + "| ---: " * 11 + "|"]
    for row in results["scenarios"]:
        s, e = row["server"], row.get("echo")
        ratio = f"{s['steps_per_s'] / e['steps_per_s']:.2f}" if e else ""
        echo_rate = f"{e['steps_per_s']:.0f}" if e else ""
        errors = sum(s["errors"].values())
        lines.append(
            f"| {row['scenario']['name']} | {s['steps_per_s']:.0f} | {s['p50_us']} | {s['p90_us']} | {s['p99_us']} "
            f"| {s['p999_us']} | {s['max_us']} | {errors} | {s['mean_batch']:.1f} | {s['cpu_us_per_step']:.0f} "
            f"| {echo_rate} | {ratio} |"
        )
    for batch, floor in results.get("batch_floors", {}).items():
        per_step = {name: floor[name]["p50_us"] / int(batch) for name in floor}
        lines.append(
            f"batch {batch}: ONNX Runtime {floor['runtime']['p50_us']:.0f} µs ({per_step['runtime']:.1f} µs/step), "
            f"pipelined compare-and-set {floor['commit']['p50_us']:.0f} µs ({per_step['commit']:.1f} µs/step)"
            + (
                f", on a Redis syncing every write {floor['commit_synced']['p50_us']:.0f} µs "
                f"({per_step['commit_synced']:.1f} µs/step)"
                if "commit_synced" in floor
                else ""
            )
        )
        for row in results["scenarios"]:
            if row["scenario"]["per_message"] != int(batch):
                continue
            rate = row["server"]["steps_per_s"]
            if (ratios := floor_ratio(row)) is not None:
                lines.append(
                    f"  {row['scenario']['name']}: {rate:.0f} steps/s; {ratios[0]:.2f} x the slower floor "
                    f"measured beside it ({ratios[1]:.2f} x the one before, {ratios[2]:.2f} x the one after)"
                )
                continue
            synced = row["scenario"]["store"] == "redis-aof"
            commit = per_step["commit_synced" if synced else "commit"]
            ceiling = 1e6 / max(per_step["runtime"], commit)  # the slower floor, on that scenario's Redis
            lines.append(
                f"  {row['scenario']['name']}: {rate:.0f} steps/s; the slower floor allows {ceiling:.0f}: "
                f"{rate / ceiling:.2f} x"
            )
    lines += cpu_budget(results)
    single = next((r for r in results["scenarios"] if r["scenario"]["sessions"] == 1 and r.get("echo")), None)
    if single:
        echo, step, cas = single["echo"]["p50_us"], floors["runtime"]["p50_us"], floors["redis_commit"]["p50_us"]
        floor = echo + step + cas
        p50 = single["server"]["p50_us"]
        lines += [
            "",
            f"S=1 floor: echo p50 {echo} µs + ONNX Runtime step {step:.0f} µs + Redis compare-and-set {cas:.0f} µs"
            f" = {floor:.0f} µs; rnnserve p50 {p50} µs = {p50 / floor:.2f} x the floor",
        ]
    return "\n".join(lines)


def cpu_budget(results: dict[str, Any]) -> list[str]:
    """Where the machine's CPU went per step in the fan-in scenarios, and the rate that spending allows
    on all of the machine's CPUs: what limits fan-in where the client, the server and Redis share them."""
    scenarios = results["scenarios"]
    rows = [r for r in scenarios if r["scenario"]["per_message"] > 1 and "redis_cpu_us_per_step" in r["server"]]
    if not rows:
        return []
    cpus = results["machine"].get("cpus") or os.cpu_count() or 1
    lines = [
        "",
        "| fan-in scenario | event loops µs/step | other server threads µs/step | Redis µs/step "
        f"| load generator µs/step | total µs/step | {cpus} CPUs allow steps/s | measured steps/s |",
        "| --- " + "| ---: " * 7 + "|",
    ]
    for row in rows:
        s = row["server"]
        parts = [s[k] for k in ("cpu_loop_us_per_step", "cpu_threads_us_per_step", "redis_cpu_us_per_step")]
        parts.append(s["client_cpu_us_per_step"])
        total = sum(parts)
        figures = " | ".join(f"{p:.1f}" for p in parts)
        allowed = cpus * 1e6 / total
        name = row["scenario"]["name"]
        lines.append(f"| {name} | {figures} | {total:.1f} | {allowed:.0f} | {s['steps_per_s']:.0f} |")
    return lines


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [r for r in results["scenarios"] if r["scenario"]["rate"]]
    if not sweep:
        return False
    achieved = [r["server"]["steps_per_s"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        ax.plot(achieved, [r["server"][key] / 1000 for r in sweep], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("steps per second (achieved, open loop, 256 sessions on 8 streams)")
    ax.set_ylabel("step latency, ms (from when the step was due)")
    ax.set_title(f"rnnserve {MODEL}/{VERSION}, durable Redis state — {results['date']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(model_repo: Path, json_path: Path, plot_path: Path, only: list[str] | None, quick: bool) -> int:
    results = asyncio.run(run(model_repo, only, quick))
    print(table(results))
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {json_path}")
    if plot(results, plot_path):
        print(f"wrote {plot_path}")
    return 0
