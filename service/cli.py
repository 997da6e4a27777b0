"""`rnnserve`: serve | demo. Flags override RNNSERVE_* environment variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from service.errors import RnnServeError, StartupError
from service.repository import RepositoryError
from service.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve", description="Streaming inference for recurrent models")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train a model (the train extra; `rnnserve train --help`)")
    commands.add_parser("export", help="export, validate and publish a checkpoint (`rnnserve export --help`)")

    serve = commands.add_parser("serve", help="serve a model repository over gRPC")
    serve.add_argument("--model-repo", type=Path, help="model repository directory")
    serve.add_argument("--redis-url", help="redis:// or rediss:// URL; without it, state stays in memory")
    serve.add_argument("--host", help="address to listen on (default [::])")
    serve.add_argument("--port", type=int, help="gRPC port (default 8500; 0 picks one)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9090)")

    demo = commands.add_parser("demo", help="stream held-out text to the character model and show its guesses")
    demo.add_argument("--model-repo", type=Path, default=Path("models"))
    demo.add_argument("--target", help="host:port of a running server; default: start one in this process")
    demo.add_argument("--steps", type=int, default=160, help="held-out characters to stream")
    demo.add_argument("--generate", type=int, default=200, help="characters the model writes afterwards")
    demo.add_argument("--model", default="charlm-lstm", help="the language model to stream to")

    bench = commands.add_parser("bench", help="per-step cost next to its floors (ONNX Runtime, Redis, gRPC)")
    bench.add_argument("--model-repo", type=Path, default=Path("models"))
    bench.add_argument("--redis-url", help="Redis to measure against; default: a private redis-server")
    bench.add_argument("--steps", type=int, default=2000, help="steps per measurement")
    bench.add_argument("--long-steps", type=int, default=10000, help="length of the flatness stream")
    bench.add_argument("--sessions", type=int, default=64, help="concurrent sessions for the load figure")
    bench.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "model_repo": args.model_repo,
            "host": args.host,
            "port": args.port,
            "metrics_port": args.metrics_port,
        }.items()
        if value is not None
    }
    if args.redis_url is not None:
        overrides["redis"] = {"url": args.redis_url}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["export"]):  # the offline pipeline: needs the train extra
        from export.cli import main as export_main

        return export_main(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        try:
            asyncio.run(_serve(settings_from(args)))
        except (RnnServeError, RepositoryError, StartupError, ValueError) as err:
            logging.getLogger("rnnserve").error("cannot serve: %s", err)
            return 2
        return 0
    if args.command == "bench":
        from bench.step_latency import main as bench_main  # the bench package ships beside service

        return bench_main(args.model_repo, args.redis_url, args.steps, args.long_steps, args.sessions, args.json)
    from service.demo import main_sync

    return main_sync(args.model_repo, args.target, args.steps, args.generate, args.model)


async def _serve(settings: Settings) -> None:
    from service.server import serve

    await serve(settings)


if __name__ == "__main__":
    sys.exit(main())
