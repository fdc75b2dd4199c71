"""The recent rate of chunks going into steps, for the batching deadline.

A partial batch waits `batch_wait_s` for more chunks only when more are likely to come in that
time: at one stream of 160 ms chunks a chunk arrives every 160 ms, and waiting 5 ms for company
that does not come was a third of its latency (16.3 ms chunk p50 at one stream on the H200, of
which 5.3 ms queue wait; bench/RESULTS.md, run 25). The rate is an exponentially decaying count:
each row adds 1/tau, and the sum decays with time constant tau, so it follows a change of load
within about tau seconds and costs one exp per step.
"""

from __future__ import annotations

import math


class ArrivalRate:
    def __init__(self, tau_s: float = 1.0):
        if tau_s <= 0:
            raise ValueError("tau_s must be > 0")
        self.tau_s = tau_s
        self._value = 0.0   # rows per second, as of `_at`
        self._at = 0.0

    def add(self, rows: int, now: float) -> None:
        self._value = self.per_second(now) + rows / self.tau_s
        self._at = now

    def per_second(self, now: float) -> float:
        if self._value == 0.0:
            return 0.0
        return self._value * math.exp(-max(0.0, now - self._at) / self.tau_s)
