"""Frontend processes write their streams' audio into the engine core's sample ring
(server.runtime.remote_scheduler, engines.sample_ring) and say so once a frame (Written); the
scheduler books those rows as arrays (Scheduler.audio_written). Real gRPC servers on loopback,
an engine host and a frontend over a real Unix socket, the fake engine's hash-chain transcripts
(a sample lost, repeated or taken from another stream's row changes them)."""

from __future__ import annotations

import asyncio
import collections

import numpy as np
import pytest

from engines.sample_ring import SampleRing
from server.runtime import wire as w
from server.runtime.engine_host import EngineHost, _Frontend
from server.scheduling.scheduler import Scheduler, SchedulerConfig
from server.scheduling.stream_events import ChunkResult, ErrorKind, StreamFailure
from server.scheduling.written_intake import WrittenIntake
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.server_harness import (FAKE, RATE, as_float, audio, config, final_transcript, make_engine, pcm16_audio,
                                  request_stream, running_frontend_pair, stub_for)

pytestmark = pytest.mark.asyncio


def count_kinds(server) -> collections.Counter:
    """The message types the engine host reads from the frontend (wraps its dispatch)."""
    host, kinds = server.engine_host, collections.Counter()
    dispatch = host._dispatch

    def counting(frontend, message):
        kinds[type(message)] += 1
        dispatch(frontend, message)

    host._dispatch = counting
    return kinds


async def transcribe(stub, clip: np.ndarray, packet_samples: int) -> list:
    data = clip.tobytes()
    size = 2 * packet_samples
    requests = [config(interim_results=True), *(audio(data[p:p + size]) for p in range(0, len(data), size))]
    return [r async for r in stub.StreamingRecognize(request_stream(requests))]


