"""`rnnserve bench`: the floors (default), one load against a running server, or the published suite."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc

PROTOCOLS = ("native", "triton")


def add_bench_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="measure: per-step cost next to its floors (default), a load, or the published suite",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    bench.add_argument("--redis-url", help="Redis to measure against; default: a private redis-server")
    bench.add_argument("--steps", type=int, default=2000, help="steps per floor measurement")
    bench.add_argument("--long-steps", type=int, default=10000, help="length of the flatness stream (>= 2000)")
    bench.add_argument("--sessions", type=int, default=64, help="concurrent sessions for the load figure")
    bench.add_argument("--json", type=Path, help="also write the figures here")
    kinds = bench.add_subparsers(dest="bench_command")

    def kind(name: str, help: str) -> argparse.ArgumentParser:
        return kinds.add_parser(  # type: ignore[no-any-return]
            name, parents=[common], help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )

    load = kind("load", "one load against a running server: S sessions x T steps over K streams")
    load.add_argument("--target", required=True, help="host:port of the server")
    load.add_argument("--sessions", type=int, default=256, help="S: sessions, all at once")
    load.add_argument("--steps", type=int, default=40, help="T: steps per session (the start included)")
    load.add_argument("--streams", type=int, default=8, help="K: streams the sessions are spread over")
    load.add_argument("--protocol", choices=PROTOCOLS, default="native")
    load.add_argument("--rate", type=float, help="open loop: steps per second in all; default: ping-pong")
    load.add_argument("--chunk", type=int, default=1, help="time steps per request")
    load.add_argument("--per-message", type=int, default=1, help="fan-in: sessions' steps per StreamBatch message")
    load.add_argument(
        "--in-flight", type=int, default=1, help="fan-in: messages each group keeps unanswered (a pipelining gateway)"
    )
    load.add_argument("--model", default="charlm-lstm")
    load.add_argument("--version", type=int, default=0, help="0: the newest version the server loads")
    load.add_argument("--features", type=int, default=84, help="the model's input features")
    load.add_argument(
        "--no-spread",
        dest="spread",
        action="store_false",
        help="keep the connections where the kernel put them (default: reopen them until they spread evenly "
        "over the server's worker processes)",
    )
    load.add_argument(
        "--sdk",
        action="store_true",
        help="fan-in through service.client.BatchClient, as a gateway built on it (default: the lean encoder, "
        "which measures the server)",
    )
    load.add_argument("--json", type=Path, help="also write the figures here")

    ab = kind("ab", "this checkout against an earlier commit: servers from both take turns under the same loads")
    ab.add_argument("--base", required=True, help="the commit (or any git revision) to compare against")
    ab.add_argument("--rounds", type=int, default=3, help="turns each; the figures are their medians")
    ab.add_argument("--workers", type=int, default=1, help="worker processes of each server")
    ab.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository (both use it)")

    engine = kind("engine", "the session engine alone, no gRPC: a fan-in step's CPU on the event loop and in all")
    engine.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    engine.add_argument("--model", default="charlm-lstm")
    engine.add_argument("--version", type=int, default=7)
    engine.add_argument("--sessions", type=int, default=1024, help="S: sessions, each stepping once a round")
    engine.add_argument("--per-message", type=int, default=256, help="K: steps submitted together")
    engine.add_argument("--rounds", type=int, default=40, help="measured rounds (after two of warm-up)")

    replication = kind(
        "replication",
        "what --redis-wait-replicas 1 costs: a primary and a replica started here, servers with 0 and 1 in turns",
    )
    replication.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    replication.add_argument("--rounds", type=int, default=3, help="turns each; the figures are their medians")
    replication.add_argument("--json", type=Path, default=Path("docs/bench-replication.json"), help="figures (JSON)")

    capacity = kind(
        "capacity",
        "the capacity model's figures: Redis (one, and a cluster) per session and commit, pod memory, wire bytes",
    )
    capacity.add_argument("--json", type=Path, default=Path("docs/bench-capacity.json"), help="figures (JSON)")

    failover = kind(
        "failover", "steps lost and refused when a Redis Cluster primary is killed, with --redis-wait-replicas 0 and 1"
    )
    failover.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    failover.add_argument("--kills", type=int, default=3, help="primaries killed in each run, a shard at a time")
    failover.add_argument("--sessions", type=int, default=1000, help="concurrent sessions")
    failover.add_argument("--json", type=Path, default=Path("docs/bench-failover.json"), help="figures (JSON)")

    soak = kind(
        "soak", "many sessions for minutes against two replicas on one Redis: per-minute steps, errors, p99, memory"
    )
    soak.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    soak.add_argument("--minutes", type=int, default=10, help="how long; the streams move replica every minute")
    soak.add_argument("--sessions", type=int, default=1000, help="concurrent sessions")
    soak.add_argument("--streams", type=int, default=16, help="streams carrying them (half on each replica)")
    soak.add_argument("--rate", type=float, default=1.0, help="steps per second of each session")
    soak.add_argument("--model", default="charlm-lstm", help="the model every session streams to")
    soak.add_argument("--json", type=Path, default=Path("docs/bench-soak.json"), help="figures (JSON)")

    suite = kind(
        "suite", "the published figures: servers, Redis and the echo baseline started here (docs/BENCHMARKS.md)"
    )
    suite.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    suite.add_argument("--json", type=Path, default=Path("docs/bench-load.json"), help="figures (JSON)")
    suite.add_argument("--plot", type=Path, default=Path("docs/bench-load.png"), help="latency against load (PNG)")
    suite.add_argument("--only", nargs="*", help="run only these scenarios (names as in the table)")
    suite.add_argument("--quick", action="store_true", help="fewer steps: a rehearsal, not figures to publish")


def run_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "load":
        return _run_load(args)
    if args.bench_command == "ab":
        from bench.ab import main as ab_main

        return ab_main(args.base, args.rounds, args.workers, args.model_repo)
    if args.bench_command == "engine":
        from bench.engine import main as engine_main

        return engine_main(args.model_repo, args.model, args.version, args.sessions, args.per_message, args.rounds)
    if args.bench_command == "replication":
        from bench.replication import main as replication_main

        return replication_main(args.model_repo, args.json, args.rounds)
    if args.bench_command == "capacity":
        from bench.capacity import main as capacity_main

        return capacity_main(args.json)
    if args.bench_command == "failover":
        from bench.failover import main as failover_main

        return failover_main(args.model_repo, args.json, args.kills, args.sessions)
    if args.bench_command == "soak":
        from bench.soak import main as soak_main

        return soak_main(args.model_repo, args.minutes, args.sessions, args.streams, args.rate, args.model, args.json)
    if args.bench_command == "suite":
        from bench.suite import main as suite_main

        return suite_main(args.model_repo, args.json, args.plot, args.only, args.quick)
    if args.long_steps < 2000:
        raise SystemExit("--long-steps must be at least 2000: the flatness figure compares its first and last 1000")
    from bench.step_latency import main as floors_main

    return floors_main(args.model_repo, args.redis_url, args.steps, args.long_steps, args.sessions, args.json)


def _run_load(args: argparse.Namespace) -> int:
    from bench.load import LoadSpec, run_load

    try:
        spec = LoadSpec(
            target=args.target,
            sessions=args.sessions,
            steps=args.steps,
            streams=args.streams,
            protocol=args.protocol,
            model=args.model,
            version=args.version,
            features=args.features,
            chunk=args.chunk,
            rate=args.rate,
            per_message=args.per_message,
            in_flight=args.in_flight,
            spread=args.spread,
            sdk=args.sdk,
        )
    except ValueError as err:
        print(f"rnnserve bench load: {err}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run_load(spec)).summary()
    except (TimeoutError, ConnectionError, grpc.aio.AioRpcError) as err:
        why = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.aio.AioRpcError) else str(err)
        print(
            f"rnnserve bench load: the load against {spec.target} failed: {why or type(err).__name__}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if not summary["errors"] else 1
