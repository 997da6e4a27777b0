"""The three tasks: their data, their training loss, their held-out metric, their manifest preprocessing.

Each task evaluates torch networks (during training) and exported graphs (each precision variant) with
the same metric on the same held-out data.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch.nn import functional as F

from export.config import ModelSpec
from export.data import (
    GLUCOSE_FEATURES,
    GLUCOSE_GAP_MINUTES,
    TEST_PLAYS,
    VALIDATION_PLAYS,
    Sequences,
    load_glucose,
    load_shakespeare,
    load_vowels,
    persistence_rmse,
)
from export.nets import TaskNet
from export.onnx_export import INPUT, Graph, stream
from service.repository import Preprocessing


class Task(abc.ABC):
    """What training and validation need to know about one task."""

    name: str
    metric: str
    lower_is_better: bool
    outputs: list[str]
    dataset: str

    @abc.abstractmethod
    def build_net(self, spec: ModelSpec) -> TaskNet: ...

    @abc.abstractmethod
    def train_loss(self, net: TaskNet, step: int, batch: int, bptt: int, rng: np.random.Generator) -> torch.Tensor:
        """The loss of one training batch (the task carries its own state between windows)."""

    @abc.abstractmethod
    def validate(self, net: TaskNet) -> float:
        """The metric on the validation split, from torch."""

    @abc.abstractmethod
    def evaluate(
        self, session: ort.InferenceSession, graph: Graph, batch: int = 1, split: str = "test"
    ) -> dict[str, float]:
        """The metric on a held-out split ("validation" or "test") from an exported graph, `self.metric`
        among the keys.

        Streaming tasks run as served: one step per call, `batch` streams side by side in each call.
        """

    @abc.abstractmethod
    def floor(self, split: str) -> float:
        """The baseline a model must beat to be worth publishing, on the split, in the metric's units."""

    @abc.abstractmethod
    def calibration_input(self) -> list[np.ndarray]:
        """Training-split inputs for int8 calibration: arrays [B, T, F], streamed with their states."""

    def invariance_input(self, rng: np.random.Generator, batch: int = 64, steps: int = 50) -> np.ndarray:
        """x [batch, steps, F]: a held-out stream in row 0, and batch-mates scaled far beyond it in the others,
        the inputs that moved a session's answers most when a batch shared one quantization scale."""
        x = max(self.parity_inputs(steps), key=lambda s: s.shape[1])[0, :steps]
        mates = x[rng.integers(0, len(x), (batch - 1, len(x)))] * rng.uniform(0.5, 8.0, (batch - 1, 1, 1))
        mates += rng.normal(0.0, float(np.abs(x).mean()) + 1e-3, mates.shape)
        return np.concatenate([x[None], mates.astype(np.float32)])

    @abc.abstractmethod
    def parity_inputs(self, steps: int) -> list[np.ndarray]:
        """Held-out sequences [1, T, F] for the torch-vs-ONNX check, `steps` in all where the split has them."""

    @abc.abstractmethod
    def preprocessing(self) -> Preprocessing: ...

    def anomaly_sigma(self, net: TaskNet) -> float | None:
        return None