async def test_streams_audio_goes_through_the_ring_not_in_messages():
    """Three streams at once in 20 ms packets: every sample reaches the engine through the
    ring (Written, no Audio message), the transcripts are the engine's alone, and every slot
    comes back."""
    engine = make_engine(FAKE, capacity=8)
    clips = [pcm16_audio(30 + i, int(s * RATE)) for i, s in enumerate((1.2, 2.5, 4.1))]
    async with running_frontend_pair(engine) as server, stub_for(server) as stub:
        kinds = count_kinds(server)
        got = await asyncio.gather(*(transcribe(stub, c, RATE // 50) for c in clips))
        assert server.engine_host.facts().rings  # offered to the frontend, and mapped by it
    for clip, responses in zip(clips, got):
        assert final_transcript(responses) == transcribe_alone(engine, as_float(clip)) != ""
    assert kinds[w.Open] == 3 and kinds[w.Written] > 0 and kinds[w.Audio] == 0
    assert kinds[w.Written] * 4 <= sum(c.size for c in clips) // (RATE // 50)  # not one per 20 ms packet
    assert engine.slots_in_use() == 0


async def test_a_client_far_ahead_of_real_time_waits_for_ring_room_in_the_frontend():
    """9 s of audio in messages of 3 s, against a ring of 2 s a slot: the frontend writes what
    the ring has room for and the rest as the engine consumes; no write ever passes the room
    (the engine would fail the stream), and the transcript is exact."""
    engine = make_engine(FAKE, capacity=4)
    clip = pcm16_audio(41, 9 * RATE + 777)
    async with running_frontend_pair(engine) as server, stub_for(server) as stub:
        width = server.engine_host._cores[0].sample_ring.width
        assert 3 * RATE > width
        responses = await transcribe(stub, clip, 3 * RATE)
    assert final_transcript(responses) == transcribe_alone(engine, as_float(clip)) != ""
    assert engine.slots_in_use() == 0


async def test_a_frontend_that_cannot_map_the_ring_sends_its_audio_in_messages(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no such file (test)")

    monkeypatch.setattr(SampleRing, "attach", refuse)
    engine = make_engine(FAKE, capacity=4)
    clip = pcm16_audio(42, int(2.7 * RATE))
    async with running_frontend_pair(engine) as server, stub_for(server) as stub:
        kinds = count_kinds(server)
        responses = await transcribe(stub, clip, RATE // 50)
    assert final_transcript(responses) == transcribe_alone(engine, as_float(clip)) != ""
    assert kinds[w.Audio] > 0 and kinds[w.Written] == 0
    assert engine.slots_in_use() == 0


async def test_a_slot_a_frontend_writes_goes_back_only_once_it_stops_writing():
    """A failed stream's ring row could still take a late write from its frontend: its slot
    stays out of the pool until the frontend says it writes no more (Stopped, End, Fail or
    Close), then comes back at once."""
    engine = FakeEngine(capacity=2, max_batch=2)
    sched = Scheduler(engine, SchedulerConfig())
    await sched.start()
    await sched.warmup()
    try:
        handle = sched.open_stream()
        state = handle.state
        state.writer_attached = True
        sched.fail_stream(state, ErrorKind.INTERNAL, "failed by the test")
        assert engine.slots_in_use() == 1 and not state.slot_released
        sched.writer_detached(state)
        assert engine.slots_in_use() == 0 and state.slot_released
    finally:
        await sched.stop()


async def test_written_rows_are_booked_as_arrays_and_the_odd_ones_fail_alone():
    """audio_written: rows grow and become runnable together; a row written past the ring's
    room fails with INTERNAL, one past the duration limit is cut there and ends with its final,
    and the others go on to exact transcripts."""
    engine = FakeEngine(capacity=4, max_batch=4)
    sched = Scheduler(engine, SchedulerConfig(batch_wait_s=0.0, max_stream_seconds=1.0))
    await sched.start()
    await sched.warmup()
    try:
        ring, g = sched.sample_ring, engine.geometry
        handles = [sched.open_stream() for _ in range(3)]
        slots = np.array([h.state.slot for h in handles])
        clip = (np.random.default_rng(5).standard_normal(RATE + 400) * 0.1).astype(np.float32)
        first = g.samples_needed(1)
        for slot in slots.tolist():
            ring.write(slot, 0, clip[:first])
        # Stream 0 writes within room; stream 1 claims more than the ring holds; stream 2 writes
        # past the limit of 1 s at once.
        ring.write(int(slots[2]), first, clip[first:])
        sched.audio_written(slots, np.array([first, ring.width + 1, clip.size]))
        assert handles[0].state.received == 0  # kept until the scheduler's next decision
        sched.book_written()
        assert handles[2].state.end_reason and "1 s of audio" in handles[2].state.end_reason  # cut at once
        assert isinstance(handles[1].state.events[-1], StreamFailure)
        assert handles[1].state.events[-1].kind is ErrorKind.INTERNAL
        assert handles[0].state.received == first and handles[2].state.received == RATE
        handles[0].end_audio()
        events = [[e async for e in h] for h in (handles[0], handles[2])]
        assert events[0][-1].transcript == transcribe_alone(engine, clip[:first]) != ""
        assert events[1][-1].is_final and events[1][-1].transcript == transcribe_alone(engine, clip[:RATE]) != ""
        assert all(isinstance(e, ChunkResult) for e in events[0] + events[1])
        for h in handles:
            h.close()
        assert engine.slots_in_use() == 0
    finally:
        await sched.stop()


async def test_a_written_message_naming_rows_the_frontend_does_not_write_is_a_wire_error(tmp_path):
    engine = FakeEngine(capacity=4, max_batch=4)
    host = EngineHost(engine, SchedulerConfig(), str(tmp_path / "engine.sock"))
    frontend = _Frontend("f1", out=None, index=1)
    host._writers[0][2] = 1  # this frontend writes row 2, and only it
    host._writers[0][3] = 2  # another frontend's row
    with pytest.raises(w.WireError, match="does not write"):
        host._written(frontend, w.Written(0, w.as_column([2, 3], w.I64), w.as_column([10, 10], w.I64)))
    with pytest.raises(w.WireError, match="does not write"):
        host._written(frontend, w.Written(0, w.as_column([99], w.I64), w.as_column([10], w.I64)))
    with pytest.raises(w.WireError, match="engine core 1 of 1"):
        host._written(frontend, w.Written(1, w.as_column([2], w.I64), w.as_column([10], w.I64)))
    with pytest.raises(w.WireError, match="column totals"):
        host._written(frontend, w.Written(0, w.as_column([2], w.I64), w.as_column([10, 11], w.I64)))


async def test_the_intake_gives_each_entry_the_count_before_it_and_marks_each_slots_last():
    """Frames kept between two decisions: a slot written in several frames moves step by step
    (each entry's count before is the previous entry's), and only its final entry sets the
    books' count; a single frame is taken as it is."""
    intake = WrittenIntake()
    received = np.array([0, 100, 200, 300])
    intake.add(np.array([1, 2]), np.array([110, 210]), 1.0)
    intake.add(np.array([2, 3]), np.array([220, 310]), 2.0)
    intake.add(np.array([2]), np.array([230]), 3.0)
    assert intake.rows == 5 and intake
    rows = intake.take(received)
    assert not intake and intake.rows == 0
    assert rows.slots.tolist() == [1, 2, 2, 3, 2]
    assert rows.before.tolist() == [100, 200, 210, 300, 220]
    assert rows.times.tolist() == [1.0, 1.0, 2.0, 2.0, 3.0]
    assert rows.last.tolist() == [True, False, False, True, True]
    assert rows.without(np.array([2])).slots.tolist() == [1, 3]
    intake.add(np.array([3, 0]), np.array([320, 5]), 4.0)
    one = intake.take(received)
    assert one.before.tolist() == [300, 0] and one.last.all() and one.times.tolist() == [4.0, 4.0]
