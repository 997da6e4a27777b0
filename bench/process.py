"""Servers in processes of their own: rnnserve, a bare gRPC echo, and redis-server."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

ROOT = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, for a server started next. Drawn below the kernel's range for the local ports of
    outgoing connections: a port from that range (what binding port 0 gives) can be taken by any connection
    this machine opens before the server binds it, which once failed a test's server with "Address already
    in use". Never the same port twice in one process: a port is often drawn long before its server binds it
    (a cluster's six nodes are given theirs at once, then each draws its bus port as it starts), and a second
    draw of a port not yet bound would find it free."""
    low = _ephemeral_low()
    floor = max(1024, low - 12_000)
    for _ in range(200 if floor < low else 0):
        port = random.randrange(floor, low)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    for _ in range(200):  # the range below is crowded (or there is none): the kernel's pick, then
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError("no free port found that this process has not handed out already")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _stat(entry: Path) -> list[str] | None:
    """The fields of a /proc process's (or thread's) stat file after the command name (state, ppid, ...,
    utime at 11, stime at 12); None if it has ended."""
    try:
        return (entry / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _ticks(fields: list[str]) -> int:
    """CPU time (user + system) in clock ticks, from stat fields."""
    return int(fields[11]) + int(fields[12])


def _family(pid: int) -> Iterator[tuple[Path, list[str]]]:
    """/proc's entry of a process and of each of its direct children (a server's workers), with its stat
    fields (see `_stat`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry)
        if fields is not None and (entry.name == str(pid) or fields[1] == str(pid)):
            yield entry, fields


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its direct children, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(_ticks(fields) / ticks for _, fields in _family(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU time (user + system) of a process and its direct children, split into their main threads (a
    server's event loops) and all their other threads (runtime calls, gRPC's pollers), from /proc. Only
    live threads count (a thread that ended takes its time with it; `cpu_seconds` keeps it)."""
    ticks = os.sysconf("SC_CLK_TCK")
    main = other = 0
    for entry, _ in _family(pid):
        try:
            tasks = list((entry / "task").iterdir())
        except OSError:  # the process ended
            continue
        for task in tasks:
            fields = _stat(task)
            if fields is None:  # the thread ended
                continue
            if task.name == entry.name:
                main += _ticks(fields)
            else:
                other += _ticks(fields)
    return main / ticks, other / ticks


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its direct children, from /proc."""
    total = 0
    for entry, _ in _family(pid):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(total / 1024, 1)


class ServerProcess:
    """`rnnserve serve` (or another module's `main`) in its own process, on a fixed port."""

    def __init__(
        self, port: int, args: list[str], module: str = "service", log: Path | None = None, source: Path = ROOT
    ) -> None:
        self.port = port
        self.args = args
        self.module = module
        self.log = log  # where its output goes (default: this process's)
        self.source = source  # the checkout it runs from (`python -m` imports from its working directory)
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def rnnserve(
        cls,
        port: int,
        model_repo: Path,
        redis_url: str | None,
        *extra: str,
        metrics_port: int = 0,
        log: Path | None = None,
        source: Path = ROOT,
    ) -> ServerProcess:
        args = [
            "--log-level",
            "WARNING",
            "serve",
            "--model-repo",
            str(model_repo),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            *extra,
        ]
        if redis_url:
            args += ["--redis-url", redis_url]
        return cls(port, args, log=log, source=source)

    def start(self, timeout_s: float = 60, *, wait: bool = True) -> None:
        """Start it; with `wait`, return once its health check says SERVING."""
        output = None if self.log is None else self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=output,
            stderr=output,
            cwd=self.source,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            start_new_session=True,  # its own process group: kill() takes its worker processes too
        )
        if output is not None:
            output.close()  # the server has its own copy
        if not wait:
            return
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.module} did not start on port {self.port}")
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL to the server and its workers (as when a pod's container is killed): no drain, no goodbye."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM: drain, then exit; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return 0 if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


class RedisProcess:
    """A private redis-server on a free port; `durable` syncs every write to an append-only file;
    `replica_of` (a port on loopback) makes it a replica of that server, started once it has synced."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        durable: bool = False,
        replica_of: int | None = None,
        cluster_node_timeout_ms: int | None = None,
        tls: Path | None = None,
        password: str | None = None,
    ) -> None:
        """`tls`: a folder holding ca.pem and the server's redis.pem and redis.key; then the server speaks TLS
        only (clients, replication and the cluster bus), and clients need not present a certificate.
        `password`: clients must give it (requirepass)."""
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="rnnserve-redis-")
        self.directory = directory or Path(self._tmp.name)  # type: ignore[union-attr]
        self.durable = durable
        self.replica_of = replica_of
        self.cluster_node_timeout_ms = cluster_node_timeout_ms  # set: a Redis Cluster node
        self.tls = tls
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        if self.replica_of is not None:
            persistence += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            listen += ["--tls-replication", "yes", "--tls-cluster", "yes"]
            listen += ["--tls-cert-file", str(self.tls / "redis.pem"), "--tls-key-file", str(self.tls / "redis.key")]
            listen += ["--tls-ca-cert-file", str(self.tls / "ca.pem")]
        if self.password is not None:
            listen += ["--requirepass", self.password]
        if self.cluster_node_timeout_ms is not None:
            persistence += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            # The cluster bus on a free port of its own (by default port + 10000, often past 65535 here).
            persistence += [
                "--cluster-node-timeout",
                str(self.cluster_node_timeout_ms),
                "--cluster-port",
                str(free_port()),
                # A replica's first copy at once (by default a primary waits 5 s for more replicas to join);
                # a replica that holds no copy yet cannot take over.
                "--repl-diskless-sync-delay",
                "0",
            ]
        log = (self.directory / "redis.log").open("ab")  # the child holds its own copy of the file
        self.process = subprocess.Popen(
            [
                "redis-server",
                *listen,
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                *persistence,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._wait_up(self.process)
        except BaseException:
            self.stop()  # however the wait ended, no server is left running behind it
            raise

    def _wait_up(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        # Each probe bounded: whatever holds the port may accept connections and never answer (a stopped server).
        with self.client(timeout_s=1.0) as client:
            while True:
                code = process.poll()  # first: a server that could not bind exits at once
                if code is None:
                    try:
                        # This process's, not another server's that holds the port (this one then exits).
                        if client.info("server").get("process_id") == process.pid and (
                            self.replica_of is None or client.info("replication").get("master_link_status") == "up"
                        ):
                            return
                    except (redis.RedisError, OSError):
                        pass  # not up yet, or something else answers on the port (not a Redis, or a stopped one)
                if code is not None or time.monotonic() > deadline:
                    why = f"exited with {code}" if code is not None else "did not come up (or sync) in 30 s"
                    raise TimeoutError(f"redis-server on port {self.port} {why}; its log ends:\n{self.log_tail()}")
                time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines redis-server wrote (to redis.log in its folder)."""
        try:
            return "\n".join((self.directory / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self, port: int | None = None, timeout_s: float | None = None) -> redis.Redis:
        """A client of this server (or of another node of its cluster, on `port`), over TLS if it speaks it;
        `timeout_s` bounds each connect and each reply (by default, none)."""
        options: dict[str, object] = {"ssl": True, "ssl_ca_certs": str(self.tls / "ca.pem")} if self.tls else {}
        if timeout_s is not None:  # bounded: one try, each step within timeout_s
            options.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        return redis.Redis(port=port or self.port, password=self.password, **options)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop the server; a durable one keeps its data for the next start(). One that does not stop in
        10 s (a script spinning: Redis refuses to shut down while one runs) is killed."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no goodbye, as when its machine dies."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP (or, with paused False, SIGCONT): a node that stops reading, as one that lags."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


class RedisCluster:
    """A Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each, made with
    `redis-cli --cluster create`; returns from start() once every node says the cluster is ok."""

    def __init__(
        self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000, tls: Path | None = None
    ) -> None:
        """`tls`: as for RedisProcess; the URL is then rediss+cluster://."""
        self.nodes = [
            RedisProcess(cluster_node_timeout_ms=node_timeout_ms, tls=tls) for _ in range(primaries * (1 + replicas))
        ]
        self.replicas = replicas
        self.tls = tls

    @property
    def url(self) -> str:
        scheme = "rediss+cluster://" if self.tls else "redis+cluster://"
        return scheme + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])

    def start(self) -> None:
        """Start every node and make them a cluster; if that fails, every node is stopped and its folder
        removed before the error is raised (a fixture whose set-up raises is never torn down)."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        for node in self.nodes:
            for attempt in range(3):
                try:
                    node.start()
                    break
                except TimeoutError as failed:
                    # Its port taken by another process since it was drawn: a node's port is the cluster's
                    # own business until the cluster is made, so draw another.
                    if "Address already in use" not in str(failed) or attempt == 2:
                        raise
                    node.port = free_port()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        tls = ["--tls", "--cacert", str(self.tls / "ca.pem")] if self.tls else []
        subprocess.run(
            [
                "redis-cli",
                *tls,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok([node.port for node in self.nodes])
        self.wait_synced()

    def wait_synced(self, timeout_s: float = 30) -> None:
        """Until every replica running holds a copy of its primary and follows it (master_link_status up):
        only such a replica can take over when its primary dies."""
        deadline = time.monotonic() + timeout_s
        for node in self.alive():
            with node.client() as client:
                while True:
                    info = client.info("replication")
                    if info.get("role") != "slave" or info.get("master_link_status") == "up":
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cluster replica {node.port} did not sync with its primary in time")
                    time.sleep(0.05)

    def wait_ok(self, ports: list[int], timeout_s: float = 30) -> None:
        """Until each of these nodes says cluster_state:ok and knows every slot's primary."""
        deadline = time.monotonic() + timeout_s
        for port in ports:
            with self.nodes[0].client(port) as client:
                while True:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" in info and "cluster_slots_ok:16384" in info:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cluster node {port} not ok in time: {info[:200]}")
                    time.sleep(0.05)

    def primary_of(self, key: str) -> RedisProcess:
        """The node serving `key` now."""
        with self.alive()[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(node for node in self.nodes if node.port == int(primary[1]))
        raise LookupError(key)

    def wait_promoted(self, victim: RedisProcess, key: str, timeout_s: float = 30) -> None:
        """Until a node other than `victim` serves `key` (its replica took over). A killed node without
        persistence must not come back before then: it would return empty as the primary of its slots, and
        its replica would copy the emptiness."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.primary_of(key) is not victim:
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica took over from the node on port {victim.port} in time")
            time.sleep(0.05)

    def move_slot(self, slot: int, to: RedisProcess, *, finish: bool = True) -> None:
        """Migrate one slot by hand: IMPORTING on `to`, MIGRATING on its primary, its keys MIGRATEd; with
        `finish`, every primary told the slot's new owner. Without, the slot stays half-migrated (its keys on
        `to` already), so the source answers ASK for them."""
        with self.alive()[0].client() as client:
            source = next(
                int(primary[1])
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS")
                if start <= slot <= end
            )
        with self.nodes[0].client(source) as src, to.client() as dst:
            source_id, target_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
        if finish:
            for node in self.primaries():
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def primaries(self) -> list[RedisProcess]:
        """The nodes running as primaries now."""
        found = []
        for node in self.alive():
            with node.client() as client:
                if client.info("replication").get("role") == "master":
                    found.append(node)
        return found

    def replicas_of(self, primary: RedisProcess) -> list[RedisProcess]:
        """The nodes replicating `primary` now."""
        found = []
        for node in self.alive():
            with node.client() as client:
                info = client.info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                found.append(node)
        return found

    def alive(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.process is not None]

    def close(self) -> None:
        for node in self.nodes:
            node.close()
