"""`rnnserve serve --workers N`: N worker processes on one gRPC port, one /metrics for all of them.

Python runs one event loop per core at best, so a server that should use every core runs one process per
core. Each worker is a whole server (its own loop, runtime sessions, batchers and cache) listening on the
same port with SO_REUSEPORT; the kernel spreads connections over them. Session state lives in Redis, so
any worker can continue any session and no routing between them is needed.

The parent (this module) checks that the port is free, starts the workers (the settings travel as JSON
in the environment: nothing is pickled), serves /metrics from prometheus_client's multiprocess files,
restarts a worker that dies (logged, with backoff if it keeps dying), and on SIGTERM or SIGINT has every
worker drain, then exits. Workers take streams only once the parent has told them every worker is up (a
stream stays on the worker where it opened: see `_all_up`).
"""

from __future__ import annotations

import logging
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

from service.errors import StartupError
from service.settings import LARGE_BATCH_ROWS, Settings

log = logging.getLogger(__name__)

SETTINGS_VARIABLE = "RNNSERVE_WORKER_SETTINGS"
READY_FD_VARIABLE = "RNNSERVE_WORKER_READY_FD"
SIBLINGS_FD_VARIABLE = "RNNSERVE_WORKER_SIBLINGS_FD"
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
START_TIMEOUT_S = 120.0
METRICS_DIR_PREFIX = "rnnserve-metrics-"  # then the parent's pid: see _sweep_metrics_dirs
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: those it is pinned to, capped by its cgroup's CPU quota (a
    container's CPU limit). `os.cpu_count()` counts every core of the machine, which in a container
    limited to 2 CPUs on a 64-core node would start 64 workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, _, period = cpu_max.read_text().strip().partition(" ")
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period or 100_000))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity mask stands
    return max(1, cpus)


def worker_count(settings: Settings) -> int:
    if settings.workers is None:
        return usable_cpus() if settings.redis.url else 1
    if settings.workers > 1 and not settings.redis.url:
        raise StartupError(
            f"--workers {settings.workers} needs a shared store: the in-memory store lives in one process. "
            "Pass --redis-url, or run one worker"
        )
    return settings.workers


def runtime_placed(settings: Settings, count: int) -> Settings:
    """`settings` with where large batches' runtime calls run decided for `count` worker processes, unless
    set: on the event loop, with a worker per usable CPU or more. A runtime thread pays off where it runs
    beside the event loop on a CPU that would otherwise idle; where the other workers keep every CPU busy, a
    large batch handed from thread to thread costs more. With two workers on two CPUs (`rnnserve bench ab`,
    five rounds each, two runs), 1,024 sessions at 256 a message went 8 to 16 % faster, at 5 to 15 % less CPU
    a step; 256 sessions a step a message (batches of about 10 to 60) went 3 to 14 % slower on the event loop,
    so smaller batches stay in the runtime threads."""
    runtime = settings.runtime
    if runtime.inline_min_rows is not None:
        return settings
    rows = LARGE_BATCH_ROWS if count >= usable_cpus() else 0
    return settings.model_copy(update={"runtime": runtime.model_copy(update={"inline_min_rows": rows})})


