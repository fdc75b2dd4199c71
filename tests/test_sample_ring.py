"""engines.sample_ring: each slot's audio in a ring, the scheduler's spans of it, and the engine
worker reading the same ring (the steps name spans; no audio crosses the link). Transcripts are
the fake engine's hash chains, so a sample lost, repeated or taken from another stream's row
changes them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engines.api import RowSamples
from engines.config import EngineConfig
from engines.sample_ring import RingSamples, SampleRing, ring_width
from server.runtime import wire as w
from server.runtime.engine_worker import ChildOptions, EngineWorker
from server.scheduling.scheduler import Scheduler, SchedulerConfig
from server.scheduling.stream_events import ChunkResult
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine


def test_writes_and_reads_wrap_around_the_row():
    ring = SampleRing.local(3, 10)
    x = np.arange(40, dtype=np.float32)
    ring.write(1, 0, x[:7])
    ring.write(1, 7, x[7:15])   # wraps: columns 7..9 then 0..4
    assert ring.read(1, 5, 15).tolist() == x[5:15].tolist()
    assert ring.read(1, 8, 12).tolist() == x[8:12].tolist()  # a wrapping span, copied
    assert np.shares_memory(ring.read(1, 5, 9), ring.array)  # one that does not: a view
    assert not ring.array[0].any() and not ring.array[2].any()  # no other row touched
    with pytest.raises(ValueError, match="do not fit"):
        ring.write(1, 15, x[:11])
    gathered = ring.gather(np.array([1, 1, 1]), np.array([5, 9, 12]), np.array([9, 12, 12]))
    assert isinstance(gathered, RowSamples)
    assert gathered.offsets.tolist() == [0, 4, 7, 7] and gathered.flat.tolist() == x[5:12].tolist()


def test_ring_samples_read_as_row_samples_and_gather_only_when_asked():
    ring = SampleRing.local(4, 8)
    ring.write(0, 0, np.arange(8, dtype=np.float32))
    ring.write(3, 20, np.arange(100, 106, dtype=np.float32))  # columns 4..7, then 0..1
    rows = RingSamples(ring, np.array([3, 0]), np.array([22, 2]), np.array([26, 6]))
    assert rows.lengths.tolist() == [4, 4] and len(rows) == 2
    assert [r.tolist() for r in rows] == [[102, 103, 104, 105], [2, 3, 4, 5]]
    assert rows[-1].tolist() == [2, 3, 4, 5]
    assert not rows._gathered  # rows read one by one: no gathered copy
    assert rows.stack(np.array([0, 1]), 4).tolist() == [[102, 103, 104, 105], [2, 3, 4, 5]]
    assert rows.take(np.array([1])).flat.tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="longer than the ring"):
        RingSamples(ring, np.array([0]), np.array([0]), np.array([9]))
    with pytest.raises(ValueError, match="each end at or after its start"):
        RingSamples(ring, np.array([0]), np.array([5]), np.array([4]))


def test_ring_rows_are_written_straight_into_a_batch_without_a_gathered_copy():
    """stack_into: each row's span copied from the ring into the windows' audio columns (wrapping
    spans included), equal to the gathered rows, and no gathered copy made; a row of another
    length is refused, not padded."""
    rng = np.random.default_rng(1)
    ring = SampleRing.local(5, 16)
    data = {slot: rng.standard_normal(64).astype(np.float32) for slot in range(5)}
    starts = np.array([3, 10, 14, 0, 7])  # slot 2's span wraps (14 + 6 > 16); slot 1's ends at its row's end
    for slot, a in enumerate(starts.tolist()):
        ring.write(slot, a, data[slot][a:a + 6])
    rows = RingSamples(ring, np.array([4, 2, 0, 3, 1]), starts[[4, 2, 0, 3, 1]], starts[[4, 2, 0, 3, 1]] + 6)
    out = np.full((5, 9), -1.0, dtype=np.float32)
    rows.stack_into(out[:, 3:])
    expected = np.stack([data[s][a:a + 6] for s, a in zip([4, 2, 0, 3, 1], starts[[4, 2, 0, 3, 1]].tolist())])
    assert np.array_equal(out[:, 3:], expected) and (out[:, :3] == -1).all()
    assert not rows._gathered and rows.typed
    some = np.zeros((2, 6), dtype=np.float32)
    rows.stack_into(some, np.array([3, 1]))
    assert np.array_equal(some, expected[[3, 1]])
    assert np.array_equal(rows.stack(np.arange(5), 6), expected)  # the gathered path agrees
    with pytest.raises(ValueError, match="holds 6 samples, not 5"):
        rows.stack_into(np.zeros((5, 5), dtype=np.float32))
    flat = RowSamples(expected.reshape(-1), np.arange(6) * 6)
    again = np.zeros((5, 6), dtype=np.float32)
    flat.stack_into(again)
    assert np.array_equal(again, expected) and flat.typed
    assert not RowSamples(np.zeros(4, dtype=np.float64), np.array([0, 4])).typed


def test_an_engine_prepares_the_same_windows_from_ring_spans_as_from_arrays():
    """The real engine's prepared step (validation, waveform windows) from a ring's spans, as the
    engine worker gets its steps, equals the one from the same audio as arrays, and its steps
    transcribe the same."""
    from engines.api import StepPlan
    from engines.factory import build_engine
    from engines.models import speechlike_audio

    def engine():
        return build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", max_streams=8, max_batch=4))
    a, b = engine(), engine()
    g = a.geometry
    ring = SampleRing.local(8, ring_width(g))
    clips = [speechlike_audio(2.0, seed=40 + i) for i in range(3)]
    slots_a = [a.acquire_slot() for _ in clips]
    slots_b = [b.acquire_slot() for _ in clips]
    assert slots_a == slots_b
    tokens = 0
    for k in range(5):
        spans = [g.chunk_span(k, len(c), False) for c in clips]
        first = np.array([k == 0] * 3)
        no = np.zeros(3, dtype=bool)
        arrays = [c[s:e] for c, (s, e) in zip(clips, spans)]
        starts = np.array([s for s, _ in spans])
        for slot, (s, e), c in zip(slots_b, spans, clips):
            ring.write(slot, s, c[s:e])
        plan_a = StepPlan.from_columns(["x", "y", "z"], np.array(slots_a), arrays, first, no, no)
        plan_b = StepPlan.from_columns(["x", "y", "z"], np.array(slots_b),
                                       RingSamples(ring, np.array(slots_b), starts, np.array([e for _, e in spans])),
                                       first, no, no)
        pa, pb = a.prepare(plan_a), b.prepare(plan_b)
        assert np.array_equal(pa.windows, pb.windows) and np.array_equal(pa.starts, pb.starts)
        ra, rb = a.step(pa), b.step(pb)
        assert [u.tokens for u in ra.updates] == [u.tokens for u in rb.updates]
        tokens += sum(len(u.tokens) for u in ra.updates)
    assert tokens > 0  # the comparison covered decoded text, not only silence


def test_a_shared_ring_is_the_same_memory_in_another_process():
    """What one process writes into a shared ring another reads, both ways (a real child
    process attaches by the ring's path); once closed, no new process can attach."""
    import subprocess
    import sys

    ring = SampleRing.shared(4, 100)
    ring.write(2, 95, np.arange(10, dtype=np.float32))  # wraps
    script = ("import numpy as np, sys; from engines.sample_ring import SampleRing; "
              "r = SampleRing.attach(sys.argv[1], 4, 100); print(r.read(2, 95, 105).tolist()); "
              "r.write(1, 0, np.full(3, 7, np.float32))")
    out = subprocess.run([sys.executable, "-c", script, ring.path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([float(x) for x in range(10)])
    assert ring.read(1, 0, 3).tolist() == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="less than a sample ring"):
        SampleRing.attach(ring.path, 5, 100)
    ring.close()
    with pytest.raises(OSError):
        SampleRing.attach(ring.path, 4, 100)


def _audio(seed: int, n: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


async def _transcribe(sched: Scheduler, audio: np.ndarray, pieces: int) -> tuple[list, int]:
    """One stream pushed in `pieces` messages; its events and the most audio it had in the
    ring at once (received, less what waited for room, less what steps had taken)."""
    handle = sched.open_stream()
    state, books = handle.state, sched._books
    most = 0

    async def feed():
        nonlocal most
        for part in np.array_split(audio, pieces):
            await handle.push_audio(part)
            slot = state.slot
            most = max(most, books.received[slot] - books.spilled[slot] - books.kept(slot))
            await asyncio.sleep(0)
        handle.end_audio()

    events, _ = await asyncio.gather(_collect(handle), feed())
    handle.close()
    return events, most


async def _collect(handle) -> list:
    return [e async for e in handle]


@pytest.mark.asyncio
async def test_audio_beyond_the_ring_waits_for_room_and_is_transcribed_exactly():
    """A client that sends 9 s in one message, against a ring of 2 s: what does not fit waits
    in the stream's queue and goes into the ring as steps free room; the transcript is the one
    the engine gives alone, as for the same audio in 40 small messages."""
    engine = FakeEngine(capacity=4, max_batch=4)
    width = ring_width(engine.geometry)
    audio = _audio(7, 9 * engine.geometry.sample_rate + 321)
    assert audio.size > 4 * width
    expected = transcribe_alone(engine, audio)
    sched = Scheduler(engine, SchedulerConfig(batch_wait_s=0.0))
    await sched.start()
    await sched.warmup()
    try:
        assert sched._ring.width == width
        for pieces in (1, 40):
            events, most = await _transcribe(sched, audio, pieces)
            assert all(isinstance(e, ChunkResult) for e in events) and events[-1].is_final
            assert events[-1].transcript == expected and expected
            assert 0 < most <= width  # the ring never held more than it can
        assert engine.violations == [] and engine.slots_in_use() == 0
        assert not sched._books.spilled.any()
    finally:
        await sched.stop()


@pytest.mark.asyncio
async def test_a_worker_reads_the_schedulers_ring_and_no_audio_crosses_the_link():
    """The scheduler over an engine worker writes its streams' audio into the ring the worker
    maps; every step it sends names spans of it (no audio in the message, none copied into the
    step buffers), and the transcripts are the engine's alone."""
    cfg = EngineConfig(model="fake", max_streams=8, max_batch=4, lookahead_ms=160)
    worker = EngineWorker.start("tests.fake_engine:build_fake_engine", cfg,
                                ChildOptions(log_level="WARNING", gc_freeze=False))
    steps: list[w.Step] = []
    send = worker._send

    def spy(message):
        if isinstance(message, w.Step):
            steps.append(message)
        return send(message)

    worker._send = spy
    try:
        assert worker.sample_ring is not None and worker.sample_ring.slots == cfg.max_streams
        sched = Scheduler(worker, SchedulerConfig(batch_wait_s=0.002))
        assert sched._ring is worker.sample_ring
        await sched.start()
        await sched.warmup()
        local = FakeEngine(capacity=8, max_batch=4)
        audios = [_audio(20 + i, int(s * local.geometry.sample_rate)) for i, s in enumerate((1.3, 2.9, 5.2))]
        got = await asyncio.gather(*(_transcribe(sched, a, 7) for a in audios))
        await sched.stop()
        assert [events[-1].transcript for events, _ in got] == [transcribe_alone(local, a) for a in audios]
        assert steps and all(s.spans is not None and s.audio is None and s.offsets == b"" for s in steps)
        assert not any(b.array.any() for b in worker._buffers.values())  # the step buffers stayed unused
    finally:
        worker.close()
