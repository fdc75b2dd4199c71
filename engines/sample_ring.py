"""Each slot's audio in a ring: one float32 array [slots, width], row `slot` holding the stream's
latest `width` samples, stream sample s at column s % width.

Why: the scheduler used to keep each stream's audio as a queue of messages, take every row's
chunk out of it when it formed a batch, and copy the batch's chunks into a buffer for the engine
worker, a few Python calls per row on the event loop that binds the server's capacity
(bench/RESULTS.md, "The frontends keep the streams' text"). With the audio in a ring indexed by
slot, a step's audio is three columns (slots, start and end positions) that the batch carries as
they are: an engine in this process gathers them (`RingSamples`), an engine worker that maps the
same ring (server.runtime.engine_worker) is sent the positions and gathers them itself.

The writer keeps the samples a reader may still need: [kept, written) of a row never exceeds
`width` (server.scheduling.scheduler holds the rest back until a step frees room).

numpy only: the scheduler (no torch) and the engine worker both use it.
"""

from __future__ import annotations

import mmap
import os
import weakref

import numpy as np

from engines.api import RowSamples
from engines.geometry import ChunkGeometry


def ring_width(geometry: ChunkGeometry, seconds: float = 2.0) -> int:
    """Samples a slot's ring holds: `seconds` of audio, and never fewer than three of the
    longest chunk a step reads (a stream's first), so the next chunk can arrive while one is
    in a step and a third waits."""
    return max(int(seconds * geometry.sample_rate), 3 * geometry.samples_needed(0))


