"""The scheduler's array books (server.scheduling.slot_books): batch choice, rows' life, and a stream's
transcript whatever batch it rode in (the scheduler on the hash-chain fake engine)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.scheduling.scheduler import Scheduler, SchedulerConfig
from server.scheduling.slot_books import SlotBooks, SlotStream
from server.scheduling.stream_events import ChunkResult
from server.scheduling.stream_state import StreamStatus
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine, fake_geometry


def books_with(n: int) -> tuple[SlotBooks, list[SlotStream]]:
    books = SlotBooks(fake_geometry(160), n)
    streams = [SlotStream(books, stream_id=f"s{i}", slot=i, label="", opened_at=0.0) for i in range(n)]
    return books, streams


def test_choose_takes_the_oldest_rows_first_whatever_their_slot():
    books, _ = books_with(10)
    for t, slot in enumerate([7, 2, 9, 0, 5]):
        books.queue(slot, now=float(t))
    assert books.ready_count == 5
    assert books.choose(3).tolist() == [7, 2, 9]
    assert books.choose(3).tolist() == [0, 5]
    assert books.choose(3).tolist() == []
    assert books.ready_count == 0


def test_choose_respects_the_limit_and_never_takes_a_row_twice():
    books, _ = books_with(1024)
    order = np.random.default_rng(3).permutation(1024)
    books.queue_rows(order[:600], now=1.0)
    for slot in order[600:].tolist():
        books.queue(slot, now=2.0)
    taken: list[int] = []
    while books.ready_count:
        rows = books.choose(256)
        assert 0 < rows.size <= 256
        assert books.in_flight[rows].all() and not books.queued[rows].any()
        taken += rows.tolist()
    assert taken == order.tolist()  # oldest first across every batch, each row once
    assert len(set(taken)) == 1024
    assert books.choose(256).size == 0


def test_a_failed_stream_leaves_the_ready_set():
    books, streams = books_with(4)
    books.queue(1, 0.0)
    books.queue(2, 0.1)
    streams[1].set_status(StreamStatus.FAILED)
    assert not books.live[1] and books.ready_count == 1
    assert books.choose(4).tolist() == [2]


def test_a_freed_slot_row_is_cleared_and_the_stream_keeps_its_numbers():
    books, streams = books_with(4)
    s = streams[2]
    s.received, s.next_chunk, s.new_utterance_next, s.final_due_after = 12345, 3, True, 5
    books.queue(2, 1.0)
    s.set_status(StreamStatus.FLUSHING)
    assert books.flushing[2] and books.received[2] == 12345 and books.next_chunk[2] == 3
    assert books.due[2] == fake_geometry(160).samples_needed(3)
    s.set_status(StreamStatus.CANCELLED)
    books.free(2)
    assert books.streams[2] is None
    assert (books.received[2], books.next_chunk[2], books.final_due[2]) == (0, 0, -1)
    assert not (books.live[2] or books.flushing[2] or books.queued[2] or books.in_flight[2] or books.new_utterance[2])
    assert books.ready_count == 0
    # The slot serves a new stream; the old one still reads its own values.
    new = SlotStream(books, stream_id="next", slot=2, label="", opened_at=0.0)
    new.received = 99
    assert (s.received, s.next_chunk, s.new_utterance_next, s.final_due_after) == (12345, 3, True, 5)
    assert new.received == 99 and new.next_chunk == 0 and new.final_due_after is None


def test_a_booked_slot_cannot_be_booked_twice():
    books, _ = books_with(2)
    with pytest.raises(RuntimeError, match="booked"):
        SlotStream(books, stream_id="dup", slot=1, label="", opened_at=0.0)


def test_rows_past_the_initial_size_grow_the_books():
    books = SlotBooks(fake_geometry(160), 2)
    s = SlotStream(books, stream_id="far", slot=40, label="", opened_at=0.0)
    s.received = 7
    assert books.size > 40 and books.received[40] == 7 and books.streams[40] is s


def test_advance_and_runnable_after_step():
    books, streams = books_with(3)
    g = fake_geometry(160)
    rows = np.array([0, 1, 2])
    books.in_flight[rows] = True
    streams[0].received = g.samples_needed(1)       # its next chunk (1) complete
    streams[1].received = g.samples_needed(1) - 1   # one sample short
    streams[2].received = g.samples_needed(5)
    streams[2].set_status(StreamStatus.FLUSHING)    # flushing rows take the per-stream way
    books.advance(rows)
    books.in_flight[rows] = False
    assert books.next_chunk.tolist() == [1, 1, 1]
    assert books.runnable_after_step(rows).tolist() == [0]


# -- through the scheduler ------------------------------------------------------------------------
def audio(seed: int, n: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


async def run_streams(max_batch: int, clips: list[np.ndarray], piece: int) -> tuple[list[str], list[int]]:
    engine = FakeEngine(capacity=len(clips), max_batch=max_batch)
    sched = Scheduler(engine, SchedulerConfig(batch_wait_s=0.001))
    await sched.start()
    await sched.warmup()
    handles = [sched.open_stream() for _ in clips]

    async def one(handle, clip: np.ndarray, offset: int) -> str:
        await asyncio.sleep(0.0005 * offset)  # streams start at different times: batches mix
        for at in range(0, clip.size, piece):
            await handle.push_audio(clip[at:at + piece])
            await asyncio.sleep(0)
        handle.end_audio()
        events = [e async for e in handle]
        assert all(isinstance(e, ChunkResult) for e in events), events[-1]
        assert [e.chunk_index for e in events[:-1]] == list(range(len(events) - 1))
        handle.close()
        return events[-1].transcript

    try:
        texts = await asyncio.gather(*(one(h, c, i % 7) for i, (h, c) in enumerate(zip(handles, clips))))
    finally:
        await sched.stop()
    assert engine.violations == [] and engine.slots_in_use() == 0
    assert sched._books.ready_count == 0 and not sched._books.in_flight.any()
    return list(texts), engine.batch_sizes[1:]


@pytest.mark.asyncio
async def test_a_streams_transcript_is_the_same_whatever_batch_it_rode_in():
    clips = [audio(i, 16000 + 997 * i) for i in range(40)]
    expected = [transcribe_alone(FakeEngine(capacity=1, max_batch=1), c) for c in clips]
    assert all(expected)  # the fake engine's hash chain gives every clip text
    seen_batches = set()
    for max_batch, piece in ((1, 2560), (5, 700), (16, 5000), (64, 2560)):
        texts, batches = await run_streams(max_batch, clips, piece)
        assert texts == expected, f"max_batch {max_batch}, pieces of {piece}"
        assert max(batches) <= max_batch
        seen_batches.update(batches)
    assert len(seen_batches) > 4  # the streams did ride in batches of many sizes
