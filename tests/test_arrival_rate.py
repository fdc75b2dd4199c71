"""server/scheduling/arrival_rate.py: the decaying rate of chunks into steps."""

from __future__ import annotations

import math

import pytest

from server.scheduling.arrival_rate import ArrivalRate


def test_a_steady_load_reads_as_its_rate_and_a_stop_decays_it():
    rate = ArrivalRate(tau_s=1.0)
    assert rate.per_second(5.0) == 0.0
    t = 0.0
    for _ in range(2000):  # 100 rows every 50 ms: 2,000 rows/s, for 100 s
        t += 0.05
        rate.add(100, t)
    assert rate.per_second(t) == pytest.approx(2000, rel=0.03)
    assert rate.per_second(t + 1.0) == pytest.approx(rate.per_second(t) / math.e)
    assert rate.per_second(t + 20) < 1e-5


def test_one_stream_of_160_ms_chunks_is_well_below_one_chunk_per_5_ms():
    rate = ArrivalRate()
    for k in range(100):
        rate.add(1, 0.16 * k)
    assert rate.per_second(0.16 * 99) * 0.005 < 0.1
    with pytest.raises(ValueError):
        ArrivalRate(tau_s=0)
