"""server.runtime.gc_policy: the thresholds' parsing and the opt-in census of what the
collector tracks (NEMOSTREAM_GC_CENSUS_S), a diagnostic for the scheduler's collections."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time

import pytest

from server.runtime import gc_policy


class _Held:  # a tracked type of its own, so the census can be checked for it
    pass


def test_thresholds_parse_or_are_refused():
    assert gc_policy.parse_threshold("20000,20,20") == (20000, 20, 20)
    assert gc_policy.parse_threshold("") is None
    for bad in ("1,2", "0,1,1", "a,b,c"):
        with pytest.raises(ValueError):
            gc_policy.parse_threshold(bad)


def test_the_census_counts_young_objects_by_type():
    gc.collect()
    held = [_Held() for _ in range(3_000)]  # young: allocated after the last collection
    census = gc_policy.gc_census(top=50)
    kinds = dict(census["young_types"])
    assert kinds.get("_Held", 0) >= 3_000
    assert len(census["tracked"]) == 3 and sum(census["tracked"]) >= 3_000
    assert len(census["collections"]) == 3
    del held


def test_the_census_period_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(gc_policy.CENSUS_ENV, raising=False)
    assert gc_policy.census_period() is None
    monkeypatch.setenv(gc_policy.CENSUS_ENV, "0")
    assert gc_policy.census_period() is None
    monkeypatch.setenv(gc_policy.CENSUS_ENV, "2.5")
    assert gc_policy.census_period() == 2.5
    monkeypatch.setenv(gc_policy.CENSUS_ENV, "soon")
    with pytest.raises(ValueError, match=gc_policy.CENSUS_ENV):
        gc_policy.census_period()


async def test_with_the_census_on_the_policy_logs_it_periodically_from_the_event_loop(monkeypatch, caplog):
    monkeypatch.setenv(gc_policy.CENSUS_ENV, "0.05")
    threshold = gc.get_threshold()
    threads_before = set(threading.enumerate())
    try:
        with caplog.at_level(logging.WARNING, logger="nemostream.gc"):  # shows under --log-level WARNING
            gc_policy.apply_gc_policy(freeze=False, threshold=None)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sum("gc census" in r.getMessage() for r in caplog.records) < 2:
                await asyncio.sleep(0.02)
    finally:
        gc_policy.stop_census()
        gc.set_threshold(*threshold)
    records = [r for r in caplog.records if "gc census" in r.getMessage()]
    assert len(records) >= 2, "no periodic census logged"
    assert set(records[0].gc_census) >= {"tracked", "young_types", "collections", "walk_ms", "pid"}
    # On the loop's own thread, between callbacks: a census thread's gc.get_objects() once broke
    # a tuple another thread was building (SystemError in tupleobject.c, H200 run 32).
    assert {r.thread for r in records} == {threading.get_ident()}
    assert set(threading.enumerate()) <= threads_before
    count = len(records)
    await asyncio.sleep(0.2)
    assert len([r for r in caplog.records if "gc census" in r.getMessage()]) == count  # stopped


def test_without_an_event_loop_there_is_no_census(monkeypatch, caplog):
    monkeypatch.setenv(gc_policy.CENSUS_ENV, "0.05")
    threshold = gc.get_threshold()
    threads_before = set(threading.enumerate())
    try:
        with caplog.at_level(logging.WARNING, logger="nemostream.gc"):
            gc_policy.apply_gc_policy(freeze=False, threshold=None)  # as the engine worker calls it
            time.sleep(0.2)
    finally:
        gc_policy.stop_census()
        gc.set_threshold(*threshold)
    assert any("no census in this process" in r.getMessage() for r in caplog.records)
    assert not any("gc census {" in r.getMessage() for r in caplog.records)
    assert set(threading.enumerate()) <= threads_before