class CharLM(Task):
    name, metric, lower_is_better, outputs = "charlm", "perplexity", True, ["logits"]
    dataset = f"shakespeare 0.6 plays; validation: {', '.join(VALIDATION_PLAYS)}; test: {', '.join(TEST_PLAYS)}"

    def __init__(self, validation_chars: int | None = None, test_chars: int | None = None) -> None:
        self.corpus = load_shakespeare()
        self.vocab = len(self.corpus.vocabulary)
        self._eye = np.eye(self.vocab, dtype=np.float32)
        self._validation = self.corpus.validation[:validation_chars] if validation_chars else self.corpus.validation
        self._test = self.corpus.test[:test_chars] if test_chars else self.corpus.test
        self._streams: torch.Tensor | None = None
        self._state: list[torch.Tensor] | None = None

    def build_net(self, spec: ModelSpec) -> TaskNet:
        return TaskNet(spec, self.vocab, self.vocab)

    def train_loss(self, net: TaskNet, step: int, batch: int, bptt: int, rng: np.random.Generator) -> torch.Tensor:
        if self._streams is None or self._streams.shape[0] != batch:
            length = len(self.corpus.train) // batch
            self._streams = torch.from_numpy(self.corpus.train[: length * batch].reshape(batch, length))
        windows = (self._streams.shape[1] - 1) // bptt
        start = (step % windows) * bptt
        if start == 0 or self._state is None:
            self._state = None
        chunk = self._streams[:, start : start + bptt + 1]
        logits, state = net(F.one_hot(chunk[:, :-1], self.vocab).float(), self._state)
        self._state = [s.detach() for s in state]
        return F.cross_entropy(logits.reshape(-1, self.vocab), chunk[:, 1:].reshape(-1))

    @torch.no_grad()
    def validate(self, net: TaskNet) -> float:
        ids = torch.from_numpy(self._validation)
        logits, _ = net(F.one_hot(ids[:-1], self.vocab).float()[None])
        return math.exp(float(F.cross_entropy(logits[0], ids[1:])))

    def _split(self, split: str) -> np.ndarray:
        return {"validation": self._validation, "test": self._test}[split]

    def evaluate(
        self, session: ort.InferenceSession, graph: Graph, batch: int = 1, split: str = "test"
    ) -> dict[str, float]:
        held_out = self._split(split)
        length = (len(held_out) - 1) // batch
        ids = held_out[: length * batch + 1]
        inputs = np.stack([ids[i * length : (i + 1) * length] for i in range(batch)])
        targets = np.stack([ids[i * length + 1 : (i + 1) * length + 1] for i in range(batch)])
        logits = stream(session, graph, self._eye[inputs], chunk=1)[0]["logits"].astype(np.float64)
        shifted = logits - logits.max(axis=2, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
        picked = np.take_along_axis(log_probs, targets[..., None], axis=2)
        return {"perplexity": float(np.exp(-picked.mean())), "characters": float(targets.size)}

    def floor(self, split: str) -> float:
        """The unigram model's perplexity: character frequencies of the training split (add-one smoothed)."""
        counts = np.bincount(self.corpus.train, minlength=self.vocab) + 1.0
        log_p = np.log(counts / counts.sum())
        return float(np.exp(-log_p[self._split(split)[1:]].mean()))

    def calibration_input(self) -> list[np.ndarray]:
        """64 streams of 256 characters from random places in the training plays."""
        rng = np.random.default_rng(0)
        starts = rng.integers(0, len(self.corpus.train) - 256, 64)
        return [self._eye[np.stack([self.corpus.train[s : s + 256] for s in starts])]]

    def parity_inputs(self, steps: int) -> list[np.ndarray]:
        """One stream of the test play's first `steps` characters."""
        return [self._eye[self.corpus.test[:steps]][None]]

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            kind="one_hot",
            vocabulary=self.corpus.vocabulary,
            notes="one character per step: feature i is 1 for the character vocabulary[i]; logits score the next",
        )


TRAINED_WINDOW = 48  # the catalog's glucose bptt


