"""The scheduler's books as arrays indexed by engine slot: where each stream stands, which
streams wait in the ready set and since when, which are in a step. Choosing a batch (ready
rows, oldest first, up to the maximum batch) and the plan's row vectors are array operations
over these, not a walk over stream objects.

The status table stays in server.scheduling.stream_state (a stream's status changes in one place,
StreamState.set_status); the books keep only an index of it (`live`, `flushing`), updated from
there. A stream that holds a slot reads its position from the books (SlotStream's properties),
so the arrays are the one copy; when it gives the slot back its values are copied into the
object (a stream's numbers stay readable after it closed, while the slot serves another).

Pure Python and numpy; no asyncio, no gRPC, no torch.
"""

from __future__ import annotations

import numpy as np

from engines.geometry import ChunkGeometry
from server.scheduling.stream_state import StreamState, StreamStatus

_NO_DUE = -1  # final_due: no client request for a final pending
# When each of a stream's latest chunks was completed by the audio that arrived: per slot, chunk
# k at column k % COMPLETED_KEPT. A stream more chunks ahead than this (a client sending far
# faster than real time) has its older chunks' times overwritten by later ones.
COMPLETED_KEPT = 64


class SlotBooks:
    def __init__(self, geometry: ChunkGeometry, size: int):
        self.geometry = geometry
        self.size = 0
        self.streams: list[StreamState | None] = []
        self._seq = 0  # ready-set order: a row queued later gets a larger number
        self.ready_count = 0  # rows in the ready set
        self._grow(max(1, size))

    def _grow(self, size: int) -> None:
        def extend(old: np.ndarray | None, dtype, fill) -> np.ndarray:
            new = np.full(size, fill, dtype=dtype)
            if old is not None:
                new[:old.size] = old
            return new

        first = self.size == 0
        get = (lambda name: None) if first else (lambda name: getattr(self, name))
        self.received = extend(get("received"), np.int64, 0)        # samples received
        # Of those, samples not in the slot's sample ring yet (engines.sample_ring): held back
        # while the ring has no room, written once a step frees some (usually 0).
        self.spilled = extend(get("spilled"), np.int64, 0)
        self.room_wanted = extend(get("room_wanted"), bool, False)  # a push_audio waits for room
        self.next_chunk = extend(get("next_chunk"), np.int64, 0)    # the next chunk to hand to the engine
        self.due = extend(get("due"), np.int64, 0)                  # samples that complete it mid-stream
        self.live = extend(get("live"), bool, False)                # status accepts chunks
        self.flushing = extend(get("flushing"), bool, False)        # status FLUSHING (audio ended)
        self.in_flight = extend(get("in_flight"), bool, False)      # the row is in a submitted step
        self.queued = extend(get("queued"), bool, False)            # the row's next chunk waits in the ready set
        self.queued_at = extend(get("queued_at"), np.float64, 0.0)  # monotonic time it was queued
        self.order = extend(get("order"), np.int64, 0)              # its place in the ready set (FCFS)
        self.new_utterance = extend(get("new_utterance"), bool, False)  # the next chunk starts an utterance
        self.final_due = extend(get("final_due"), np.int64, _NO_DUE)    # the client's final is due at this chunk count
        # Rows handed to a listener that makes the events (Scheduler.acknowledge) and not yet
        # taken: the stream is not scheduled while its response window is full.
        self.unread = extend(get("unread"), np.int64, 0)
        completed = np.zeros((size, COMPLETED_KEPT), dtype=np.float64)  # 0: no time known
        if not first:
            completed[:self.size] = self.completed_at
        self.completed_at = completed
        self.streams.extend([None] * (size - self.size))
        self.size = size

    # -- a slot's life ---------------------------------------------------------------------------
    def open(self, slot: int, stream: StreamState) -> None:
        """A new stream takes the slot: its row starts clean."""
        if slot >= self.size:
            self._grow(max(slot + 1, 2 * self.size))
        if self.streams[slot] is not None:
            raise RuntimeError(f"slot {slot} is booked for stream {self.streams[slot].stream_id}")
        self._clear(slot)
        self.streams[slot] = stream
        self.live[slot] = stream.status.accepts_chunks
        self.flushing[slot] = stream.status is StreamStatus.FLUSHING

    def free(self, slot: int) -> None:
        """The slot goes back to the engine: the row is cleared and the stream detached."""
        stream = self.streams[slot]
        if stream is not None and isinstance(stream, SlotStream):
            stream._detach()
        self.streams[slot] = None
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        if self.queued[slot]:
            self.ready_count -= 1
        self.received[slot] = self.next_chunk[slot] = self.spilled[slot] = 0
        self.room_wanted[slot] = False
        self.due[slot] = self.geometry.samples_needed(0)
        self.live[slot] = self.flushing[slot] = self.in_flight[slot] = self.queued[slot] = False
        self.new_utterance[slot] = False
        self.queued_at[slot], self.order[slot], self.final_due[slot] = 0.0, 0, _NO_DUE
        self.unread[slot] = 0
        self.completed_at[slot] = 0.0

    # -- audio in --------------------------------------------------------------------------------
    def mark_completed(self, slots: np.ndarray, before: np.ndarray, after: np.ndarray, times: np.ndarray) -> None:
        """The rows' received counts went from `before` to `after` at `times`: the chunks this
        completed were ready then (a chunk's latency starts at the audio that completed it)."""
        c0, c1 = self.geometry.chunks_complete(before), self.geometry.chunks_complete(after)
        grew = c1 > c0
        if not grew.any():
            return
        self.completed_at[slots[grew], c0[grew] % COMPLETED_KEPT] = times[grew]
        several = c1 - c0 > 1  # an entry that completed several chunks: the rest of them, row by row
        for slot, a, b, at in zip(slots[several].tolist(), before[several].tolist(), after[several].tolist(),
                                  times[several].tolist()):
            self.mark_completed_one(slot, a, b, at)

    def mark_completed_one(self, slot: int, before: int, after: int, now: float) -> None:
        """mark_completed for one row, in plain integers (a message at a time)."""
        c0, c1 = self.geometry.chunks_complete(before), self.geometry.chunks_complete(after)
        if c1 > c0:
            self.completed_at[slot, c0 % COMPLETED_KEPT] = now
            if c1 - c0 > 1:
                self.completed_at[slot, np.arange(c0 + 1, min(c1, c0 + COMPLETED_KEPT)) % COMPLETED_KEPT] = now

    def completed_time(self, rows: np.ndarray, chunks: np.ndarray, default: np.ndarray) -> np.ndarray:
        """When the rows' chunks were completed by their audio (`default` where not known)."""
        at = self.completed_at[rows, chunks % COMPLETED_KEPT]
        return np.where(at > 0, at, default)

    def status_changed(self, slot: int, status: StreamStatus) -> None:
        self.live[slot] = status.accepts_chunks
        self.flushing[slot] = status is StreamStatus.FLUSHING
        if not status.accepts_chunks:
            self.dequeue(slot)

    # -- the ready set -------------------------------------------------------------------------
    def queue(self, slot: int, now: float) -> None:
        if not self.queued[slot]:
            self.ready_count += 1
        self.queued[slot] = True
        self.queued_at[slot] = now
        self.order[slot] = self._seq
        self._seq += 1

    def queue_rows(self, rows: np.ndarray, now: float) -> None:
        """Queue several rows at once, in the order given."""
        n = rows.size
        self.ready_count += n - int(np.count_nonzero(self.queued[rows]))
        self.queued[rows] = True
        self.queued_at[rows] = now
        self.order[rows] = np.arange(self._seq, self._seq + n)
        self._seq += n

    def dequeue(self, slot: int) -> None:
        if self.queued[slot]:
            self.ready_count -= 1
            self.queued[slot] = False

    def oldest_queued_at(self) -> float | None:
        rows = np.flatnonzero(self.queued)
        if rows.size == 0:
            return None
        return float(self.queued_at[rows[np.argmin(self.order[rows])]])

    def choose(self, max_batch: int) -> np.ndarray:
        """The rows of the next batch: queued and not in a step, oldest first, at most
        max_batch. They leave the ready set and are marked in flight."""
        rows = np.flatnonzero(self.queued)  # queued rows are live and not in flight (queue's callers)
        if rows.size > max_batch:
            keep = np.argpartition(self.order[rows], max_batch - 1)[:max_batch]
            rows = rows[keep]
        rows = rows[np.argsort(self.order[rows], kind="stable")]
        self.queued[rows] = False
        self.ready_count -= rows.size
        self.in_flight[rows] = True
        return rows

    def advance(self, rows: np.ndarray) -> None:
        """The rows' chunks ran: each stands at its next chunk."""
        k = self.next_chunk[rows] + 1
        self.next_chunk[rows] = k
        self.due[rows] = self.geometry.samples_needed(k)

    def kept(self, slot: int) -> int:
        """The first sample of the slot's stream a step may still read: where its next chunk
        starts (a chunk in a step is the next one until the step returns)."""
        k = self.next_chunk.item(slot)
        return 0 if k == 0 else self.due.item(slot) - self.geometry.chunk_samples

    def kept_of(self, rows: np.ndarray) -> np.ndarray:
        """`kept` of several rows."""
        return np.where(self.next_chunk[rows] > 0, self.due[rows] - self.geometry.chunk_samples, 0)

    def runnable_after_step(self, rows: np.ndarray) -> np.ndarray:
        """Of a returned step's rows, those mid-stream whose next chunk is complete already (the
        common case under load: the audio kept arriving while the step ran), in the ring."""
        return rows[self.live[rows] & ~self.flushing[rows] & ~self.queued[rows] & ~self.in_flight[rows]
                    & (self.received[rows] - self.spilled[rows] >= self.due[rows])]


