"""server.ops.bulk_histogram: a step's chunk latencies observed at once expose exactly what
prometheus_client's Histogram exposes for the same values one at a time."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from client.loadgen_report import parse_metrics
from server.ops.bulk_histogram import BulkHistogram
from server.ops.metrics import _LATENCY_BUCKETS


def _exposed(registry: CollectorRegistry) -> dict:
    return {k: v for k, v in parse_metrics(generate_latest(registry).decode()).items() if not k[0].endswith("_created")}


def test_bulk_observations_expose_what_one_at_a_time_does():
    rng = np.random.default_rng(5)
    # values on the bucket edges too (le: less or equal), below the first, above the last
    values = np.concatenate([rng.exponential(0.05, 500), np.asarray(_LATENCY_BUCKETS), [0.0, 1e-9, 30.0]])
    one, bulk = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", buckets=_LATENCY_BUCKETS, registry=one)
    mine = BulkHistogram("x_seconds", "doc", _LATENCY_BUCKETS)
    bulk.register(mine)
    for v in values.tolist():
        reference.observe(v)
    for part in np.array_split(values, 7):  # as steps of several sizes
        mine.observe_many(part)
    mine.observe_many([])
    a, b = _exposed(one), _exposed(bulk)
    assert a.keys() == b.keys() and len(a) == len(_LATENCY_BUCKETS) + 3  # buckets, +Inf, count, sum
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12), key
    assert b[("x_seconds_count", ())] == len(values)


def test_buckets_must_increase():
    with pytest.raises(ValueError):
        BulkHistogram("x_seconds", "doc", (0.1, 0.05))


def test_values_observed_one_at_a_time_are_exposed_at_the_next_scrape():
    # observe() holds values in a list; a scrape (collect) buckets them first, so none is missed
    # and the exposition is the one-at-a-time Histogram's.
    values = [0.0005, 0.03, 0.03, 0.2, 7.0, 60.0]
    one, bulk = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", buckets=_LATENCY_BUCKETS, registry=one)
    mine = BulkHistogram("x_seconds", "doc", _LATENCY_BUCKETS)
    bulk.register(mine)
    for v in values:
        reference.observe(v)
        mine.observe(v)
    a, b = _exposed(one), _exposed(bulk)
    assert a == pytest.approx(b) and b[("x_seconds_count", ())] == len(values)
    # past PENDING_LIMIT values the list is bucketed without a scrape
    from server.ops import bulk_histogram
    for _ in range(bulk_histogram.PENDING_LIMIT):
        mine.observe(0.01)
    assert mine._pending == [] and int(mine._counts.sum()) == len(values) + bulk_histogram.PENDING_LIMIT


def test_counts_taken_in_one_process_add_up_in_another():
    # A frontend takes its counts (and starts again from zero); the engine process adds them to
    # its own histogram of the same buckets, which then exposes every value of both.
    frontend = BulkHistogram("x_seconds", "doc", _LATENCY_BUCKETS)
    served = BulkHistogram("x_seconds", "doc", _LATENCY_BUCKETS)
    reference = Histogram("x_seconds", "doc", buckets=_LATENCY_BUCKETS, registry=(one := CollectorRegistry()))
    for v in (0.02, 0.3, 4.0):
        frontend.observe(v)
        reference.observe(v)
    served.observe_many([0.001])
    reference.observe(0.001)
    counts, total = frontend.take_counts()
    assert int(counts.sum()) == 3 and total == pytest.approx(4.32)
    again, nothing = frontend.take_counts()
    assert not again.any() and nothing == 0.0  # taken once
    served.add_counts(counts, total)
    bulk = CollectorRegistry()
    bulk.register(served)
    assert _exposed(bulk) == pytest.approx(_exposed(one))
    for bad in (counts[:-1], -counts):  # other buckets, or a negative count
        with pytest.raises(ValueError):
            served.add_counts(bad, 1.0)
    with pytest.raises(ValueError):
        served.add_counts(counts, float("nan"))
