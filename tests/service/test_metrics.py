"""Metrics written a batch at a time read the same as metrics written one value at a time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import LATENCY_BUCKETS, observe_many


def _exposition(values: list[float], batched: bool) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    histogram = Histogram("h", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    series = histogram.labels("m")
    if batched:
        observe_many(series, values)
    else:
        for value in values:
            series.observe(value)
    (family,) = (f for f in text_string_to_metric_families(generate_latest(registry).decode()) if f.name == "h")
    return {(s.name, s.labels.get("le", "")): s.value for s in family.samples if not s.name.endswith("_created")}


# Values on the bucket bounds themselves too: a bound belongs to its own bucket (le = less or equal).
_VALUES = st.lists(
    st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 10, allow_nan=False)),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(_VALUES)
def test_observe_many_equals_observing_one_by_one(values: list[float]) -> None:
    batched, one_by_one = _exposition(values, batched=True), _exposition(values, batched=False)
    assert batched.keys() == one_by_one.keys()
    for sample, value in one_by_one.items():  # buckets and count exactly; the sum up to rounding
        assert batched[sample] == (pytest.approx(value) if sample[0] == "h_sum" else value), sample
