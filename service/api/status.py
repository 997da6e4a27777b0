"""The one place where errors become gRPC statuses."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import grpc

from service.errors import Code, RnnServeError
from service.metrics import Metrics

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged it. Retry, and report it if it persists"
_STATUS = {status.value[0]: status for status in grpc.StatusCode}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class HasMetrics(Protocol):
    metrics: Metrics


S = TypeVar("S", bound=HasMetrics)
Handler = Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def grpc_status(code: Code) -> grpc.StatusCode:
    return _STATUS[int(code)]


def classify(err: BaseException, method: str) -> tuple[Code, str]:
    """(code, client-safe message) for any exception; unknown ones are logged with their traceback."""
    if isinstance(err, RnnServeError):
        return err.code, err.message
    log.error("unexpected error in %s", method, exc_info=err)
    return Code.INTERNAL, INTERNAL_MESSAGE


def unary(handler: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
    """Wrap a unary servicer method: RnnServeError -> its status; anything else -> INTERNAL, logged."""

    @functools.wraps(handler)
    async def wrapped(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await handler(self, request, context)
        except Exception as err:  # noqa: BLE001 - classified, never leaked
            code, message = classify(err, handler.__name__)
            self.metrics.errors.labels(handler.__name__, code.name).inc()
            await context.abort(grpc_status(code), message)
            raise AssertionError("unreachable: abort raises") from err

    return wrapped
