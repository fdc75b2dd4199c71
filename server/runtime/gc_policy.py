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

import gc
import logging

log = logging.getLogger("nemostream.gc")


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
