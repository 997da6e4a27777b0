"""Models loaded live: the registry follows the repository directory while the server runs.

A poll (every `model_poll_interval_s`) loads versions that appeared, so new sessions start on the newest
one; sessions pinned to an older version keep running on it while it stays loaded. A version that
disappeared from disk is unloaded once no session in this replica's cache uses it, or a state TTL after
it disappeared (no session can still be alive on it by then). A directory that fails validation is
logged once (until it changes) and skipped: it never takes the server down, and never replaces a
loaded version — versions are immutable, so a changed loaded version is reported, not reloaded.

Operators who drive loading themselves use Triton's RepositoryModelLoad / RepositoryModelUnload: an
unloaded model stays unloaded (the poll leaves it alone) until it is loaded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from service.errors import FailedPrecondition, ModelNotFound
from service.metrics import Metrics
from service.models import LoadedModel, ModelRegistry, load_version
from service.repository import VERSION_NAME, RepositoryError, read_manifest, version_dirs
from service.settings import Settings

log = logging.getLogger(__name__)

_Key = tuple[str, int]


class ModelLoader:
    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
        in_use: Callable[[], set[bytes]],
        on_change: Callable[[], object] = lambda: None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self._in_use = in_use  # fingerprints of the sessions this replica holds
        self._on_change = on_change
        self._refused: dict[Path, tuple[int, ...]] = {}  # directories logged as unservable, by signature
        self._gone_since: dict[_Key, float] = {}
        self._held: set[str] = set()  # unloaded by an operator: the poll leaves them alone
        self._lock = asyncio.Lock()
        self._scan_task: asyncio.Task[None] | None = None
        self._scanned_on_demand = -1.0
        for model in registry.all():
            self._published(model)
        if settings.model_poll_interval_s > 0:
            registry.arriving = self.arriving

    async def run(self) -> None:
        interval = self._settings.model_poll_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.scan()
            except Exception:  # the poll must go on whatever one pass meets
                log.exception("scanning the model repository failed; retrying in %.0fs", interval)

    async def scan(self) -> None:
        """One pass: load what appeared, unload what is gone and unused."""
        async with self._lock:
            try:
                found = self._on_disk()
            except RepositoryError as err:
                log.error("model repository unreadable (%s); keeping the loaded versions", err)
                return
            # Newest first: a scan that meets several new versions of a model never makes an older one the
            # version new sessions start on, even for the moment between two loads.
            for (name, version), directory in sorted(found.items(), key=lambda item: -item[0][1]):
                if name not in self._held:
                    await self._load(name, version, directory)
            self._unload_gone(found)

    def arriving(self, name: str, fingerprint: bytes) -> bool:
        """Whether a version of `name` with this fingerprint is on disk but not loaded yet; if so, a scan
        starts now.

        Another replica may poll first after a publish and start sessions on the new version; their steps
        reach this replica before its own poll would load it. Such a step is told to retry (the version is
        a moment away), not refused as a session this replica can never continue. A version the operator
        unloaded, or one refused as unservable, is not arriving. Only the model's own directory is read
        (one listing, and a manifest for each version not loaded), and only for a fingerprint the
        registry lacks.
        """
        if name in self._held:
            return False
        try:
            directories = [d for d in (self._settings.model_repo / name).iterdir() if VERSION_NAME.fullmatch(d.name)]
        except OSError:
            return False
        for directory in directories:
            if self._registry.find(name, int(directory.name)) is not None:
                continue
            if self._refused.get(directory) == _signature(directory):
                continue
            try:
                if read_manifest(directory, verify=False).fingerprint != fingerprint.hex():
                    continue
            except (RepositoryError, OSError):  # a file where a version directory goes, an unreadable one
                continue
            now = time.monotonic()
            if (self._scan_task is None or self._scan_task.done()) and now - self._scanned_on_demand >= 1.0:
                self._scanned_on_demand = now  # at most one scan a second, however many steps ask
                self._scan_task = asyncio.get_running_loop().create_task(self._scan_now())
            return True
        return False

    async def _scan_now(self) -> None:
        try:
            await self.scan()
        except Exception:  # the next poll tries again
            log.exception("scanning the model repository for an arriving version failed")

    async def load(self, name: str) -> list[LoadedModel]:
        """Load every servable version of `name` now (RepositoryModelLoad)."""
        async with self._lock:
            self._held.discard(name)
            found = {key: d for key, d in self._on_disk().items() if key[0] == name}
            if not found:
                raise ModelNotFound(f"no model {name!r} in the repository {self._settings.model_repo}")
            errors = [
                error for (_, version), d in found.items() if (error := await self._load(name, version, d, force=True))
            ]
            loaded = [m for m in self._registry.all() if m.name == name]
            if not loaded:
                raise FailedPrecondition(f"model {name!r} failed to load: {'; '.join(errors)}")
            return loaded

    async def unload(self, name: str) -> None:
        """Unload every version of `name` now (RepositoryModelUnload); sessions on it are refused."""
        async with self._lock:
            models = [m for m in self._registry.all() if m.name == name]
            if not models:
                raise ModelNotFound(f"no model {name!r} is loaded")
            self._held.add(name)
            for model in models:
                self._withdraw(model, "unloaded on request")

    def _on_disk(self) -> dict[_Key, Path]:
        return {(name, version): directory for name, version, directory in version_dirs(self._settings.model_repo)}

    async def _load(self, name: str, version: int, directory: Path, *, force: bool = False) -> str | None:
        """Load one version unless it is loaded, or known unservable (unless `force`); the error, if it failed."""
        self._gone_since.pop((name, version), None)
        signature = _signature(directory)
        loaded = self._registry.find(name, version)
        if loaded is not None:
            self._check_unchanged(loaded, directory, signature)
            return None
        if not force and directory in self._refused and self._refused[directory] == signature:
            return "unchanged since it was refused"
        try:
            model = await asyncio.to_thread(load_version, directory, self._settings.runtime)
        except (RepositoryError, ValueError, OSError) as err:
            self._refused[directory] = signature
            log.error("not loading %s/%d: %s", name, version, err)
            return str(err)
        self._refused.pop(directory, None)
        self._registry.add(model)
        self._published(model)
        newest = self._registry.get(name)
        log.info("serving %s/%d; new sessions of %s start on version %d", name, version, name, newest.version)
        self._on_change()
        return None

    def _check_unchanged(self, loaded: LoadedModel, directory: Path, signature: tuple[int, ...]) -> None:
        if self._refused.get(directory) == signature:
            return
        try:
            fingerprint = read_manifest(directory, verify=False).fingerprint
        except RepositoryError:
            fingerprint = ""
        if fingerprint != loaded.manifest.fingerprint:
            self._refused[directory] = signature
            log.error(
                "%s/%d changed on disk; versions are immutable, so the loaded one stays: publish a new version",
                loaded.name,
                loaded.version,
            )

    def _unload_gone(self, found: dict[_Key, Path]) -> None:
        now = time.monotonic()
        in_use = self._in_use()
        for model in self._registry.all():
            key = (model.name, model.version)
            if key in found or model.name in self._held:
                continue
            since = self._gone_since.setdefault(key, now)
            if model.fingerprint not in in_use:
                self._withdraw(model, "removed from the repository; no session here uses it")
            elif now - since >= self._settings.sessions.state_ttl_s:
                self._withdraw(model, "removed from the repository a state TTL ago")

    def _withdraw(self, model: LoadedModel, why: str) -> None:
        self._registry.remove(model)
        self._gone_since.pop((model.name, model.version), None)
        self._metrics.model_info.remove(
            model.name, str(model.version), model.runtime.providers[0], model.manifest.precision
        )
        log.warning("unloaded %s/%d: %s", model.name, model.version, why)
        self._on_change()

    def _published(self, model: LoadedModel) -> None:
        self._metrics.model_info.labels(
            model.name, model.version, model.runtime.providers[0], model.manifest.precision
        ).set(1)


def _signature(directory: Path) -> tuple[int, ...]:
    """Changes when the version's files do (so a refused directory is tried again once it is fixed)."""
    stats = []
    for name in ("manifest.json", "model.onnx"):
        try:
            stat = (directory / name).stat()
            stats += [stat.st_mtime_ns, stat.st_size]
        except OSError:
            stats += [0, 0]
    return tuple(stats)
