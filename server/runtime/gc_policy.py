"""The garbage collector's settings for a serving process, applied once after warm-up.

Why: a full collection walks every tracked object and stops every thread of the process, the
engine thread included. With torch and NeMo loaded that is ~670k objects and ~0.35 s on a
2-core CPU, so start-up objects are frozen (gc.freeze) after warm-up. Freezing also makes full
collections more frequent: CPython runs one when the objects that survived since the last one
exceed a quarter of the long-lived heap, and after a freeze that heap is small. Under load
(thousands of chunks a second, each allocating a few dozen objects) the default thresholds
(700, 10, 10) then mean several full collections a second across the server's processes.
Larger thresholds collect less often; cyclic garbage is still collected, only later.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import multiprocessing
import os
import time

log = logging.getLogger("nemostream.gc")

# A diagnostic, off by default: every this many seconds each server process logs what its
# collector tracks, by generation and by type (gc_census). It walks the heap (tens of ms at a
# few hundred thousand objects), so it is for a benchmark or a debugging session, never left
# on: NEMOSTREAM_GC_CENSUS_S=20 bash bench/run_h100.sh. Why it exists: on the H200 the
# scheduler's process kept ~85,000 tracked objects a second alive past a young collection
# (bench/RESULTS.md, run 31), which the 2-core CPU machine does not reproduce.
CENSUS_ENV = "NEMOSTREAM_GC_CENSUS_S"


def parse_threshold(text: str | None) -> tuple[int, int, int] | None:
    """"G0,G1,G2" (gc.set_threshold's three numbers), or None/"" for Python's defaults."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--gc-threshold takes three positive integers G0,G1,G2; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def apply_gc_policy(freeze: bool, threshold: tuple[int, int, int] | None) -> None:
    if freeze:
        gc.collect()
        gc.freeze()
        log.info("garbage collector: %d start-up objects frozen", gc.get_freeze_count())
    if threshold is not None:
        gc.set_threshold(*threshold)
        log.info("garbage collector thresholds set to %s", threshold)
    period = census_period()
    if period is not None:
        _start_census(period)


# The census runs on the process's event loop, between callbacks, never from another thread:
# gc.get_objects() hands out a reference to every tracked object, and a tuple that another
# thread was building at that moment (tuple(map(...)) resizes it in place, which requires its
# only reference) failed with "SystemError: bad argument to internal function" in
# tupleobject.c (H200 run 32, Python 3.12: 238 streams of one step failed while a census thread
# walked the heap). A process without a running loop (the engine worker) takes no census.
_census_handle: asyncio.TimerHandle | None = None


def _start_census(period: float) -> None:
    global _census_handle
    if _census_handle is not None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        log.warning("gc census: %s has no event loop: no census in this process",
                    multiprocessing.current_process().name)
        return

    def tick() -> None:
        global _census_handle
        _log_census()
        _census_handle = loop.call_later(period, tick)

    _census_handle = loop.call_later(period, tick)


def stop_census() -> None:
    global _census_handle
    if _census_handle is not None:
        _census_handle.cancel()
        _census_handle = None


def census_period() -> float | None:
    text = os.environ.get(CENSUS_ENV, "").strip()
    if not text:
        return None
    try:
        period = float(text)
    except ValueError:
        raise ValueError(f"{CENSUS_ENV} takes seconds (a number); got {text!r}") from None
    return period if period > 0 else None


def gc_census(top: int = 12) -> dict:
    """What the collector tracks now: objects per generation (frozen ones apart), the most
    common types among the young and middle generations (where objects that outlive a young
    collection wait), and the collections so far per generation."""
    sizes, kinds = [], collections.Counter()
    for generation in (0, 1, 2):
        objects = gc.get_objects(generation)
        sizes.append(len(objects))
        if generation < 2:
            kinds.update(type(o).__qualname__ for o in objects)
        del objects
    stats = gc.get_stats()
    return {"tracked": sizes, "frozen": gc.get_freeze_count(),
            "collections": [g["collections"] for g in stats],
            "collected": [g["collected"] for g in stats],
            "young_types": kinds.most_common(top)}


def _log_census() -> None:
    started = time.perf_counter()
    census = gc_census()
    census["walk_ms"] = round(1e3 * (time.perf_counter() - started), 1)
    census["pid"] = os.getpid()
    census["process"] = multiprocessing.current_process().name  # the engine worker names itself; others: MainProcess
    # A warning, so that it shows under the benchmarks' --log-level WARNING: it is asked for.
    log.warning("gc census %s", census, extra={"gc_census": census})
