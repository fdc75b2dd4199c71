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
