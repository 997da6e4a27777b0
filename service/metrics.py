"""Every Prometheus metric the service exports, registered on a registry passed in.

Names start `rnnserve_`, use base units, and share the label names `model`, `version`, `method`, `code`.
Session ids are never labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond resolution: a CPU step is tens of microseconds of compute.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL_LABELS = ("model", "version")


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model version's labelled series, looked up once (a label lookup per step costs microseconds)."""

    step_latency: Histogram
    queue_wait: Histogram
    runtime_latency: Histogram
    batch_size: Histogram
    steps: Counter
    replays: Counter


class Metrics:
    """The service's metric families; one instance per server, on its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._models: dict[tuple[str, int], ModelMetrics] = {}

        def histogram(name: str, doc: str, labels: tuple[str, ...] = MODEL_LABELS) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=registry)

        self.step_latency = histogram(
            "rnnserve_step_latency_seconds", "Time from a step's arrival to its response, in the server."
        )
        self.queue_wait = histogram("rnnserve_queue_wait_seconds", "Time a step waited for its batch.")
        self.runtime_latency = histogram("rnnserve_runtime_seconds", "One ONNX Runtime call (one batch).")
        self.store_load_latency = histogram(
            "rnnserve_store_load_seconds", "Loading session records from the store (one round trip).", ()
        )
        self.store_commit_latency = histogram(
            "rnnserve_store_commit_seconds", "Committing one batch's session records (one round trip).", ()
        )
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "Sessions per runtime batch.",
            MODEL_LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.steps = Counter(
            "rnnserve_steps_total", "Steps applied (retries not counted).", MODEL_LABELS, registry=registry
        )
        self.replays = Counter(
            "rnnserve_replays_total",
            "Repeated seqs answered from the stored outputs.",
            MODEL_LABELS,
            registry=registry,
        )
        self.errors = Counter(
            "rnnserve_errors_total",
            "Requests answered with an error, by gRPC code.",
            ("method", "code"),
            registry=registry,
        )
        self.conflicts = Counter(
            "rnnserve_store_conflicts_total",
            "Commits refused because another writer advanced the session.",
            registry=registry,
        )
        self.expired = Counter(
            "rnnserve_sessions_expired_total",
            "Steps for sessions that had idled out or never started.",
            registry=registry,
        )
        # Gauges say how to add up over worker processes (prometheus_client's multiprocess mode).
        self.active_sessions = Gauge(
            "rnnserve_active_sessions",
            "Sessions whose state this replica holds in its cache.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.active_streams = Gauge(
            "rnnserve_active_streams", "Open streams (both APIs).", registry=registry, multiprocess_mode="livesum"
        )
        # A pod is ready only while every one of its workers is (livemin).
        self.ready = Gauge(
            "rnnserve_ready",
            "1 while this replica takes traffic (the store answers, a model is loaded, no drain), else 0.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        # The limits those two run into, summed over a pod's workers like the gauges above, so an alert
        # can compare the two whatever the worker count (each worker sets its own).
        self.stream_limit = Gauge(
            "rnnserve_stream_limit",
            "Streams this replica accepts before RESOURCE_EXHAUSTED (max_streams per worker).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.session_cache_limit = Gauge(
            "rnnserve_session_cache_limit",
            "Sessions this replica keeps in its cache before evicting (sessions.cache_max_sessions per worker).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "rnnserve_model_info",
            "Loaded model versions (value 1).",
            (*MODEL_LABELS, "provider", "precision"),
            registry=registry,
            multiprocess_mode="livemax",
        )

    def model(self, name: str, version: int) -> ModelMetrics:
        series = self._models.get((name, version))
        if series is None:
            labels = (name, str(version))
            series = self._models[(name, version)] = ModelMetrics(
                self.step_latency.labels(*labels),
                self.queue_wait.labels(*labels),
                self.runtime_latency.labels(*labels),
                self.batch_size.labels(*labels),
                self.steps.labels(*labels),
                self.replays.labels(*labels),
            )
        return series


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for every v, at one write per bucket touched instead of two per value.

    With several worker processes every write goes to a shared file under a lock; a batch of 256 steps
    observed one by one cost about a tenth of a worker's event loop. Uses the histogram's own bounds and
    values (prometheus_client keeps them as `_upper_bounds`, `_buckets`, `_sum`); a test compares the
    result with `observe`."""
    if not values:
        return
    bounds = histogram._upper_bounds  # noqa: SLF001 - see above
    buckets = histogram._buckets  # noqa: SLF001
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(sum(values)))  # noqa: SLF001
    for i in np.flatnonzero(counts):
        buckets[i].inc(int(counts[i]))
