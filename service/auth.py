"""Tenants: bearer tokens checked against a file of salted hashes, and the tenant each one names.

The token file holds one line per token, `TENANT sha256:SALT:DIGEST` (hex; DIGEST = sha256(SALT + token)),
blank lines and `#` comments aside. A tenant may hold several tokens (rotation: add the new one, move
clients over, remove the old). `rnnserve token --file F --tenant T` makes a token and appends its line.

A token reads `rns_<SALT>_<SECRET>`: 256 random bits of secret, and the salt of its own line, so the
server finds that one line and computes one hash, however many lines the file holds and whatever a caller
sends (an unknown token costs what a known one does: about a microsecond). The secret is random, so one
round of a salted hash guards it as well as a slow password hash would: there is nothing to guess. The
file is read again when it changes (checked at most every `auth.reload_interval_s`); a removed token is
refused from the next call, and an open stream that carries it is ended at its next request after that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from service.errors import PermissionDenied, StartupError, Unauthenticated
from service.settings import TENANT_PATTERN, AuthSettings

log = logging.getLogger(__name__)

Req = TypeVar("Req")
SCHEME = "sha256"
TOKEN_PATTERN = re.compile(r"rns_([0-9a-f]{32})_[A-Za-z0-9_-]{43}")
# Calls any client may make without a token: Kubernetes probes and tools find the server through them.
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True, slots=True)
class _Entry:
    tenant: str
    salt: bytes
    digest: bytes


def new_token(tenant: str) -> tuple[str, str]:
    """A new token for `tenant`, and the token file's line for it."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r} is invalid: use 1 to 64 letters, digits or . _ -")
    salt = secrets.token_bytes(16)
    token = f"rns_{salt.hex()}_{secrets.token_urlsafe(32)}"
    return token, f"{tenant} {SCHEME}:{salt.hex()}:{hashlib.sha256(salt + token.encode()).hexdigest()}"


def parse_token_file(text: str, where: str) -> list[_Entry]:
    """The entries of a token file; ValueError naming the line for anything malformed."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        try:
            tenant, hashed = fields
            scheme, salt, digest = hashed.split(":")
            if scheme != SCHEME:
                raise ValueError(f"unknown hash scheme {scheme!r} (expected {SCHEME})")
            if not TENANT_PATTERN.fullmatch(tenant):
                raise ValueError(f"tenant {tenant[:70]!r}: use 1 to 64 letters, digits or . _ -")
            entry = _Entry(tenant, bytes.fromhex(salt), bytes.fromhex(digest))
            if len(entry.digest) != 32 or not entry.salt:
                raise ValueError("the salt must be non-empty and the digest 32 bytes, both hex")
        except ValueError as err:
            raise ValueError(
                f"{where} line {number}: {err}; each line is 'TENANT {SCHEME}:SALT:DIGEST' (rnnserve token writes them)"
            ) from None
        entries.append(entry)
    return entries


class Authenticator:
    """Which tenant a call's `authorization: Bearer TOKEN` names."""

    def __init__(self, settings: AuthSettings) -> None:
        assert settings.token_file is not None
        self._path = settings.token_file
        self._interval_s = settings.reload_interval_s
        self.admins = frozenset(settings.admin_tenants)
        self._entries: dict[bytes, list[_Entry]] = {}  # by salt: a token names its line's salt
        self.generation = 0  # counts the reads of the file
        self._seen: tuple[int, int, int] | None = None
        self._checked = 0.0
        try:
            self._load()
        except (OSError, ValueError) as err:
            raise StartupError(f"cannot use the token file (--auth-token-file): {err}") from err
        if not self._entries:
            log.warning(
                "the token file %s holds no tokens: every call but health and reflection is refused", self._path
            )

    def _load(self) -> None:
        seen = _identity(os.stat(self._path))
        entries: dict[bytes, list[_Entry]] = {}
        for entry in parse_token_file(self._path.read_text(encoding="utf-8-sig"), str(self._path)):
            entries.setdefault(entry.salt, []).append(entry)
        self._entries, self._seen = entries, seen
        self.generation += 1

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._interval_s:
            return
        self._checked = now
        try:
            if _identity(os.stat(self._path)) == self._seen:
                return
            self._load()
            log.info("token file %s read again: %d tokens", self._path, sum(map(len, self._entries.values())))
        except (OSError, ValueError) as err:  # a file half written, or removed: keep what was read last
            log.error("token file %s not read again (%s); the tokens read before still hold", self._path, err)

    def tenant(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """The tenant of the call's bearer token; Unauthenticated if there is none or it is unknown."""
        self.maybe_reload()
        token = _bearer(metadata)
        named = TOKEN_PATTERN.fullmatch(token)
        if named is not None:
            salt = bytes.fromhex(named.group(1))
            for entry in self._entries.get(salt, ()):
                if hmac.compare_digest(hashlib.sha256(salt + token.encode()).digest(), entry.digest):
                    return entry.tenant
        raise Unauthenticated("the bearer token is not valid here; ask the operator for a token of your tenant")

    def require_admin(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        tenant = self.tenant(metadata)
        if tenant not in self.admins:
            raise PermissionDenied(
                f"tenant {tenant!r} may not load or unload models or read their statistics; the operator lists who "
                "may in auth.admin_tenants"
            )


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str:
    values = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
    if not values:
        raise Unauthenticated("this server needs a bearer token: send metadata 'authorization: Bearer TOKEN'")
    value = values[0]
    scheme, _, token = (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization metadata must read 'Bearer TOKEN'")
    return token


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses, UNAUTHENTICATED, every call without a valid token but health and reflection; the handlers
    ask the same Authenticator for the tenant (a cached lookup)."""

    def __init__(self, auth: Authenticator, refused: Callable[[str, str], None]) -> None:
        self._auth = auth
        self._refused = refused  # (method, code name): counted in the error metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method
        handler = await continuation(details)
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        try:
            self._auth.tenant(details.invocation_metadata)
        except Unauthenticated as err:
            self._refused(method.rpartition("/")[2], err.code.name)
            return _refusing(handler, err.message)
        return handler


def _refusing(handler: grpc.RpcMethodHandler[Any, Any], message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED and reads nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def while_valid(
    requests: AsyncIterable[Req], auth: Authenticator | None, metadata: Sequence[tuple[str, Any]] | None
) -> AsyncIterator[Req]:
    """A stream's requests, its token checked again whenever the token file has been read again: a token
    removed from the file ends the stream (UNAUTHENTICATED) at its next request."""
    if auth is None:
        async for request in requests:
            yield request
        return
    generation = auth.generation
    async for request in requests:
        auth.maybe_reload()
        if auth.generation != generation:
            generation = auth.generation
            try:
                auth.tenant(metadata)
            except Unauthenticated as err:
                raise Unauthenticated(f"{err.message} (the token was revoked while this stream was open)") from None
        yield request


def tenant_of(auth: Authenticator | None, metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The call's tenant; '' where authentication is off."""
    return "" if auth is None else auth.tenant(metadata)
