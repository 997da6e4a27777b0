"""The model repository: layout and manifest schema, the one contract `export/` and `service/` share.

    <repo>/<model>/<version>/model.onnx
    <repo>/<model>/<version>/manifest.json

Versions are positive integers. Anything else under a model directory (samples, notes) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST_FORMAT = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
log = logging.getLogger(__name__)

# In a model's directory: the highest version number ever published there (a dot name: never loaded), so
# that a deleted version's number is never published again with other weights.
HIGHEST_FILE = ".highest-version"
VERSION_NAME = re.compile(r"[0-9]{1,15}")  # ASCII digits only (str.isdigit() takes "²"), and a number
MAX_VERSION = 10**15 - 1  # that every client's int64 (and a double) holds exactly

Cell = Literal["lstm", "gru", "rnn"]
Precision = Literal["fp32", "fp16", "int8"]
DType = Literal["float32", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A graph input or output. -1 marks a variable axis; axis 0 is the batch, axis 1 the time."""

    name: str
    dtype: DType = "float32"
    shape: list[int]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in shape):
            raise ValueError(f"dimensions must be positive or -1, got {shape}")
        return shape


class StatePair(_Strict):
    """A recurrent state: fed to `input`, read back from `output` (Triton's implicit state, in spirit).

    `shape` includes the batch axis (-1 first); a fresh session starts from zeros.
    """

    input: str
    output: str
    dtype: DType = "float32"
    shape: list[int]

    @field_validator("shape")
    @classmethod
    def _batch_first(cls, shape: list[int]) -> list[int]:
        if len(shape) < 2 or shape[0] != -1 or any(d <= 0 for d in shape[1:]):
            raise ValueError(f"state shape must be [-1, fixed dims...], got {shape}")
        return shape


class Preprocessing(_Strict):
    """How a client turns its raw data into the model's input features."""

    kind: Literal["one_hot", "standardize", "none"]
    # one_hot: the character at index i is feature i.
    vocabulary: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    # What each input feature is, what each output class is, and anything else a client must know.
    features: list[str] | None = None
    labels: list[str] | None = None
    notes: str | None = None


class Provenance(_Strict):
    dataset: str
    training: dict[str, float | int | str | bool]
    versions: dict[str, str]
    created: str
    # How a quantized variant was made (scheme, calibration data and size); absent for fp32 and fp16.
    quantization: dict[str, str] | None = None


class Manifest(_Strict):
    """Everything the server and clients need to know about one published model version."""

    format: int = MANIFEST_FORMAT
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1, le=MAX_VERSION)
    task: Literal["language_model", "forecast", "classification"]
    cell: Cell
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    bidirectional: bool = False
    streamable: bool = True
    precision: Precision = "fp32"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StatePair]
    preprocessing: Preprocessing
    validation: dict[str, float]
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.onnx")
    # The fingerprint of the fp32 graph this version was made from (its own, for fp32): the versions of one
    # export share it. Absent in versions published before lineage was recorded.
    lineage: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.bidirectional and self.streamable:
            raise ValueError("a bidirectional model needs the whole sequence: streamable must be false")
        if self.streamable and not self.state:
            raise ValueError("a streamable model must declare its state pairs")
        if len(self.inputs) != 1 or len(self.inputs[0].shape) != 3:
            raise ValueError("the model must take one input shaped [batch, time, features]")
        if self.inputs[0].shape[2] < 1:
            raise ValueError("the input's feature axis must be fixed")
        graph_names = {t.name for t in self.inputs} | {t.name for t in self.outputs}
        for pair in self.state:
            if pair.input in graph_names or pair.output in graph_names:
                raise ValueError(f"state tensor names must not repeat input/output names: {pair}")
        return self

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def features(self) -> int:
        return self.input.shape[2]


