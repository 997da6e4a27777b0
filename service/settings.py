"""One typed settings object. Every field can come from a flag or an `RNNSERVE_...` variable.

Nested groups read as e.g. `RNNSERVE_REDIS__URL`, `RNNSERVE_BATCHING__MAX_BATCH_SIZE`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict


def _unset_if_empty(value: object) -> object:
    """An empty path (`RNNSERVE_TLS__CERT=`) is unset, not the current directory."""
    return None if isinstance(value, str) and not value.strip() else value


def _comma_list(value: object) -> object:
    """A list setting from the environment: "A,B" or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


SENTINEL_SCHEME = "redis+sentinel://"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")  # no ":" or "/": tenants sit inside session keys
CLUSTER_SCHEME = "redis+cluster://"
CLUSTER_TLS_SCHEME = "rediss+cluster://"  # the same, over TLS to every node


@dataclass(frozen=True)
class SentinelUrl:
    """What a redis+sentinel:// URL names: the sentinels to ask, the primary's name, and how to log in to it."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """`redis+sentinel://[user:password@]host:port[,host:port...]/master-name[/db]`; ValueError (which never
    quotes the URL: it may hold a password) for anything else. IPv6 hosts go in brackets."""
    credentials, at, rest = url.removeprefix(SENTINEL_SCHEME).rpartition("@")
    hosts, _, path = rest.partition("/")
    master, _, db = path.partition("/")
    sentinels = _addresses(hosts, "a redis+sentinel:// URL lists its sentinels as host:port[,host:port...]")
    if not master or not (db == "" or db.isdigit()) or "?" in path:
        raise ValueError("a redis+sentinel:// URL ends with /master-name or /master-name/db (db a number)")
    username, password = _credentials(credentials if at else "")
    return SentinelUrl(sentinels, unquote(master), int(db or 0), username, password)


@dataclass(frozen=True)
class ClusterUrl:
    """What a redis+cluster:// URL names: some nodes of the cluster, and how to log in to every node."""

    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None
    tls: bool = False  # rediss+cluster://


def parse_cluster_url(url: str) -> ClusterUrl:
    """`redis+cluster://[user:password@]host:port[,host:port...][/]` (`rediss+cluster://` over TLS): any
    nodes of the cluster (the rest are found from them). ValueError, never quoting the URL, for anything
    else."""
    tls = url.startswith(CLUSTER_TLS_SCHEME)
    credentials, at, rest = url.removeprefix(CLUSTER_TLS_SCHEME if tls else CLUSTER_SCHEME).rpartition("@")
    hosts = rest.removesuffix("/")
    if "/" in hosts or "?" in hosts:
        raise ValueError("a redis+cluster:// URL names nodes only: redis+cluster://host:port[,host:port...] (db 0)")
    nodes = _addresses(hosts, "a redis+cluster:// URL lists nodes as host:port[,host:port...]")
    return ClusterUrl(nodes, *_credentials(credentials if at else ""), tls=tls)