class SampleRing:
    def __init__(self, array: np.ndarray, path: str | None = None):
        if array.ndim != 2 or array.dtype != np.float32:
            raise ValueError(f"a sample ring is a 2-D float32 array, not {array.dtype} of shape {array.shape}")
        self.array = array
        self.slots, self.width = array.shape
        # Where another process of this user maps it (`attach`): a shared ring only.
        self.path = path
        self._closer: weakref.finalize | None = None  # closes a shared ring's descriptor

    @classmethod
    def local(cls, slots: int, width: int) -> SampleRing:
        """A ring in this process's memory (zeroed lazily by the OS: a slot's pages cost memory
        once its stream has written them)."""
        return cls(np.zeros((slots, width), dtype=np.float32))

    @classmethod
    def shared(cls, slots: int, width: int) -> SampleRing:
        """A ring other processes can map (`attach(ring.path, ...)`): memory of no file system
        (memfd, so a container's small /dev/shm does not cap it; pages only where written),
        reached through this process's descriptor, which stays open until `close`. OSError
        where the system has no memfd."""
        if slots <= 0 or width <= 0:
            raise ValueError(f"a sample ring of {slots} x {width}")
        fd = os.memfd_create("asr-sample-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slots * width * 4)
            ring = cls(_map(fd, slots, width), f"/proc/{os.getpid()}/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        ring._closer = weakref.finalize(ring, os.close, fd)
        return ring

    @classmethod
    def attach(cls, path: str, slots: int, width: int) -> SampleRing:
        """The ring another process made (`shared`), mapped here."""
        if slots <= 0 or width <= 0:
            raise ValueError(f"a sample ring of {slots} x {width}")
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < slots * width * 4:
                raise ValueError(f"{path} holds less than a sample ring of {slots} x {width}")
            return cls(_map(fd, slots, width), path)
        finally:
            os.close(fd)  # the mapping stays

    def close(self) -> None:
        """No new process can attach any more (those that did keep their mapping)."""
        if self._closer is not None:
            self._closer()

    def write(self, slot: int, position: int, samples: np.ndarray) -> None:
        """Samples at stream positions [position, position + len(samples)) into the slot's row
        (at most `width` of them, which the caller checked against what is still needed)."""
        n = samples.size
        if n > self.width:
            raise ValueError(f"{n} samples do not fit a ring of {self.width}")
        row = self.array[slot]
        c = position % self.width
        first = min(n, self.width - c)
        row[c:c + first] = samples[:first]
        if first < n:  # wraps to the front of the row
            row[:n - first] = samples[first:]

    def read(self, slot: int, start: int, end: int) -> np.ndarray:
        """Stream samples [start, end) of the slot: a view, or a copy where the span wraps."""
        n = end - start
        c = start % self.width
        row = self.array[slot]
        if c + n <= self.width:
            return row[c:c + n]
        return np.concatenate((row[c:], row[:n - (self.width - c)]))

    def gather(self, slots: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> RowSamples:
        """The rows' spans one after another in one new array (a copy: the ring's samples may be
        overwritten once the step that read them is done). One concatenation of the rows' views
        (about 0.4 us a row on the 2-core machine, faster than a copy per row into a preallocated
        array or a fancy index over the whole batch)."""
        offsets = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        read = self.read
        parts = [read(s, a, b) for s, a, b in zip(slots.tolist(), starts.tolist(), ends.tolist())]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return RowSamples(flat, offsets)


def _map(fd: int, slots: int, width: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(fd, slots * width * 4), dtype=np.float32).reshape(slots, width)


class RingSamples(RowSamples):
    """A step's audio as spans of a SampleRing: row i is stream samples [starts[i], ends[i]) of
    ring row slots[i]. Reads as RowSamples (the flat array is gathered on first use); a link to
    an engine that maps the same ring sends `slots`, `starts` and `ends` instead."""

    __slots__ = ("ring", "slots", "starts", "ends", "_gathered")

    def __init__(self, ring: SampleRing, slots: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.ring = ring
        self.slots = np.asarray(slots, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        if not (self.slots.shape == self.starts.shape == self.ends.shape) or (self.ends < self.starts).any():
            raise ValueError("ring spans need one slot, start and end per row, each end at or after its start")
        if (self.ends - self.starts > ring.width).any():
            raise ValueError(f"a span is longer than the ring ({ring.width} samples)")
        offsets = np.zeros(len(self.slots) + 1, dtype=np.int64)
        np.cumsum(self.ends - self.starts, out=offsets[1:])
        self.offsets = offsets
        self._gathered = False  # (the base's `flat` slot is filled by the first read of `flat`)

    def _flat(self) -> np.ndarray:
        if not self._gathered:
            RowSamples.flat.__set__(self, self.ring.gather(self.slots, self.starts, self.ends).flat)
            self._gathered = True
        return RowSamples.flat.__get__(self)

    flat = property(_flat)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.ring.read(int(self.slots[i]), int(self.starts[i]), int(self.ends[i]))

    def __iter__(self):
        read = self.ring.read
        return (read(s, a, b) for s, a, b in zip(self.slots.tolist(), self.starts.tolist(), self.ends.tolist()))

    @property
    def typed(self) -> bool:
        return True  # a SampleRing is float32 by construction: nothing to gather to know it

    def stack_into(self, out: np.ndarray, rows: np.ndarray | None = None) -> None:
        """The named rows' spans copied straight from the ring into `out` (one slice copy a
        row, two where a span wraps), without first gathering the whole step's audio into one
        array: a batch's windows take one pass over its audio instead of two (at 256 rows of
        160 ms, 0.35 against 0.56 ms on the 2-core machine)."""
        positions = range(len(self.slots)) if rows is None else rows.tolist()
        width, arr = self.ring.width, self.ring.array
        n = out.shape[1]
        slots, starts, ends = self.slots, self.starts, self.ends
        for k, i in enumerate(positions):
            a = int(starts[i])
            if int(ends[i]) - a != n:
                raise ValueError(f"row {i} holds {int(ends[i]) - a} samples, not {n}")
            c = a % width
            if c + n <= width:
                out[k] = arr[int(slots[i]), c:c + n]
            else:  # the span wraps to the front of the ring's row
                first = width - c
                out[k, :first] = arr[int(slots[i]), c:]
                out[k, first:] = arr[int(slots[i]), :n - first]

    def take(self, positions: np.ndarray) -> RingSamples:
        """The named rows, as spans of the same ring."""
        return RingSamples(self.ring, self.slots[positions], self.starts[positions], self.ends[positions])
