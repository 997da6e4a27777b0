"""The whole service on a GPU node: `rnnserve serve` with the CUDA provider against the CPU provider.

    python -m bench.gpu_service prepare --out .gpu                 # here: model repo, redis-server
    python -m bench.gpu_service measure --prepared .gpu --json F   # there (or here, --providers cpu)

`prepare` writes a model repository holding the shipped charlm-lstm fp32 (`VERSION`) and its fp16 variant
(`VERSION` + 1; fp16 inside, fp32 at the edge; for measurement only: fp16 variants are published only where
their held-out metric can be checked under CUDA), and a copy of this machine's `redis-server` with the
libraries it links that a bare image may lack. `measure` starts a private redis-server (or, if it cannot
run, uses the in-memory store, and says so), then for each configuration (provider, precision, worker
processes, IOBinding) a server, and runs the loads against it with the load generator in this process:
one session ping-pong, 256 sessions on 8 streams, 4,096 sessions on 16 streams, and fan-in (1,024 sessions,
256 steps per message). It reports steps/s, p50 and p99, the server's CPU per step and its mean batch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.process import ROOT, RedisProcess, ServerProcess, free_port
from bench.step_latency import MODEL, VERSION
from bench.suite import Load, measured_load

VERSIONS = {"fp32": VERSION, "fp16": VERSION + 1}
PROVIDERS = {"cuda": "CUDAExecutionProvider,CPUExecutionProvider", "cpu": "CPUExecutionProvider"}
# Libraries redis-server links that are not part of a base image with Python (libc, libm, libstdc++,
# libgcc_s and the like are).
_REDIS_LIBS = ("liblzf", "libjemalloc", "libatomic", "libsystemd", "libcap", "libgcrypt", "libgpg-error", "liblz4")


LOADS = (
    Load("S=1, ping-pong", 1, 1, 1000),
    Load("S=256 on 8 streams", 256, 8, 40),
    Load("S=4,096 on 16 streams", 4096, 16, 10),
    Load("fan-in: 1,024 sessions, 256 steps per message", 1024, 4, 40, per_message=256),
)


@dataclass(frozen=True)
class Config:
    provider: str  # cuda | cpu
    precision: str  # fp32 | fp16
    workers: int
    io_binding: bool = False

    @property
    def name(self) -> str:
        binding = ", IOBinding" if self.io_binding else ""
        return f"{self.provider} {self.precision}, {self.workers} worker{'s' if self.workers > 1 else ''}{binding}"


def configs(providers: list[str], cores: int) -> list[Config]:
    out = []
    if "cuda" in providers:
        out += [
            Config("cuda", "fp32", 1),
            Config("cuda", "fp32", 1, io_binding=True),
            Config("cuda", "fp16", 1),
            Config("cuda", "fp32", 4),
            *([Config("cuda", "fp32", cores)] if cores > 4 else []),  # a worker per core, each a CUDA context
        ]
    if "cpu" in providers:
        out += [Config("cpu", "fp32", 1), Config("cpu", "fp32", cores)]
    return out


# -- prepare (here) ----------------------------------------------------------------------------------


def prepare(out: Path, model_repo: Path) -> None:
    from export.quantize import to_fp16
    from service.repository import MODEL_FILE, read_manifest, write_version

    repo = out / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    source = model_repo / MODEL / str(VERSION)
    fp32 = read_manifest(source)
    model = (source / MODEL_FILE).read_bytes()
    write_version(repo, fp32, model)
    half = to_fp16(model)
    manifest = fp32.model_copy(
        update={"version": VERSIONS["fp16"], "precision": "fp16", "fingerprint": hashlib.sha256(half).hexdigest()}
    )
    write_version(repo, manifest, half)
    _copy_redis(out)
    print(f"prepared {out}: {MODEL} fp32 ({VERSION}) and fp16 ({VERSION + 1}), redis-server")


def _copy_redis(out: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        return
    bin_dir, lib_dir = out / "bin", out / "lib"
    bin_dir.mkdir(parents=True, exist_ok=True)
    lib_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(binary, bin_dir / "redis-server.bin")
    linked = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for line in linked.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[0].strip().startswith(_REDIS_LIBS):
            path = parts[1].split("(")[0].strip()
            shutil.copy(path, lib_dir / Path(path).name)
    wrapper = bin_dir / "redis-server"
    wrapper.write_text(
        '#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\n'
        'LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"\n'
    )
    wrapper.chmod(0o755)


# -- measure (there) ---------------------------------------------------------------------------------


def _redis(prepared: Path) -> RedisProcess | None:
    os.environ["PATH"] = f"{(prepared / 'bin').resolve()}:{os.environ['PATH']}"
    server = RedisProcess()
    try:
        server.start()
    except Exception as err:  # noqa: BLE001 - reported: the figures then use the in-memory store
        print(f"redis-server did not start ({type(err).__name__}: {err}); using the in-memory store", flush=True)
        return None
    return server


async def _load(server: ServerProcess, metrics_port: int, load: Load, version: int, scale: int) -> dict[str, Any]:
    assert server.process is not None
    spec = load.spec(f"127.0.0.1:{server.port}", version=version, scale=scale)
    return await measured_load(spec, server.process.pid, metrics_port)


async def measure(prepared: Path, providers: list[str], scale: int, log_dir: Path) -> dict[str, Any]:
    redis = _redis(prepared)
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "store": "redis" if redis else "memory",
        "cores": cores,
        "runs": [],
    }
    try:
        for config in configs(providers, cores):
            metrics_port = free_port()
            args = ["--workers", str(config.workers), "--runtime-providers", PROVIDERS[config.provider]]
            args += ["--runtime-io-binding"] if config.io_binding else []
            log = log_dir / f"server-{config.provider}-{config.precision}-{config.workers}-{int(config.io_binding)}.log"
            server = ServerProcess.rnnserve(
                free_port(),
                (prepared / "repo").resolve(),
                redis.url if redis else None,
                *args,
                metrics_port=metrics_port,
                log=log,
                source=ROOT,
            )
            started = time.perf_counter()
            try:
                server.start(timeout_s=180)
            except RuntimeError as err:
                results["runs"].append({"config": asdict(config), "error": str(err)})
                print(f"{config.name}: {err}", flush=True)
                continue
            in_use = _providers_in_use(metrics_port)
            print(f"{config.name}: serving in {time.perf_counter() - started:.1f}s on {in_use}", flush=True)
            results["runs"].append({"config": asdict(config), "providers": in_use})
            try:
                for load in LOADS:
                    try:
                        figures = await _load(server, metrics_port, load, VERSIONS[config.precision], scale)
                    except Exception as err:  # noqa: BLE001 - one failed load must not cost the others
                        figures = {"error": f"{type(err).__name__}: {err}"}
                    results["runs"].append({"config": asdict(config), "load": asdict(load), "figures": figures})
                    print(f"  {load.name}: {_row_figures(figures)}", flush=True)
            finally:
                server.stop()
    finally:
        if redis:
            redis.close()
    return results


def _providers_in_use(metrics_port: int) -> dict[str, str]:
    """model/version -> the provider it really runs on, as the server's /metrics says (a server asked for
    CUDA that cannot run it falls back to the CPU and says so there)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(r"^rnnserve_model_info\{([^}]*)\}", text, re.M)
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in found]
    return {f"{m['model']}/{m['version']}": m["provider"] for m in labels if "provider" in m}