class RepositoryError(Exception):
    """A model directory that cannot be served (bad manifest, fingerprint mismatch, missing file)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_dirs(repo: Path) -> list[tuple[str, int, Path]]:
    """(model, version, directory) for every integer version directory, sorted."""
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} is not a directory")
    found = []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and re.match(MODEL_NAME_PATTERN, p.name)):
        for version_dir in model_dir.iterdir():
            if version_dir.is_dir() and VERSION_NAME.fullmatch(version_dir.name) and int(version_dir.name) >= 1:
                found.append((model_dir.name, int(version_dir.name), version_dir))
    return sorted(found, key=lambda t: (t[0], t[1]))


def read_manifest(version_dir: Path, *, verify: bool = True) -> Manifest:
    """Parse and check one version's manifest; with `verify`, the model file must match its fingerprint."""
    try:
        manifest = Manifest.model_validate_json((version_dir / MANIFEST_FILE).read_text())
    except FileNotFoundError as err:
        raise RepositoryError(f"{version_dir}: no {MANIFEST_FILE}") from err
    except ValueError as err:
        raise RepositoryError(f"{version_dir}/{MANIFEST_FILE}: {err}") from err
    if (manifest.name, str(manifest.version)) != (version_dir.parent.name, version_dir.name):
        raise RepositoryError(
            f"{version_dir}: manifest says {manifest.name}/{manifest.version}, the directory disagrees"
        )
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        raise RepositoryError(f"{version_dir}: no {MODEL_FILE}")
    if verify and sha256_file(model_path) != manifest.fingerprint:
        raise RepositoryError(f"{model_path}: sha256 differs from the manifest's fingerprint; republish it")
    return manifest


def write_version(repo: Path, manifest: Manifest, model_bytes: bytes) -> Path:
    """Publish one version, never over an existing one: versions are immutable (sessions are pinned to them).

    The caller sets the fingerprint; it is checked against the bytes. The files are written under a
    temporary name and renamed into place, so a server scanning the repository never sees half a version.
    """
    if hashlib.sha256(model_bytes).hexdigest() != manifest.fingerprint:
        raise RepositoryError("manifest fingerprint is not the sha256 of the model bytes")
    model_dir = repo / manifest.name
    version_dir = model_dir / str(manifest.version)
    if version_dir.exists():
        raise RepositoryError(
            f"{version_dir} exists: versions are immutable; publish under the next free number "
            f"({next_version(repo, manifest.name)})"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".{manifest.version}-{secrets.token_hex(6)}"  # not a version name: never loaded
    staging.mkdir()
    try:
        (staging / MODEL_FILE).write_bytes(model_bytes)
        text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
        (staging / MANIFEST_FILE).write_text(text)
        staging.rename(version_dir)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise RepositoryError(f"{version_dir}: not published ({err})") from err
    _remember_highest(model_dir, manifest.version)
    return version_dir


def _highest_published(model_dir: Path) -> int:
    try:
        text = (model_dir / HIGHEST_FILE).read_text().strip()
    except OSError:
        return 0
    return int(text) if VERSION_NAME.fullmatch(text) else 0


def _remember_highest(model_dir: Path, version: int) -> None:
    """Raise the model's high-water mark to `version` (written aside and renamed: never half a number)."""
    if version <= _highest_published(model_dir):
        return
    aside = model_dir / f"{HIGHEST_FILE}-{secrets.token_hex(6)}"
    try:
        aside.write_text(f"{version}\n")
        aside.replace(model_dir / HIGHEST_FILE)
    except OSError as err:  # published all the same: the mark only keeps deleted numbers from coming back
        aside.unlink(missing_ok=True)
        log.warning(
            "%s: version %d is published, but the mark of the highest was not kept (%s)", model_dir, version, err
        )


def next_version(repo: Path, name: str) -> int:
    """The number the next export of `name` publishes under: one past every version there is or was (a
    deleted version's number is not used again: clients may have pinned it)."""
    model_dir = repo / name
    if not model_dir.is_dir():
        return 1
    numbers = [int(p.name) for p in model_dir.iterdir() if VERSION_NAME.fullmatch(p.name)]
    return max(*numbers, _highest_published(model_dir), 0) + 1


def versions_of(repo: Path, name: str, precision: Precision | None = None) -> list[int]:
    """The published versions of `name` (of one precision, if given), oldest first."""
    return [
        version
        for model, version, directory in version_dirs(repo)
        if model == name and (precision is None or read_manifest(directory, verify=False).precision == precision)
    ]


def published_as(repo: Path, name: str, fingerprint: str) -> int | None:
    """The version of `name` whose graph has this fingerprint, if one is published (an export rerun)."""
    for version in versions_of(repo, name) if repo.is_dir() else []:
        try:
            if read_manifest(repo / name / str(version), verify=False).fingerprint == fingerprint:
                return version
        except RepositoryError:
            continue
    return None
