"""The loaded models: every version found in the repository, each with its runtime."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import ModelNotFound
from service.repository import MODEL_FILE, Manifest, RepositoryError, TensorSpec, read_manifest, version_dirs
from service.runtime import ModelRuntime
from service.settings import RuntimeSettings
from service.state.record import StateLayout, state_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    runtime: ModelRuntime
    fingerprint: bytes

    # Read several times per step: kept once read.
    @functools.cached_property
    def name(self) -> str:
        return self.manifest.name

    @functools.cached_property
    def version(self) -> int:
        return self.manifest.version

    @property
    def inputs(self) -> list[TensorSpec]:
        """The inputs as served: a streaming graph that takes one step per call still takes chunks here
        (the runtime splits them), so its time axis is reported as -1."""
        return [self._served(spec) for spec in self.manifest.inputs]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self._served(spec) for spec in self.manifest.outputs]

    def _served(self, spec: TensorSpec) -> TensorSpec:
        if self.manifest.streamable and len(spec.shape) >= 3 and spec.shape[1] == 1:
            return spec.model_copy(update={"shape": [spec.shape[0], -1, *spec.shape[2:]]})
        return spec

    def zero_states(self) -> dict[str, np.ndarray]:
        """A fresh session's state, one row (no batch axis); read-only, shared by every caller."""
        return self._zero_states

    @functools.cached_property
    def state_layout(self) -> list[tuple[str, tuple[int, ...], np.dtype[np.generic]]]:
        """(input name, shape without the batch axis, dtype) of each state tensor."""
        return [(s.input, tuple(s.shape[1:]), np.dtype(s.dtype)) for s in self.manifest.state]

    @functools.cached_property
    def record_layout(self) -> StateLayout:
        """Where the state lies in the bytes of this version's session records."""
        return state_layout(self.fingerprint, self._zero_states, len(self.manifest.outputs))

    @functools.cached_property
    def _zero_states(self) -> dict[str, np.ndarray]:
        states = {s.input: np.zeros(s.shape[1:], dtype=s.dtype) for s in self.manifest.state}
        for array in states.values():
            array.flags.writeable = False
        return states


def load_version(directory: Path, settings: RuntimeSettings) -> LoadedModel:
    """One version directory, checked (manifest, fingerprint, graph) and ready to run; raises
    RepositoryError or ValueError for anything that cannot be served."""
    manifest = read_manifest(directory)
    runtime = ModelRuntime(directory / MODEL_FILE, manifest, settings)
    log.info(
        "loaded %s/%d (%s %s, %s) on %s, fingerprint %s",
        manifest.name,
        manifest.version,
        manifest.cell,
        manifest.precision,
        manifest.task,
        ",".join(runtime.providers),
        manifest.fingerprint[:12],
    )
    return LoadedModel(manifest, runtime, bytes.fromhex(manifest.fingerprint))


class ModelRegistry:
    """Lookup by (name, version) and by fingerprint. Version 0 means the newest loaded version.

    Versions come and go while the server runs (service/loader.py); every lookup sees a consistent set.
    """

    def __init__(self, models: list[LoadedModel]) -> None:
        self._models: dict[tuple[str, int], LoadedModel] = {}
        # Versions may share a fingerprint: an export republishes an unchanged fp32 beside a new int8. So
        # may two models (the same file published under two names): a session belongs to its own.
        self._by_fingerprint: dict[tuple[str, bytes], list[LoadedModel]] = {}
        self._latest: dict[str, LoadedModel] = {}
        # Whether a version of a model, by fingerprint, is on disk and loading now (so a step on it should
        # be retried, not refused); the model loader answers it when it polls the repository.
        self.arriving: Callable[[str, bytes], bool] = lambda name, fingerprint: False
        for model in models:
            self.add(model)

    @classmethod
    def from_repository(cls, repo: Path, settings: RuntimeSettings) -> ModelRegistry:
        models = []
        for name, version, directory in version_dirs(repo):
            try:
                models.append(load_version(directory, settings))
            except (RepositoryError, ValueError, OSError) as err:
                log.error("not loading %s/%d: %s", name, version, err)
        if not models:
            raise RepositoryError(f"no servable model version under {repo}")
        return cls(models)

    def add(self, model: LoadedModel) -> None:
        """Serve `model` (in place of a loaded one of its name and version)."""
        loaded = self._models.get((model.name, model.version))
        if loaded is not None:
            self.remove(loaded)
        self._models[(model.name, model.version)] = model
        self._by_fingerprint.setdefault((model.name, model.fingerprint), []).append(model)
        self._relatest(model.name)

    def remove(self, model: LoadedModel) -> None:
        if self._models.get((model.name, model.version)) is model:
            del self._models[(model.name, model.version)]
            same = self._by_fingerprint[(model.name, model.fingerprint)]
            same.remove(model)
            if not same:
                del self._by_fingerprint[(model.name, model.fingerprint)]
            self._relatest(model.name)

    def _relatest(self, name: str) -> None:
        versions = [m for (n, _), m in self._models.items() if n == name]
        if versions:
            self._latest[name] = max(versions, key=lambda m: m.version)
        else:
            self._latest.pop(name, None)

    def all(self) -> list[LoadedModel]:
        return [self._models[k] for k in sorted(self._models)]

    def __len__(self) -> int:
        return len(self._models)

    def find(self, name: str, version: int) -> LoadedModel | None:
        return self._models.get((name, version))

    def get(self, name: str, version: int = 0) -> LoadedModel:
        model = self._latest.get(name) if version == 0 else self._models.get((name, version))
        if model is not None:
            return model
        loaded = ", ".join(f"{n}/{v}" for n, v in sorted(self._models)) or "none"
        wanted = name if version == 0 else f"{name}/{version}"
        raise ModelNotFound(f"no model {wanted!r} is loaded (loaded: {loaded}); check the model name and version")

    def by_fingerprint(self, name: str, fingerprint: bytes, version: int = 0) -> LoadedModel | None:
        """The loaded version of `name` with these bytes: `version` if it is one of them, else the newest."""
        same = self._by_fingerprint.get((name, fingerprint))
        if not same:
            return None
        if len(same) == 1:  # nearly always (asked for on every step)
            return same[0]
        return next((m for m in same if m.version == version), None) or max(same, key=lambda m: m.version)