def _row_figures(f: dict[str, Any]) -> str:
    if "error" in f:
        return f"error: {f['error']}"
    errors = sum(f["errors"].values())
    return (
        f"{f['steps_per_s']:.0f} steps/s, p50 {f['p50_us'] / 1000:.2f} ms, p99 {f['p99_us'] / 1000:.2f} ms, "
        f"errors {errors}, CPU {f['cpu_us_per_step']:.0f} µs/step, mean batch {f['mean_batch']:.1f}"
    )


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['date']}, {results['cores']} cores, store: {results['store']}",
        "",
        "| configuration | load | steps/s | p50 ms | p99 ms | errors | server CPU µs/step | mean batch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in results["runs"]:
        config = Config(**run["config"])
        if "providers" in run:
            where = ", ".join(f"{model} on {provider}" for model, provider in sorted(run["providers"].items()))
            lines.append(f"| {config.name} | (models: {where}) | | | | | | |")
            continue
        if "error" in run:
            lines.append(f"| {config.name} | | did not start: {run['error']} | | | | | |")
            continue
        f, load = run["figures"], run["load"]["name"]
        if "error" in f:
            lines.append(f"| {config.name} | {load} | {f['error']} | | | | | |")
            continue
        lines.append(
            f"| {config.name} | {load} | {f['steps_per_s']:.0f} | {f['p50_us'] / 1000:.2f} | {f['p99_us'] / 1000:.2f} "
            f"| {sum(f['errors'].values())} | {f['cpu_us_per_step']:.0f} | {f['mean_batch']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_service", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="the model repository and redis-server copy to carry")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--model-repo", type=Path, default=ROOT / "models")
    run = commands.add_parser("measure", help="every configuration under every load")
    run.add_argument("--prepared", type=Path, required=True)
    run.add_argument("--providers", default="cuda,cpu", help="comma-separated: cuda, cpu")
    run.add_argument("--scale", type=int, default=1, help="divide every load's steps by this (a rehearsal)")
    run.add_argument("--json", type=Path, help="also write the figures here")
    run.add_argument("--logs", type=Path, default=Path("."), help="where the servers' logs go")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.model_repo)
        return 0
    args.logs.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(measure(args.prepared, args.providers.split(","), args.scale, args.logs))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
