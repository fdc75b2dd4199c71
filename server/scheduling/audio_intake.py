"""How a stream's audio comes in, the scheduler's half that books it
(server.scheduling.scheduler.Scheduler is an AudioIntake): each slot's audio lives in a sample
ring (engines.sample_ring), a row a slot, that a step's plan names spans of.

Two ways in:
  - a caller in this process pushes samples (accept_audio, push_audio): they are written into
    the stream's row, and what the ring has no room for waits in the stream's SampleQueue until
    a returning step frees some (`books.spilled`);
  - a frontend process writes its streams' rows itself and says how far (audio_written, from
    server.runtime.engine_host): the counts are kept (server.scheduling.written_intake) and
    booked as array operations at the batching task's next decision (book_written). Such a
    stream's slot goes back to the pool only once the frontend writes no more (writer_detached).

The scheduler provides what this class uses: `engine`, `config`, `geometry`, `max_batch`,
`_books`, `_max_pending`, `_max_samples`, `_wakeup`, `_fail`, `_end_at_limit`, `_maybe_enqueue`,
`_release_slot`, `_wait_for_audio_room`. Pure Python and numpy; no gRPC, no torch.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from engines.sample_ring import SampleRing, ring_width
from server.scheduling.stream_events import ErrorKind
from server.scheduling.stream_state import StreamState, StreamStatus
from server.scheduling.written_intake import WrittenIntake

log = logging.getLogger("nemostream.scheduler")


class AudioIntake:
    def _init_audio(self, engine) -> None:
        """The ring an engine worker maps (its `sample_ring`), else one of this scheduler's own,
        shared where the system allows so that frontend processes can write into it."""
        ring = getattr(engine, "sample_ring", None)
        self._own_ring = not isinstance(ring, SampleRing)
        if self._own_ring:
            slots, width = self._books.size, ring_width(self.geometry)
            try:
                ring = SampleRing.shared(slots, width)
            except OSError as exc:
                log.warning("no shared sample ring; frontends send their audio in messages", extra={"error": str(exc)})
                ring = SampleRing.local(slots, width)
        self._ring: SampleRing = ring
        self._intake = WrittenIntake()  # frontends' Written counts, booked at the next decision

    def accept_audio(self, stream: StreamState, samples: np.ndarray) -> bool:
        """push_audio without the wait: append, enforce the duration limit, queue what is
        complete. False once the stream no longer takes audio. A caller that does not await
        push_audio (server.runtime.engine_host) applies the backpressure itself."""
        if stream.status is not StreamStatus.RECEIVING:
            return False
        if samples.size == 0:
            return True
        books, slot = self._books, stream.slot
        received = books.received.item(slot)
        at_limit = received + samples.size > self._max_samples
        if at_limit:
            if self._refused_past_limit(stream):
                return False
            samples = samples[:self._max_samples - received]
        now = time.monotonic()
        n = samples.size
        spilled = books.spilled.item(slot)
        kept = books.kept(slot)
        if spilled:  # audio already waits for room: this goes behind it
            stream.audio.append(samples)
            books.spilled[slot] = spilled + n
        else:
            room = self._ring.width - (received - kept)
            if n <= room:
                self._ring.write(slot, received, samples)
            else:  # the ring holds what a step may still read: the rest waits for room
                if room > 0:
                    self._ring.write(slot, received, samples[:room])
                stream.audio.append(samples[max(room, 0):])
                books.spilled[slot] = n - max(room, 0)
        books.mark_completed_one(slot, received, received + n, now)
        received += n
        books.received[slot] = received
        pending = received - kept
        if pending > stream.peak_pending:
            stream.peak_pending = pending
        if at_limit:  # the rest of the client's audio is not taken
            self._cut_at_limit(stream)
            return False
        self._maybe_enqueue(stream, now)
        return True

    def _refused_past_limit(self, stream: StreamState) -> bool:
        """A stream given audio past max_stream_seconds: one that does not end there with its
        final (a whole file that is too long) fails with OUT_OF_RANGE; True then."""
        if stream.finalize_at_limit:
            return False
        self._fail(stream, ErrorKind.OUT_OF_RANGE,
                   f"stream exceeds the maximum duration of {self.config.max_stream_seconds:g} s of audio")
        return True

    def _cut_at_limit(self, stream: StreamState) -> None:
        """The stream took max_stream_seconds of audio: it ends there, with its final."""
        self._end_at_limit(stream, f"{self.config.max_stream_seconds:g} s of audio")

    def _ring_room(self, slot: int, written: int) -> int:
        """Samples the slot's ring row takes past `written` before it would overwrite what a
        step may still read."""
        return self._ring.width - (written - self._books.kept(slot))

    @property
    def sample_ring(self) -> SampleRing:
        """Each slot's audio (a frontend process writes its streams' rows: audio_written)."""
        return self._ring

    def audio_written(self, slots: np.ndarray, totals: np.ndarray) -> None:
        """A frontend process wrote streams' audio into their rows of the sample ring: the
        stream in slots[i] has totals[i] samples now (distinct slots). Kept, and booked with
        every frame since at the scheduler's next decision (book_written): the batching task
        is woken when the ready set is empty or these could fill a batch, as accept_audio's
        first or full entry does."""
        self._intake.add(np.asarray(slots, dtype=np.int64), np.asarray(totals, dtype=np.int64), time.monotonic())
        ready = self._books.ready_count
        if not ready or ready + self._intake.rows >= self.max_batch:
            self._wakeup.set()

    def book_written(self) -> None:
        """Book the frontends' Written counts kept since the last time, as array operations over
        the books: the received counts, when each chunk was completed (the frame's arrival),
        the rows now runnable into the ready set. Per row only the rare entries: not receiving
        any more, not grown, past the duration limit (cut there, or failed), or past what the
        ring may hold (a frontend that broke the rule: that stream fails, no other)."""
        if not self._intake:
            return
        books = self._books
        rows = self._intake.take(books.received)
        slots, totals = rows.slots, rows.totals
        ok = (books.live[slots] & ~books.flushing[slots] & (totals > rows.before) & (totals <= self._max_samples)
              & (totals - books.kept_of(slots) <= self._ring.width))
        if not ok.all():
            odd = np.unique(slots[~ok])
            for slot, total, at in zip(slots.tolist(), totals.tolist(), rows.times.tolist()):
                if slot in odd:
                    self._book_one(slot, total, at)
            rows = rows.without(odd)
            slots, totals = rows.slots, rows.totals
        books.mark_completed(slots, rows.before, totals, rows.times)
        last, final = slots[rows.last], totals[rows.last]
        books.received[last] = final
        runnable = last[~books.queued[last] & ~books.in_flight[last] & (final >= books.due[last])
                        & (books.unread[last] < self.config.response_buffer)]
        if runnable.size:
            books.queue_rows(runnable, time.monotonic())

    def _book_one(self, slot: int, total: int, at: float) -> None:
        """book_written for one entry, in order (the rare ones)."""
        books = self._books
        stream = books.streams[slot]
        received = books.received.item(slot)
        if stream is None or stream.status is not StreamStatus.RECEIVING or total <= received:
            return  # audio after the stream's end (or a stale count): not taken
        if self._ring_room(slot, total) < 0:
            self._fail(stream, ErrorKind.INTERNAL, f"the frontend wrote {total - books.kept(slot)} samples ahead of "
                                                   f"what the engine consumed, past the ring's {self._ring.width}")
            return
        at_limit = total > self._max_samples
        if at_limit and self._refused_past_limit(stream):
            return
        total = min(total, self._max_samples)
        books.mark_completed_one(slot, received, total, at)
        books.received[slot] = total
        if at_limit:
            self._cut_at_limit(stream)
        else:
            self._maybe_enqueue(stream)

    def writer_detached(self, stream: StreamState) -> None:
        """The frontend that wrote the stream's audio writes no more: a finished stream's slot
        may go back to the pool now."""
        stream.writer_attached = False
        self._release_slot(stream)

    async def push_audio(self, stream: StreamState, samples: np.ndarray) -> bool:
        """Append samples at the model's rate. Waits while too much audio is pending (the
        backpressure that reaches the client through gRPC flow control). False once the
        stream no longer takes audio."""
        if not self.accept_audio(stream, samples):
            return False
        if self._pending_samples(stream) <= self._max_pending:
            return True
        self._books.room_wanted[stream.slot] = True  # a returning step sets audio_room (_requeue)
        return await self._wait_for_audio_room(stream)

    def _pending_samples(self, stream: StreamState) -> int:
        """Samples received and not yet handed to the engine by a step that returned."""
        if stream.slot_released:
            return 0
        return stream.received - self._books.kept(stream.slot)

    def consumed_samples(self, stream: StreamState) -> int:
        """Samples of the stream that returned steps have taken."""
        return stream.received - self._pending_samples(stream)

    def _drain_spill(self, stream: StreamState) -> None:
        """Audio that waited for room goes into the ring as far as room allows (the stream is
        in no step: what it holds before `kept` is free)."""
        books, slot = self._books, stream.slot
        spilled = books.spilled.item(slot)
        written = books.received.item(slot) - spilled
        n = min(spilled, self._ring_room(slot, written))
        if n > 0:
            self._ring.write(slot, written, stream.audio.take(n))
            books.spilled[slot] = spilled - n

    def _room_freed(self, rows: np.ndarray) -> None:
        """A step returned with these rows (out of it now): the ring room it freed takes the
        audio that waited for it, and pushes that waited for room go on."""
        books = self._books
        for r in rows[books.spilled[rows] > 0].tolist():
            if books.live[r]:
                self._drain_spill(books.streams[r])
        for r in rows[books.room_wanted[rows]].tolist():
            stream = books.streams[r]
            if self._pending_samples(stream) <= self._max_pending:
                books.room_wanted[r] = False
                stream.audio_room.set()