def serve_workers(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT: in this process for one worker, else as the parent of N."""
    count = worker_count(settings)
    settings = runtime_placed(settings, count)
    if count == 1:
        from service.cli import serve_in_process

        serve_in_process(settings)
        return 0
    return _Supervisor(settings, count).run()


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    ready_fd: int
    siblings_fd: int  # written (and closed) once every worker is up: the worker then takes streams


class _Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self.count = count
        self.port = _claim_port(settings.host, settings.port)
        # Workers share the port on purpose, and the parent serves /metrics for all of them.
        self.worker_settings = settings.model_copy(update={"port": self.port, "metrics_port": None})
        self.metrics_port = settings.metrics_port
        self.grace_s = settings.shutdown_grace_s
        _sweep_metrics_dirs()
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        self.workers: dict[int, _Worker] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        http = None
        try:
            http = self._serve_metrics()
            for index in range(self.count):
                self._start(index)
            for index in range(self.count):
                self._await_ready(index)
            for index in range(self.count):
                if not self.stopping:  # asked to stop while starting: the drain comes next, take nothing
                    self._all_up(index)
            log.info("%d workers serving gRPC on port %d, /metrics on %s", self.count, self.port, self.metrics_port)
            while not self.stopping:
                self._reap()
                time.sleep(0.2)
            return self._drain()
        finally:
            if http is not None:
                http.shutdown()
                http.server_close()
            for worker in self.workers.values():
                if worker.process.poll() is None:
                    worker.process.kill()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _serve_metrics(self) -> WSGIServer | None:
        if self.metrics_port is None:
            return None
        os.environ[METRICS_DIR_VARIABLE] = self.metrics_dir
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        try:
            http, _ = start_http_server(self.metrics_port, registry=registry)
        except OSError as err:
            raise StartupError(
                f"cannot serve /metrics on port {self.metrics_port} ({err.strerror}); pick another "
                "--metrics-port, 0 for a free one, or none for no /metrics"
            ) from err
        self.metrics_port = http.server_port
        return http

    def _start(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        siblings_read, siblings_write = os.pipe()
        env = os.environ | {
            SETTINGS_VARIABLE: self.worker_settings.model_dump_json(),
            READY_FD_VARIABLE: str(write_fd),
            SIBLINGS_FD_VARIABLE: str(siblings_read),
            METRICS_DIR_VARIABLE: self.metrics_dir,
            "RNNSERVE_LOG_FORMAT": f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "service.workers", logging.getLevelName(logging.getLogger().level)],
            env=env,
            pass_fds=(write_fd, siblings_read),
        )
        os.close(write_fd)
        os.close(siblings_read)
        self.workers[index] = _Worker(index, process, time.monotonic(), read_fd, siblings_write)

    def _all_up(self, index: int) -> None:
        """Tell a worker that every worker is up (at the start, once all are; a worker restarted later,
        once it is): it takes streams from then on. Until then its connections' streams are refused
        UNAVAILABLE, and retried: a stream taken while it was the only worker listening would stay on
        it, however the connections spread once all listen."""
        worker = self.workers[index]
        if worker.siblings_fd < 0:
            return
        try:
            os.write(worker.siblings_fd, b"up")
        except OSError:  # the worker has gone: its restart gets a pipe of its own
            pass
        os.close(worker.siblings_fd)
        worker.siblings_fd = -1

    def _await_ready(self, index: int) -> None:
        """Wait for the worker's 'ready', or its exit. A stop requested meanwhile waits too, so that the
        worker has its signal handlers when the drain signals it (a failing one fails fast)."""
        worker = self.workers[index]
        ready, _, _ = select.select([worker.ready_fd], [], [], START_TIMEOUT_S)
        message = os.read(worker.ready_fd, 64) if ready else b""
        os.close(worker.ready_fd)
        if message != b"ready":
            try:  # the pipe closes as the worker exits: give it a moment to, for its status
                status: int | None = worker.process.wait(5)
            except subprocess.TimeoutExpired:
                status = None
            said = "still running" if status is None else f"exit status {status}"
            raise StartupError(f"worker {index} did not start ({said}); see its log above")

    def _reap(self) -> None:
        for index, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None or self.stopping:
                continue
            _mark_dead(worker.process.pid, self.metrics_dir)
            lived = time.monotonic() - worker.started
            self.failures[index] = self.failures.get(index, 0) + 1 if lived < 10 else 1
            delay = min(30.0, 0.5 * 2 ** (self.failures[index] - 1))
            log.error(
                "worker %d (pid %d) exited with status %s; restarting it in %.1fs",
                index,
                worker.process.pid,
                code,
                delay,
            )
            if not self._sleep(delay):
                return  # asked to stop during the backoff: drain the others
            self._start(index)
            try:
                self._await_ready(index)
            except StartupError as err:  # keep serving with the others; the next pass tries again
                log.error("%s", err)
            self._all_up(index)

    def _sleep(self, seconds: float) -> bool:
        """Sleep, unless asked to stop meanwhile: False then."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return not self.stopping

    def _drain(self) -> int:
        log.info("stopping: every worker drains (grace %.1fs)", self.grace_s)
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 15
        codes = []
        for worker in self.workers.values():
            try:
                codes.append(worker.process.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                codes.append(worker.process.wait())
        return 0 if all(code == 0 for code in codes) else 1


def _claim_port(host: str, port: int) -> int:
    """The port the workers will share: a free one for 0; refused if another server holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = host.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as err:
            raise StartupError(
                f"cannot listen on {host}:{port} for gRPC ({err.strerror}); is another server using it? "
                "Pick another --port, or 0 for a free one"
            ) from err
        return int(probe.getsockname()[1])


def _sweep_metrics_dirs() -> None:
    """Remove the /metrics directories of parents that died without cleaning up (SIGKILL, OOM). Called
    before this process makes its own, so one named after this very pid is a predecessor's: in a
    container the supervisor is pid 1 every time, and /tmp may outlive a restart."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_DIR_PREFIX).partition("-")[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _mark_dead(pid: int, metrics_dir: str) -> None:
    if os.environ.get(METRICS_DIR_VARIABLE):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def _follow_parent() -> None:
    """A worker whose parent dies (even by SIGKILL) gets SIGTERM, and drains: no orphan keeps the port."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main() -> int:
    """A worker: the settings from the parent, the server in this process, 'ready' on the pipe once it
    serves. The parent owns the port check and /metrics."""
    logging.basicConfig(level=sys.argv[1] if len(sys.argv) > 1 else "INFO", format=os.environ["RNNSERVE_LOG_FORMAT"])
    _follow_parent()
    settings = Settings.model_validate_json(os.environ[SETTINGS_VARIABLE])
    ready_fd = int(os.environ[READY_FD_VARIABLE])
    siblings_fd = int(os.environ[SIBLINGS_FD_VARIABLE])
    import asyncio

    from service.server import serve

    def ready() -> None:
        os.write(ready_fd, b"ready")
        os.close(ready_fd)

    try:
        asyncio.run(serve(settings, shared_port=True, on_ready=ready, siblings_fd=siblings_fd))
    except Exception as err:  # noqa: BLE001 - reported to the parent by the exit status, and logged
        logging.getLogger("rnnserve").error("worker cannot serve: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
