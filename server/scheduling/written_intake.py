"""The frontends' Written counts (a stream's audio written into its sample ring row up to a
sample count), kept until the scheduler next decides anything and booked then for every frame
since, as a few array operations.

Why: a frontend writes a frame at most every millisecond, with the handful of streams whose
chunk completed meanwhile (about 6 at 2,000 streams of 160 ms and two frontends). The scheduler's
array operations cost about 12 us a call whatever the rows (bench/RESULTS.md, "Frontends write
the ring"), more than the per-row Python they replace at 6 rows; booked once a decision, over
all the frames since, they cost a fraction of a microsecond a row.

Entries keep their order and their arrival time (a chunk's latency starts when the frame that
completed it arrived, not when it was booked). A slot may appear in several frames: each entry
then carries the count before it (the slot's previous entry, or the books' count for its first).

Pure numpy; no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class WrittenRows:
    """The entries taken, in arrival order: entry i moved slots[i] from before[i] to totals[i]
    samples at times[i]; last[i] marks each slot's final entry."""

    slots: np.ndarray
    before: np.ndarray
    totals: np.ndarray
    times: np.ndarray
    last: np.ndarray

    def __len__(self) -> int:
        return len(self.slots)

    def without(self, drop: np.ndarray) -> WrittenRows:
        """The entries whose slot is not in `drop`."""
        keep = ~np.isin(self.slots, drop)
        return WrittenRows(self.slots[keep], self.before[keep], self.totals[keep], self.times[keep], self.last[keep])


class WrittenIntake:
    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.rows = 0

    def __bool__(self) -> bool:
        return bool(self._parts)

    def add(self, slots: np.ndarray, totals: np.ndarray, at: float) -> None:
        """One frame's entries (its slots distinct), arrived at `at`."""
        if len(slots):
            self._parts.append((slots, totals, at))
            self.rows += len(slots)

    def take(self, received: np.ndarray) -> WrittenRows:
        """Everything added since the last take; `received`: the books' counts per slot."""
        parts, self._parts, self.rows = self._parts, [], 0
        if len(parts) == 1:  # one frame: its slots are distinct
            slots, totals, at = parts[0]
            n = len(slots)
            return WrittenRows(slots, received[slots], totals, np.full(n, at), np.ones(n, dtype=bool))
        slots = np.concatenate([p[0] for p in parts])
        totals = np.concatenate([p[1] for p in parts])
        times = np.repeat(np.array([p[2] for p in parts]), [len(p[0]) for p in parts])
        # A slot's entries in arrival order, side by side: each one's count before is the one
        # before it, the first one's the books'.
        order = np.argsort(slots, kind="stable")
        s, t = slots[order], totals[order]
        first = np.ones(len(s), dtype=bool)
        first[1:] = s[1:] != s[:-1]
        before_sorted = np.empty_like(t)
        before_sorted[1:] = t[:-1]
        before_sorted[first] = received[s[first]]
        last_sorted = np.ones(len(s), dtype=bool)
        last_sorted[:-1] = first[1:]  # the next entry begins another slot
        before = np.empty_like(totals)
        before[order] = before_sorted
        last = np.empty(len(s), dtype=bool)
        last[order] = last_sorted
        return WrittenRows(slots, before, totals, times, last)