def _addresses(hosts: str, expected: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` (IPv6 hosts in brackets); ValueError(`expected`) for anything else."""
    addresses = []
    for address in hosts.split(","):
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(expected)
        addresses.append((host.removeprefix("[").removesuffix("]"), int(port)))
    return addresses


def _credentials(credentials: str) -> tuple[str | None, str | None]:
    """(user, password) of a URL's `user:password` part, percent-decoded; None for either left out."""
    username, _, password = credentials.partition(":")
    return unquote(username) or None, unquote(password) if password else None


class RedisSettings(BaseModel):
    """Where session state lives. Without a URL the server keeps state in process memory."""

    # A refused URL may hold a password: validation errors never quote the input.
    model_config = ConfigDict(hide_input_in_errors=True)

    url: str | None = Field(
        default=None,
        description=(
            "redis:// or rediss:// URL (user, password and db in the URL), or "
            "redis+sentinel://[user:password@]host:port[,host:port...]/master-name[/db] to follow a Sentinel "
            "group's primary, or redis+cluster://[user:password@]host:port[,host:port...] for a Redis Cluster "
            "(any of its nodes; rediss+cluster:// over TLS); unset: in-memory store"
        ),
    )
    wait_replicas: int = Field(
        default=0,
        ge=0,
        description=(
            "acknowledge a step only once this many replicas hold its commit (Redis WAIT, in the commit's "
            "round trip); 0: acknowledge on the primary's write"
        ),
    )
    wait_timeout_ms: int = Field(
        default=1000,
        ge=1,
        description="how long a commit waits for redis.wait_replicas; past it the step is answered UNAVAILABLE",
    )
    socket_timeout_s: float = Field(default=2.0, gt=0, description="bound on one command's round trip")
    connect_timeout_s: float = Field(default=2.0, gt=0, description="bound on opening a connection")
    max_connections: int = Field(default=64, ge=1, description="connection pool size per worker process")
    pool_timeout_s: float = Field(
        default=5.0, gt=0, description="how long a store call waits for a free pooled connection before UNAVAILABLE"
    )
    key_prefix: str = Field(default="rnnserve", description="prefix of every key the service writes")
    record_layout: str = Field(
        default="string",
        pattern="^(string|hash)$",
        description=(
            "how session records are written: string (the session's key holds token and record, staged outside "
            "the commit script: the least Redis CPU a step) or hash (as rnnserve 0.1 wrote them: set it while "
            "replicas of 0.1 still run beside this version); both read both; Redis Cluster always writes hash"
        ),
    )
    tls_ca: Path | None = Field(
        default=None,
        description="for rediss://: the CA certificates Redis's certificate must chain to (PEM); unset: the system's",
    )
    tls_cert: Path | None = Field(
        default=None, description="for rediss:// with client certificates: this server's certificate (PEM)"
    )
    tls_key: Path | None = Field(default=None, description="the private key of redis.tls_cert (PEM)")

    @field_validator("tls_ca", "tls_cert", "tls_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _unset_if_empty(value)

    @model_validator(mode="after")
    def _wait_within_the_round_trip(self) -> RedisSettings:
        if self.wait_replicas and self.wait_timeout_ms >= self.socket_timeout_s * 1000:
            raise ValueError(
                "redis.wait_timeout_ms must be shorter than redis.socket_timeout_s: WAIT is part of the commit's "
                "round trip, which the socket timeout bounds"
            )
        return self

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisSettings:
        if (self.tls_ca or self.tls_cert or self.tls_key) and not (self.url or "").startswith(
            ("rediss://", CLUSTER_TLS_SCHEME)
        ):
            raise ValueError(
                f"redis.tls_ca, tls_cert and tls_key apply to a rediss:// or {CLUSTER_TLS_SCHEME} URL only"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("redis.tls_cert and redis.tls_key go together: give both, or neither")
        return self

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        """Refused where settings are read (before any worker starts), not where the store opens."""
        schemes = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME, CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)
        if url and not url.startswith(schemes):
            # Not the URL itself in the message: it may hold a password.
            raise ValueError(f"unsupported store URL scheme: the URL must start with {', '.join(schemes)}")
        if url and url.startswith(SENTINEL_SCHEME):
            parse_sentinel_url(url)
        if url and url.startswith((CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)):
            parse_cluster_url(url)
        return url


class BatchingSettings(BaseModel):
    """Size-or-deadline batching per loaded model version."""

    max_batch_size: int = Field(default=256, ge=1, description="most steps in one batch (store round trip)")
    max_batch_wait_us: int = Field(
        default=0, ge=0, description="how long a batch waits to fill; 0 takes whatever is queued"
    )
    max_queue: int = Field(default=16384, ge=1, description="queued steps per worker before RESOURCE_EXHAUSTED")
    max_pending_steps: int = Field(
        default=65536,
        ge=1,
        description="steps per worker taken and not yet landed (queued, or waiting for their session's "
        "previous step) before RESOURCE_EXHAUSTED",
    )
    max_concurrent_batches: int = Field(
        default=2, ge=1, description="batches in flight per model (one computing while one commits)"
    )


# Sessions a batch has, at least, for its runtime call to run on the event loop where the server runs a worker
# process per usable CPU or more (see `service.workers.runtime_placed`).
LARGE_BATCH_ROWS = 128


class RuntimeSettings(BaseModel):
    """ONNX Runtime."""

    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="execution providers in order, comma-separated: CUDAExecutionProvider,CPUExecutionProvider",
    )

    @field_validator("providers", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _comma_list(value)

    cuda_device_id: int = Field(default=0, ge=0, description="the GPU the CUDA provider runs on")
    io_binding: bool = Field(
        default=False, description="bind inputs, states and outputs through ONNX Runtime's IOBinding"
    )
    intra_op_threads: int = Field(default=1, ge=0, description="threads per runtime call; 0 = runtime default")
    executor_threads: int = Field(default=2, ge=1, description="runtime calls that may run at once")
    inline_max_rows: int = Field(
        default=8,
        ge=0,
        description="batches of at most this many sessions run on the event loop, larger ones in a runtime thread",
    )
    inline_min_rows: int | None = Field(
        default=None,
        ge=0,
        description="batches of at least this many sessions run on the event loop too (0: none do); none: "
        f"{LARGE_BATCH_ROWS} where the server runs a worker process per usable CPU or more, else 0",
    )

    def inline(self, rows: int) -> bool:
        """Whether a batch of `rows` sessions makes its runtime call on the event loop."""
        return rows <= self.inline_max_rows or 0 < (self.inline_min_rows or 0) <= rows


class SessionSettings(BaseModel):
    """Session lifetime and the per-replica cache of recently used states."""

    state_ttl_s: float = Field(default=3600.0, gt=0, description="a session idles out this long after its last write")
    ended_ttl_s: float = Field(
        default=60.0,
        gt=0,
        description="how long an ended session's tombstone answers a resent end step (then: never started)",
    )
    cache_max_sessions: int = Field(
        default=100_000, ge=0, description="states kept in this replica's memory; 0 loads every step"
    )
    max_chunk_steps: int = Field(default=1024, ge=1, description="most time steps in one request")


class TlsSettings(BaseModel):
    """TLS on the gRPC port. With a certificate and its key the server speaks TLS only; with a client CA
    as well, it requires a client certificate signed by that CA (mutual TLS). Files are PEM."""

    cert: Path | None = Field(
        default=None, description="the certificate chain the server presents (PEM); with key: TLS only"
    )
    key: Path | None = Field(default=None, description="the private key of that certificate (PEM)")
    client_ca: Path | None = Field(
        default=None,
        description="CA certificates client certificates must chain to (PEM): mutual TLS; needs cert and key",
    )

    @field_validator("cert", "key", "client_ca", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _unset_if_empty(value)

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together: give both (TLS), or neither (plaintext)")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("tls.client_ca (mutual TLS) needs the server's own tls.cert and tls.key too")
        return self


class AuthSettings(BaseModel):
    """Tenants. With a token file, every call but health and reflection needs `authorization: Bearer
    TOKEN`; the token names a tenant, and a tenant's sessions are its own (keys namespaced by tenant)."""

    token_file: Path | None = Field(
        default=None,
        description="bearer tokens as salted hashes, a line 'TENANT sha256:SALT:DIGEST' each (`rnnserve token` "
        "writes them); set: authentication on",
    )
    max_sessions_per_tenant: int | None = Field(
        default=None,
        ge=1,
        description="live sessions one tenant may hold, counted in the session store across every replica; "
        "a start past it is RESOURCE_EXHAUSTED; none: no limit",
    )
    admin_tenants: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="tenants that may load and unload models and read statistics (comma-separated)",
    )
    reload_interval_s: float = Field(
        default=5.0, gt=0, description="how often the token file is checked for changes (new and removed tokens)"
    )

    @field_validator("token_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _unset_if_empty(value)

    @field_validator("admin_tenants", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("admin_tenants")
    @classmethod
    def _tenant_names(cls, tenants: list[str]) -> list[str]:
        bad = [t for t in tenants if not TENANT_PATTERN.fullmatch(t)]
        if bad:
            raise ValueError(
                f"auth.admin_tenants: {bad[0][:70]!r} is not a tenant name (1 to 64 letters, digits or . _ -)"
            )
        return tenants

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        if self.token_file is None and (self.max_sessions_per_tenant is not None or self.admin_tenants):
            raise ValueError("auth.max_sessions_per_tenant and auth.admin_tenants need auth.token_file (tenants)")
        return self


class Settings(BaseSettings):
    """Everything `rnnserve serve` needs."""

    model_config = SettingsConfigDict(
        env_prefix="RNNSERVE_", env_nested_delimiter="__", env_parse_none_str="none", hide_input_in_errors=True
    )

    model_repo: Path = Field(default=Path("models"), description="the model repository to serve")
    host: str = Field(default="[::]", description="address to listen on")
    port: int = Field(default=8500, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int | None = Field(
        default=9090, ge=0, le=65535, description="Prometheus /metrics port; 0 picks one; none: no /metrics"
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="worker processes sharing the gRPC port; none: one per usable CPU (a container's CPU limit "
        "counts) with a Redis URL, 1 without",
    )
    max_streams: int = Field(default=1024, ge=1, description="concurrent streams per worker before RESOURCE_EXHAUSTED")
    max_inflight_per_stream: int = Field(
        default=4096,
        ge=1,
        description="time steps per stream taken and not yet read by the client (a chunk counts its time "
        "steps, a StepBatch those of all its steps); past it the stream stops reading until the client reads answers",
    )
    max_steps_per_message: int = Field(
        default=1024, ge=1, description="most steps in one StepBatch; a larger batch is refused step by step"
    )
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="largest request message")
    shutdown_grace_s: float = Field(default=10.0, ge=0, description="time to finish in-flight steps on stop")
    model_poll_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="how often the model repository is scanned for new and removed versions; 0: never",
    )
    health_probe_interval_s: float = Field(
        default=1.0, gt=0, description="how often readiness checks the session store (NOT_SERVING while it fails)"
    )
    redis: RedisSettings = Field(default_factory=RedisSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)

    @model_validator(mode="after")
    def _tenant_limits_need_one_slot(self) -> Settings:
        if self.auth.max_sessions_per_tenant and (self.redis.url or "").startswith(
            (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)
        ):
            raise ValueError(
                "auth.max_sessions_per_tenant is not kept on Redis Cluster (a tenant's count would sit in another "
                "slot than its sessions); drop the limit, or use one Redis (with Sentinel) for tenants with limits"
            )
        return self


class CodeSettings(Settings):
    """Settings from code alone, whatever RNNSERVE_* variables are set: what the embedded demo runs on."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)