class Glucose(Task):
    name, metric, lower_is_better, outputs = "glucose", "rmse", True, ["forecast", "anomaly"]
    dataset = (
        "bokeh_sampledata glucose (continuous glucose monitor, 2010-03-24 to 2010-10-10), split into "
        f"segments at gaps over {GLUCOSE_GAP_MINUTES:.0f} min; chronological 70/15/15 split"
    )

    def __init__(self) -> None:
        self.series = load_glucose()

    def build_net(self, spec: ModelSpec) -> TaskNet:
        mean, std = torch.from_numpy(self.series.mean), torch.from_numpy(self.series.std)
        return TaskNet(
            spec,
            2,
            1,
            mean=mean,
            std=std,
            output_scale=float(std[0]),
            output_shift=float(mean[0]),
            first_gap=self.series.typical_gap,
        )

    def train_loss(self, net: TaskNet, step: int, batch: int, bptt: int, rng: np.random.Generator) -> torch.Tensor:
        segments = [s for s in self.series.train if len(s) > bptt + 1]
        picks = rng.integers(0, len(segments), batch)
        windows = []
        for i in picks:
            segment = segments[i]
            start = rng.integers(0, len(segment) - bptt - 1)
            windows.append(segment[start : start + bptt + 1])
        window = torch.from_numpy(np.stack(windows))
        forecast, _ = net(window[:, :-1])
        scale = float(self.series.std[0])
        return F.mse_loss(forecast[..., 0] / scale, window[:, 1:, 0] / scale)

    @torch.no_grad()
    def _residuals(self, net: TaskNet, segments: list[np.ndarray]) -> np.ndarray:
        errors = []
        for segment in segments:
            forecast, _ = net(torch.from_numpy(segment[None]))
            errors.append(forecast[0, :-1, 0].numpy() - segment[1:, 0])
        return np.concatenate(errors).astype(np.float64)

    def validate(self, net: TaskNet) -> float:
        return float(np.sqrt(np.mean(self._residuals(net, self.series.validation) ** 2)))

    def anomaly_sigma(self, net: TaskNet) -> float:
        return float(np.std(self._residuals(net.eval(), self.series.validation)))

    def _split(self, split: str) -> list[np.ndarray]:
        return {"validation": self.series.validation, "test": self.series.test}[split]

    def evaluate(
        self, session: ort.InferenceSession, graph: Graph, batch: int = 1, split: str = "test"
    ) -> dict[str, float]:
        errors = []
        segments = sorted(self._split(split), key=len)
        for start in range(0, len(segments), batch):
            group = segments[start : start + batch]
            # A split with fewer segments than `batch` still runs `batch` rows: unscored batch-mates (the
            # split's segments again, from the other end) fill the call.
            mates = [segments[-1 - k % len(segments)] for k in range(batch - len(group))]
            longest = max(len(s) for s in group)
            # Shorter segments are padded with their last reading, longer mates cut; neither is scored.
            rows = [np.concatenate([s, np.repeat(s[-1:], longest - len(s), axis=0)])[:longest] for s in group + mates]
            forecast = stream(session, graph, np.stack(rows), chunk=1)[0]["forecast"][..., 0]
            errors += [forecast[i, : len(s) - 1] - s[1:, 0] for i, s in enumerate(group)]
        residual = np.concatenate(errors).astype(np.float64)
        # Trained on windows of TRAINED_WINDOW readings, served on whole segments (thousands of readings):
        # the error past the window shows whether that matters.
        early = np.concatenate([e[:TRAINED_WINDOW] for e in errors]).astype(np.float64)
        late = np.concatenate([e[TRAINED_WINDOW:] for e in errors]).astype(np.float64)
        return {
            "rmse": float(np.sqrt(np.mean(residual**2))),
            f"rmse_first_{TRAINED_WINDOW}": float(np.sqrt(np.mean(early**2))),
            f"rmse_after_{TRAINED_WINDOW}": float(np.sqrt(np.mean(late**2))),
            "persistence_rmse": persistence_rmse(self._split(split)),
            "forecasts": float(len(residual)),
        }

    def floor(self, split: str) -> float:
        """Persistence: the next reading forecast as the last one."""
        return persistence_rmse(self._split(split))

    def calibration_input(self) -> list[np.ndarray]:
        """64 windows of 256 readings from random places in the training segments, from their starts."""
        rng = np.random.default_rng(0)
        segments = [s for s in self.series.train if len(s) >= 256]
        picks = rng.integers(0, len(segments), 64)
        return [np.stack([segments[i][:256] for i in picks])]

    def forecast_trace(self, session: ort.InferenceSession, graph: Graph, length: int = 600) -> dict[str, np.ndarray]:
        """Readings, forecasts and anomaly scores over the longest test segment's first `length` steps."""
        segment = max(self.series.test, key=len)[:length]
        outputs, _ = stream(session, graph, segment[None], chunk=len(segment))
        return {
            "reading": segment[:, 0],
            "forecast": outputs["forecast"][0, :, 0],
            "anomaly": outputs["anomaly"][0, :, 0],
        }

    def parity_inputs(self, steps: int) -> list[np.ndarray]:
        """Whole segments, each a session from its first reading: the test split's, then the validation
        split's, until `steps` readings (the test split alone has fewer than 10,000)."""
        sequences, left = [], steps
        for segment in [*self.series.test, *self.series.validation]:
            if left <= 0:
                break
            sequences.append(segment[None, :left])
            left -= len(sequences[-1][0])
        return sequences

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            kind="none",
            features=list(GLUCOSE_FEATURES),
            labels=None,
            notes=(
                "send raw readings: [glucose mg/dL, minutes since the previous reading (0 for the first)]; "
                f"start a new session after a gap of more than {GLUCOSE_GAP_MINUTES:.0f} minutes. forecast is "
                "the next reading in mg/dL; anomaly is |reading - previous forecast| / sigma"
            ),
        )


