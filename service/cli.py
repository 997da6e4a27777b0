"""`rnnserve`: serve | demo | health | token | bench | train | export.

Every `serve` setting is a flag, generated from `service/settings.py` (`--redis-url`, `--batching-max-batch-size`,
...), and an environment variable (`RNNSERVE_REDIS__URL`, `RNNSERVE_BATCHING__MAX_BATCH_SIZE`, ...); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from service.client import ClientTls
from service.errors import RnnServeError, StartupError
from service.repository import RepositoryError
from service.settings import Settings

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OFFLINE = {"train": "train a model (needs the train extra)", "export": "export, validate and publish a checkpoint"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve", description="Streaming inference for recurrent models")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help="default INFO")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", help="default INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, about in OFFLINE.items():  # parsed by export/cli.py (see main)
        commands.add_parser(name, help=f"{about} (`rnnserve {name} --help`)", add_help=False)

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve a model repository over gRPC",
        description="Serve a model repository over gRPC. Each flag overrides the environment variable named "
        "after it; unset flags keep the variable's value, or the default.",
    )
    add_settings_flags(serve, Settings)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="stream held-out text to a character model and show its guesses",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    demo.add_argument("--target", help="host:port of a running server; default: start one in this process")
    demo.add_argument("--steps", type=_at_least(1), default=160, help="held-out characters to stream")
    demo.add_argument("--generate", type=_at_least(0), default=200, help="characters the model writes afterwards")
    demo.add_argument("--model", default="charlm-lstm", help="the character language model to stream to")
    _add_client_tls_flags(demo)
    demo.add_argument(
        "--token",
        default=os.environ.get("RNNSERVE_TOKEN"),
        help="bearer token, for a server with tenants (--auth-token-file); default: the RNNSERVE_TOKEN variable",
    )

    token = commands.add_parser(
        "token",
        parents=[common],
        help="make a bearer token for a tenant and add its salted hash to a token file",
        description="Print a new random token for TENANT and append its line (a salted hash, never the token) to "
        "FILE, created if missing (mode 0600). Give the token to the tenant's clients; serve with "
        "--auth-token-file FILE.",
    )
    token.add_argument("--file", type=Path, required=True, help="the token file (serve --auth-token-file)")
    token.add_argument("--tenant", required=True, help="1 to 64 letters, digits or . _ -")

    health = commands.add_parser(
        "health",
        parents=[common],
        help="ask a server's gRPC health service; exit 0 if it is SERVING (container health checks)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    health.add_argument("--target", default="127.0.0.1:8500", help="host:port of the server")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    health.add_argument("--service", default="", help="the health service name ('' is the whole server)")
    _add_client_tls_flags(health)

    from bench.cli import add_bench_parser  # the bench package ships beside service

    add_bench_parser(commands, common)
    return parser


def _add_client_tls_flags(parser: argparse.ArgumentParser) -> None:
    """How a client command reaches a server that speaks TLS (`--tls-cert`/`--tls-key` on serve)."""
    tls = parser.add_argument_group("TLS, for a server that speaks it")
    tls.add_argument("--tls", action="store_true", help="TLS, checking the server against the system's CAs")
    tls.add_argument("--tls-ca", type=Path, help="the CA certificate(s) that signed the server's (PEM); implies --tls")
    tls.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), for mutual TLS")
    tls.add_argument("--tls-key", type=Path, help="this client's private key (PEM), for mutual TLS")
    tls.add_argument("--tls-server-name", help="the name to check in the server's certificate, if not the target's")


def _client_tls(args: argparse.Namespace) -> ClientTls | None:
    """ValueError for an incomplete pair or a file that cannot be read (said before any connection)."""
    wanted = args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name
    if not wanted:
        return None
    for path in (args.tls_ca, args.tls_cert, args.tls_key):
        if path is not None:
            try:
                path.read_bytes()
            except OSError as err:
                raise ValueError(f"cannot read {path}: {err.strerror or err}") from err
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "") -> None:
    """A flag per settings field, nested groups included (`redis.url` -> `--redis-url`)."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            add_settings_flags(parser, annotation, f"{prefix}{name}.")
            continue
        path = f"{prefix}{name}"
        flag = "--" + path.replace(".", "-").replace("_", "-")
        env = "RNNSERVE_" + path.replace(".", "__").upper()
        help_text = f"{info.description or ''} [env {env}; default {_default(info)}]".replace("%", "%%")
        kind = _kind(annotation)
        # SUPPRESS: a flag not given is absent, so an explicit "none" (None) can override a default.
        if kind is bool:
            parser.add_argument(
                flag, dest=path, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag, dest=path, type=kind, default=argparse.SUPPRESS, metavar=_metavar(annotation), help=help_text
            )


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return ",".join(value) if isinstance(value, list) else value
    return "none" if info.default is None else info.default