class _RowField:
    """A SlotStream field that is one cell of a slot-books array while the stream holds its slot,
    and a plain attribute of the object once it gave the slot back (SlotStream._detach)."""

    def __init__(self, array: str, cast, default):
        self.array, self.cast, self.default = array, cast, default

    def __set_name__(self, owner, name: str) -> None:
        self.key = "_" + name

    def __get__(self, stream, owner=None):
        if stream is None:
            return self
        b = stream._books
        if b is None:
            return stream.__dict__.get(self.key, self.default)
        return self.cast(getattr(b, self.array)[stream.slot])

    def __set__(self, stream, value) -> None:
        b = stream._books
        if b is not None:
            getattr(b, self.array)[stream.slot] = value
        else:
            stream.__dict__[self.key] = value


class SlotStream(StreamState):
    """A stream of server.scheduling.scheduler.Scheduler: its position lives in the slot books' row while
    it holds the slot (the arrays are the one copy), in the object once it gave the slot back."""

    _VIEWED = ("received", "next_chunk", "in_flight", "new_utterance_next", "final_due_after")

    def __init__(self, books: SlotBooks, **fields):
        self._books = None  # the dataclass __init__ below writes the defaults into the object
        super().__init__(**fields)
        values = {name: getattr(self, name) for name in self._VIEWED}
        books.open(self.slot, self)
        self._books = books
        for name, value in values.items():
            setattr(self, name, value)

    def set_status(self, new: StreamStatus) -> None:
        super().set_status(new)
        if self._books is not None:
            self._books.status_changed(self.slot, new)

    def _detach(self) -> None:
        """Copy the row into the object: the slot serves another stream from now on."""
        values = {name: getattr(self, name) for name in self._VIEWED}
        self._books = None
        for name, value in values.items():
            setattr(self, name, value)

    received = _RowField("received", int, None)

    @property
    def next_chunk(self) -> int:
        b = self._books
        return int(b.next_chunk[self.slot]) if b is not None else self.__dict__["_next_chunk"]

    @next_chunk.setter
    def next_chunk(self, value: int) -> None:
        b = self._books
        if b is not None:
            b.next_chunk[self.slot] = value
            b.due[self.slot] = b.geometry.samples_needed(value)
        else:
            self.__dict__["_next_chunk"] = value

    in_flight = _RowField("in_flight", bool, False)
    new_utterance_next = _RowField("new_utterance", bool, False)

    @property
    def final_due_after(self) -> int | None:
        b = self._books
        if b is None:
            return self.__dict__.get("_final_due")
        due = int(b.final_due[self.slot])
        return None if due == _NO_DUE else due

    @final_due_after.setter
    def final_due_after(self, value: int | None) -> None:
        b = self._books
        if b is not None:
            b.final_due[self.slot] = _NO_DUE if value is None else value
        else:
            self.__dict__["_final_due"] = value
