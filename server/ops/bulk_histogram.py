"""A Prometheus histogram that takes a step's observations at once.

Why: the scheduler observes a latency per chunk (ready to step start, ready to result). With
prometheus_client's Histogram that is one Python call, one lock and one bucket search per
chunk, on the event loop that also forms the batches: at 2,400 streams of 160 ms chunks,
15,000 chunks a second, about a twentieth of the loop's core (bench/RESULTS.md, run 30). Here
a step's values arrive as one array: one sort into the buckets (numpy), one lock. Values that
come one at a time (a response written on a call) are held in a list and bucketed together.

It exposes what prometheus_client's Histogram does for an unlabelled series (_bucket with le,
_count, _sum), so dashboards and the load generator read it unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


PENDING_LIMIT = 1024


class BulkHistogram(Collector):
    def __init__(self, name: str, documentation: str, buckets: Sequence[float]):
        edges = [float(b) for b in buckets]
        if not edges or sorted(set(edges)) != edges:
            raise ValueError(f"buckets must be increasing and distinct; got {buckets!r}")
        self.name, self.documentation = name, documentation
        self._edges = np.asarray(edges, dtype=np.float64)  # upper bounds; +Inf is implicit
        self._counts = np.zeros(len(edges) + 1, dtype=np.int64)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()  # the scrape runs on another thread
        # observe()'s values, bucketed at the next drain (appending is one list operation; the
        # drain takes what is there under the lock, so a value appended meanwhile waits for the next)
        self._pending: list[float] = []

    def observe(self, value: float) -> None:
        """One value, bucketed later with others (at PENDING_LIMIT values, or at drain()/collect())."""
        self._pending.append(value)
        if len(self._pending) >= PENDING_LIMIT:
            self.drain()

    def drain(self) -> None:
        """Bucket the values observe() holds."""
        with self._lock:
            n = len(self._pending)
            values = self._pending[:n]
            del self._pending[:n]
        self.observe_many(values)

    def take_counts(self) -> tuple[np.ndarray, float]:
        """What was observed since the last take, as per-bucket counts (not cumulative; +Inf last)
        and their sum; the histogram is empty after. For a process that forwards its figures to the
        one that serves them (add_counts there)."""
        self.drain()
        with self._lock:
            counts, total = self._counts.copy(), self._sum
            self._counts[:] = 0
            self._sum = 0.0
        return counts, total

    def add_counts(self, counts: np.ndarray, total: float) -> None:
        """Another histogram's take_counts() of the same buckets, added to this one."""
        counts = np.asarray(counts, dtype=np.int64).ravel()
        if counts.shape != self._counts.shape or (counts < 0).any() or not np.isfinite(total):
            raise ValueError(f"{self.name}: {counts.size} bucket counts (need {self._counts.size}, none negative) "
                             f"and sum {total}")
        with self._lock:
            self._counts += counts
            self._sum += float(total)

    def observe_many(self, values: np.ndarray | Iterable[float]) -> None:
        """Values in seconds (any float array). A value equal to an edge falls in that edge's
        bucket (le: less than or equal), as in prometheus_client."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        where = np.searchsorted(self._edges, values, side="left")
        add = np.bincount(where, minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += add
            self._sum += total

    def collect(self):
        self.drain()
        with self._lock:
            counts, total = self._counts.copy(), self._sum
        cumulative = np.cumsum(counts).tolist()
        labels = [floatToGoString(e) for e in self._edges.tolist()] + ["+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation,
                                       buckets=list(zip(labels, cumulative)), sum_value=total)
        yield family