def _kind(annotation: Any) -> Any:
    """How a flag's text becomes the field's value."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is list:
        return _comma_list
    if args and type(None) in get_args(annotation):  # Optional[X]: "none" unsets it
        inner = args[0]

        def optional(text: str) -> Any:
            return None if text.lower() == "none" else inner(text)

        optional.__name__ = getattr(inner, "__name__", "value")  # argparse names it in its errors: "invalid int value"
        return optional
    return annotation


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _metavar(annotation: Any) -> str:
    if get_origin(annotation) is list:
        return "A,B"
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    name = {int: "N", float: "X", Path: "PATH", str: "TEXT"}.get(base, "VALUE")
    return f"{name}|none" if type(None) in get_args(annotation) else name


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    overrides: dict[str, Any] = {}
    for path, value in vars(args).items():
        if "." not in path and path not in Settings.model_fields:
            continue
        target = overrides
        *groups, field = path.split(".")
        if field not in _fields_of(groups):
            continue
        for group in groups:
            target = target.setdefault(group, {})
        target[field] = value
    return Settings(**overrides)


def _fields_of(groups: list[str]) -> dict[str, FieldInfo]:
    model: type[BaseModel] = Settings
    for group in groups:
        model = model.model_fields[group].annotation  # type: ignore[assignment]
    return model.model_fields


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    offline = _offline_command(argv)
    if offline is not None:
        level, command, rest = offline
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return _offline(command, rest)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format=os.environ.get("RNNSERVE_LOG_FORMAT", LOG_FORMAT))
    if args.command == "serve":
        return _serve(args)
    try:
        tls = _client_tls(args) if args.command in ("health", "demo") else None
    except ValueError as err:  # a certificate without its key, a file that cannot be read
        print(f"rnnserve {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command == "health":
        return _health(args.target, args.service, args.timeout, tls)
    if args.command == "token":
        return _token(args.file, args.tenant)
    if args.command == "bench":
        from bench.cli import run_bench

        return run_bench(args)
    from service.demo import main_sync

    return main_sync(args.model_repo, args.target, args.steps, args.generate, args.model, tls, args.token)


def _token(path: Path, tenant: str) -> int:
    """A new token on stdout; its salted hash appended to the token file (made 0600 if new)."""
    from service.auth import new_token

    try:
        token, line = new_token(tenant)
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "rb+") as file:
            size = file.seek(0, os.SEEK_END)
            last = b""
            if size:
                file.seek(size - 1)
                last = file.read(1)
            # A last line without its newline (as editors leave it) must not run into the new one.
            file.write((b"\n" if last not in (b"", b"\n") else b"") + line.encode() + b"\n")
    except (OSError, ValueError) as err:
        print(f"rnnserve token: {err}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _health(target: str, service: str, timeout_s: float, tls: ClientTls | None = None) -> int:
    """0 if the server answers SERVING, 1 otherwise (NOT_SERVING while draining or while the session
    store is unreachable), 2 if it cannot be reached or does not know the service; the status goes to
    stdout."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, tls.credentials(), options=tls.options())
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as err:
            print(f"{target}: {err.code().name}: {err.details()}")
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _offline_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """(log level, command, its arguments) when argv runs train or export: their flags are theirs."""
    level, i = "INFO", 0
    while i < len(argv) and argv[i].startswith("--log-level"):
        if "=" in argv[i]:
            level, i = argv[i].partition("=")[2], i + 1
        elif i + 1 < len(argv):
            level, i = argv[i + 1], i + 2
        else:
            return None
    if i < len(argv) and argv[i] in OFFLINE and level in LOG_LEVELS:
        return level, argv[i], argv[i + 1 :]
    return None


def _offline(command: str, rest: list[str]) -> int:
    try:
        from export.cli import main as export_main
    except ModuleNotFoundError as err:
        print(
            f"rnnserve {command} needs the train extra ({err.name} is missing): pip install 'rnnserve[train]' "
            "(in this repository: make venv-dev)",
            file=sys.stderr,
        )
        return 2
    return export_main([command, *rest])


def _serve(args: argparse.Namespace) -> int:
    log = logging.getLogger("rnnserve")
    try:
        settings = settings_from(args)
        from service.workers import serve_workers

        return serve_workers(settings)
    except ValidationError as err:  # a setting out of range, from a flag or the environment
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        log.error("cannot serve: %s", problems)
        return 2
    except (RnnServeError, RepositoryError, StartupError, ValueError) as err:
        log.error("cannot serve: %s", err)
        return 2


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value

    return parse


def serve_in_process(settings: Settings) -> None:
    from service.server import serve

    asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