class Vowels(Task):
    name, metric, lower_is_better, outputs = "vowels", "accuracy", False, ["logits"]
    dataset = "UEA JapaneseVowels (aeon 1.6.0): 9 speakers, 12 LPC coefficients per frame, 7-29 frames"

    def __init__(self) -> None:
        self.data = load_vowels()

    def build_net(self, spec: ModelSpec) -> TaskNet:
        mean, std = torch.from_numpy(self.data.mean), torch.from_numpy(self.data.std)
        return TaskNet(spec, 12, len(self.data.classes), mean=mean, std=std)

    @staticmethod
    def _padded(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(s) for s in sequences])
        padded = np.zeros((len(sequences), int(lengths.max()), sequences[0].shape[1]), np.float32)
        for i, s in enumerate(sequences):
            padded[i, : len(s)] = s
        return torch.from_numpy(padded), lengths

    def train_loss(self, net: TaskNet, step: int, batch: int, bptt: int, rng: np.random.Generator) -> torch.Tensor:
        picks = rng.choice(len(self.data.train.sequences), min(batch, len(self.data.train.sequences)), replace=False)
        x, lengths = self._padded([self.data.train.sequences[i] for i in picks])
        return F.cross_entropy(net.classify(x, lengths), torch.from_numpy(self.data.train.labels[picks]))

    @torch.no_grad()
    def validate(self, net: TaskNet) -> float:
        x, lengths = self._padded(self.data.validation.sequences)
        predicted = net.classify(x, lengths).argmax(dim=1).numpy()
        return float((predicted == self.data.validation.labels).mean() * 100)

    def _split(self, split: str) -> Sequences:
        return {"validation": self.data.validation, "test": self.data.test}[split]

    def evaluate(
        self, session: ort.InferenceSession, graph: Graph, batch: int = 1, split: str = "test"
    ) -> dict[str, float]:
        # One utterance per request, as clients send them: lengths differ, and padding would change the mean.
        held_out = self._split(split)
        predicted = [int(session.run(None, {INPUT: s[None]})[0][0].argmax()) for s in held_out.sequences]
        return {
            "accuracy": float((np.array(predicted) == held_out.labels).mean() * 100),
            "sequences": float(len(predicted)),
        }

    def floor(self, split: str) -> float:
        """Chance: the accuracy of always answering the training split's most frequent speaker."""
        majority = np.bincount(self.data.train.labels).argmax()
        return float((self._split(split).labels == majority).mean() * 100)

    def calibration_input(self) -> list[np.ndarray]:
        """Every training utterance, one per call as served."""
        return [s[None] for s in self.data.train.sequences]

    def parity_inputs(self, steps: int) -> list[np.ndarray]:
        """Every test utterance, one call each."""
        return [s[None] for s in self.data.test.sequences]

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            kind="none",
            features=[f"lpc_{i + 1}" for i in range(12)],
            labels=self.data.classes,
            notes="one whole utterance [T, 12] per sequence, through Infer / ModelInfer; logits score the speakers",
        )


TASK_TYPES: dict[str, type[Task]] = {"charlm": CharLM, "glucose": Glucose, "vowels": Vowels}


def load_task(name: str, **options: Any) -> Task:
    return TASK_TYPES[name](**options)


def better(task: Task, candidate: float, reference: float) -> bool:
    return candidate < reference if task.lower_is_better else candidate > reference
