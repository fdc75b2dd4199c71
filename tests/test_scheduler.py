"""Scheduler tests against the deterministic fake engine (no gRPC, no timing assertions)."""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
import pytest

from engines.api import EngineError, StepResult
from server.scheduling.scheduler import Scheduler, SchedulerConfig, SchedulerObserver
from server.scheduling.stream_events import ChunkResult, ErrorKind, StreamError, StreamFailure
from tests import waiting
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio


def make_audio(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 0.1).astype(np.float32)


async def started(engine: FakeEngine, **config) -> Scheduler:
    sched = Scheduler(engine, SchedulerConfig(**config))
    await sched.start()
    await sched.warmup()
    return sched


async def feed(handle, samples: np.ndarray, seed: int, end: bool = True) -> None:
    """Push in random-size pieces, yielding to the loop between them like a network would."""
    rng = np.random.default_rng(seed)
    pos = 0
    while pos < samples.size:
        n = int(rng.integers(1, 4000))
        await handle.push_audio(samples[pos:pos + n])
        pos += n
        await asyncio.sleep(0)
    if end:
        handle.end_audio()


async def collect(handle) -> list:
    return [event async for event in handle]


async def run_one(sched: Scheduler, samples: np.ndarray, seed: int) -> list:
    handle = sched.open_stream(label=f"s{seed}")
    try:
        events, _ = await asyncio.gather(collect(handle), feed(handle, samples, seed))
        return events
    finally:
        handle.close()


async def wait_for(predicate, what: str, timeout_s: float = 20.0) -> None:
    """tests.waiting.wait_for, bounding a broken run at 20 s: no server here, only the scheduler."""
    await waiting.wait_for(predicate, what, timeout_s)


async def test_single_stream_matches_engine_alone():
    engine = FakeEngine(capacity=4, max_batch=4)
    audio = make_audio(1, 16000 * 2 + 123)
    expected = transcribe_alone(engine, audio)
    sched = await started(engine)
    events = await run_one(sched, audio, seed=1)
    await sched.stop()
    assert all(isinstance(e, ChunkResult) for e in events)
    assert [e.chunk_index for e in events] == list(range(len(events)))
    assert events[-1].is_final and not any(e.is_final for e in events[:-1])
    assert events[-1].transcript == expected
    assert engine.violations == []
    assert engine.slots_in_use() == 0


async def test_many_concurrent_streams_are_exact_and_batched():
    engine = FakeEngine(capacity=32, max_batch=8, step_delay_s=0.001)
    audios = [make_audio(i, int(np.random.default_rng(100 + i).integers(1, 16000 * 3))) for i in range(24)]
    expected = [transcribe_alone(engine, a) for a in audios]
    sched = await started(engine)
    results = await asyncio.gather(*(run_one(sched, a, seed=i) for i, a in enumerate(audios)))
    await sched.stop()
    for i, events in enumerate(results):
        assert events[-1].is_final, i
        assert events[-1].transcript == expected[i], i
    assert engine.violations == []
    assert len(engine.step_threads) == 2  # transcribe_alone's (the test thread) and the engine thread
    assert max(engine.batch_sizes) <= 8 and max(engine.batch_sizes) > 1
    assert engine.slots_in_use() == 0 and sched.active_streams == 0


async def test_token_heavy_streams_are_exact():
    """Six tokens a chunk, as a random-weight model emits (bench/relay_bench.py --tokens-per-chunk):
    every chunk's text reaches its stream, in order, whatever the batch."""
    engine = FakeEngine(capacity=16, max_batch=8, step_delay_s=0.001, tokens_per_chunk=6)
    audios = [make_audio(50 + i, 16000 + 997 * i) for i in range(12)]
    expected = [transcribe_alone(engine, a) for a in audios]
    sched = await started(engine)
    results = await asyncio.gather(*(run_one(sched, a, seed=i) for i, a in enumerate(audios)))
    await sched.stop()
    for i, events in enumerate(results):
        assert events[-1].transcript == expected[i], i
        # Each chunk's new text is its six pieces (a piece may be a word start, hence >= 6 chars).
        assert all(len(e.new_text) >= 6 for e in events[:-1]), i
    assert engine.violations == [] and engine.slots_in_use() == 0
    with pytest.raises(ValueError, match="0-15"):  # a token id is one byte of the chunk's digest
        FakeEngine(tokens_per_chunk=16)


async def test_empty_audio_gets_empty_final_without_step():
    engine = FakeEngine()
    sched = await started(engine)
    handle = sched.open_stream()
    handle.end_audio()
    events = await collect(handle)
    handle.close()
    await sched.stop()
    assert len(events) == 1 and events[0].is_final and events[0].transcript == ""
    assert events[0].chunk_index == -1
    assert engine.steps_started == 1  # the warm-up's only


async def test_stream_ending_on_a_chunk_boundary_gets_final_without_extra_step():
    # The last chunk ran mid-stream (the end of audio was not known yet), and once the end
    # arrives no frame is left: the scheduler finalizes the stream itself.
    engine = FakeEngine()
    g = engine.geometry
    audio = make_audio(4, g.samples_needed(1))
    assert g.chunk_span(2, audio.size, True) is None and g.finished(2, audio.size, True)
    expected = transcribe_alone(engine, audio)
    sched = await started(engine)
    handle = sched.open_stream()
    await handle.push_audio(audio)
    first = await handle.next_event()
    second = await handle.next_event()
    steps = engine.steps_started
    handle.end_audio()
    final = await handle.next_event()
    assert await handle.next_event() is None
    handle.close()
    await sched.stop()
    assert (first.chunk_index, second.chunk_index, final.chunk_index) == (0, 1, 1)
    assert not second.is_final and final.is_final and final.transcript == expected
    assert engine.steps_started == steps


async def test_audio_shorter_than_one_frame_gets_final_without_step():
    engine = FakeEngine()
    g = engine.geometry
    n = g.n_fft - 2 * g.stft_left_pad + g.hop - 1  # the most samples that still make no frame
    assert g.n_frames(n) == 0 and g.n_frames(n + 1) == 1
    sched = await started(engine)
    events = await run_one(sched, make_audio(5, n), seed=5)
    await sched.stop()
    assert len(events) == 1 and events[0].is_final and events[0].chunk_index == -1
    assert engine.steps_started == 1  # the warm-up's only


async def test_admission_limit_and_release():
    engine = FakeEngine(capacity=2)
    sched = await started(engine)
    a, b = sched.open_stream(), sched.open_stream()
    with pytest.raises(StreamError) as err:
        sched.open_stream()
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "2 stream slots" in err.value.message
    a.close()
    c = sched.open_stream()
    b.close(), c.close()
    await sched.stop()
    assert engine.slots_in_use() == 0


async def test_cancel_during_step_frees_slot_when_step_returns():
    engine = FakeEngine(capacity=2)
    sched = await started(engine, batch_wait_s=0)
    handle = sched.open_stream()
    engine.gate.clear()  # hold the engine inside the step
    await handle.push_audio(make_audio(5, engine.geometry.samples_needed(0)))
    await wait_for(lambda: engine.steps_started == 2, "the step to start (after the warm-up)")
    handle.close()
    assert sched.active_streams == 0
    assert engine.slots_in_use() == 1  # the running step still owns it
    engine.gate.set()
    await wait_for(lambda: engine.slots_in_use() == 0, "the slot to be released")
    await sched.stop()
    assert engine.violations == []


async def test_bad_chunk_fails_only_its_stream():
    engine = FakeEngine(capacity=4)
    sched = await started(engine, batch_wait_s=0.05)
    good_audio = make_audio(6, 20000)
    expected = transcribe_alone(engine, good_audio)
    bad_audio = make_audio(7, 20000)
    bad_audio[100] = np.nan
    good, bad = await asyncio.gather(run_one(sched, good_audio, 6), run_one(sched, bad_audio, 7))
    await sched.stop()
    assert good[-1].is_final and good[-1].transcript == expected
    assert isinstance(bad[-1], StreamFailure) and bad[-1].kind is ErrorKind.INVALID_ARGUMENT
    assert "rejected" in bad[-1].message
    assert engine.slots_in_use() == 0


async def test_step_failure_fails_its_streams_then_engine_dead_after_repeats():
    engine = FakeEngine(capacity=4)
    dead = []

    class Obs(SchedulerObserver):
        def engine_dead(self, reason):
            dead.append(reason)

    sched = Scheduler(engine, SchedulerConfig(dead_after_failures=2), Obs())
    await sched.start()
    await sched.warmup()
    retried = make_audio(7, 8000)
    expected = transcribe_alone(engine, retried)
    engine.fail_next_steps = 1  # a transient fault: the retry succeeds
    events = await run_one(sched, retried, 7)
    assert events[-1].is_final and events[-1].transcript == expected
    engine.fail_next_steps = 2  # the attempt and its retry fail: the stream fails
    events = await run_one(sched, make_audio(8, 8000), 8)
    assert isinstance(events[-1], StreamFailure) and events[-1].kind is ErrorKind.INTERNAL
    assert "injected step failure" in events[-1].message
    ok = await run_one(sched, make_audio(9, 8000), 9)  # the server goes on
    assert ok[-1].is_final
    engine.fail_next_steps = 4
    await run_one(sched, make_audio(10, 8000), 10)
    await run_one(sched, make_audio(11, 8000), 11)
    assert dead and sched.dead_reason
    with pytest.raises(StreamError) as err:
        sched.open_stream()
    assert err.value.kind is ErrorKind.UNAVAILABLE
    await sched.stop()
    assert engine.slots_in_use() == 0


async def test_result_count_mismatch_fails_the_step_streams():
    class DroppingEngine(FakeEngine):
        def step(self, plan):
            result = super().step(plan)
            return StepResult(result.updates[:-1], result.engine, result.timings)

    engine = DroppingEngine(capacity=2)
    sched = await started(engine)
    events = await run_one(sched, make_audio(12, 8000), 12)
    await sched.stop()
    assert isinstance(events[-1], StreamFailure) and events[-1].kind is ErrorKind.INTERNAL
    assert "updates for a plan" in events[-1].message
    assert engine.slots_in_use() == 0


async def test_response_buffer_bounds_a_slow_reader():
    engine = FakeEngine()
    sched = await started(engine, response_buffer=2, batch_wait_s=0)
    audio = make_audio(13, engine.geometry.chunk_samples * 10)
    expected = transcribe_alone(engine, audio)
    handle = sched.open_stream()
    await handle.push_audio(audio)
    handle.end_audio()
    await wait_for(lambda: len(handle.state.events) == 2 and not handle.state.in_flight, "two buffered results")
    await asyncio.sleep(0.05)  # give a buggy scheduler the chance to overfill
    assert len(handle.state.events) == 2
    events = await collect(handle)
    handle.close()
    await sched.stop()
    assert events[-1].is_final and events[-1].transcript == expected


async def test_max_stream_duration_ends_the_stream_with_a_final_of_the_first_seconds():
    engine = FakeEngine()
    first, second = make_audio(14, 12000), make_audio(15, 12000)
    expected = transcribe_alone(engine, np.concatenate([first, second])[:16000])
    sched = await started(engine, max_stream_seconds=1.0)
    handle = sched.open_stream()
    handle.state.time_limit.cancel()  # the audio limit under test, not the same limit in wall time
    assert await handle.push_audio(first)
    assert not await handle.push_audio(second)  # takes 4000 samples, then no more
    assert not await handle.push_audio(make_audio(16, 100))
    events = await collect(handle)
    handle.close()
    await sched.stop()
    assert events[-1].is_final and events[-1].transcript == expected
    assert handle.state.received == 16000 and "maximum duration of 1 s of audio" in handle.state.end_reason
    assert engine.slots_in_use() == 0


async def test_max_stream_duration_in_wall_time_ends_a_stream_that_never_ends():
    engine = FakeEngine()
    audio = make_audio(17, 3000)  # less than the 0.2 s of audio the limit allows
    expected = transcribe_alone(engine, audio)
    sched = await started(engine, max_stream_seconds=0.2)
    handle = sched.open_stream()
    assert await handle.push_audio(audio)  # then the client neither sends nor half-closes
    events = await collect(handle)
    handle.close()
    await sched.stop()
    assert events[-1].is_final and events[-1].transcript == expected
    assert "maximum duration of 0.2 s since it opened" in handle.state.end_reason


async def test_max_stream_duration_fails_a_whole_file_with_out_of_range():
    engine = FakeEngine()
    sched = await started(engine, max_stream_seconds=1.0)
    handle = sched.open_stream(finalize_at_limit=False)
    handle.state.time_limit.cancel()  # the audio limit under test, not the same limit in wall time
    assert await handle.push_audio(make_audio(14, 12000))
    assert not await handle.push_audio(make_audio(15, 12000))
    events = await collect(handle)
    handle.close()
    await sched.stop()
    assert isinstance(events[-1], StreamFailure) and events[-1].kind is ErrorKind.OUT_OF_RANGE
    assert "maximum duration of 1 s" in events[-1].message
    assert engine.slots_in_use() == 0


async def test_drain_refuses_new_streams_and_waits_for_open_ones():
    engine = FakeEngine()
    sched = await started(engine)
    handle = sched.open_stream()
    sched.begin_drain()
    with pytest.raises(StreamError) as err:
        sched.open_stream()
    assert err.value.kind is ErrorKind.UNAVAILABLE
    waiter = asyncio.create_task(sched.wait_idle(30))
    events, _ = await asyncio.gather(collect(handle), feed(handle, make_audio(16, 9000), 16))
    assert events[-1].is_final
    assert not waiter.done()
    handle.close()
    assert await waiter
    await sched.stop()


async def test_warmup_proves_execution():
    engine = FakeEngine()
    sched = await started(engine)
    assert await sched.warmup() == "fake"
    assert sched.executions["fake"] >= 1

    class LyingEngine(FakeEngine):
        def warmup(self):
            return "tensorrt"  # claims an engine that never ran

    liar = Scheduler(LyingEngine())
    await liar.start()
    with pytest.raises(EngineError, match="counter did not move"):
        await liar.warmup()
    await sched.stop()
    await liar.stop()


async def test_stop_fails_open_streams():
    engine = FakeEngine()
    sched = await started(engine)
    handle = sched.open_stream()
    await handle.push_audio(make_audio(17, 100))
    await sched.stop()
    events = await collect(handle)
    handle.close()
    assert isinstance(events[-1], StreamFailure) and events[-1].kind is ErrorKind.UNAVAILABLE
    assert engine.slots_in_use() == 0


async def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(pipeline_depth=0)
    with pytest.raises(ValueError):
        SchedulerConfig(batch_wait_s=-1)


class _WorkerLikeEngine(FakeEngine):
    """The fake engine behind `step_async`, as the engine worker offers it: steps run one at a
    time on one thread; `submitted` counts the steps the scheduler has handed over."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._thread = concurrent.futures.ThreadPoolExecutor(1)
        self.submitted: list[int] = []  # rows of each step handed over

    async def step_async(self, plan):
        self.submitted.append(len(plan.chunks))
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.step, plan)


@pytest.mark.parametrize("overlap_at", [0.5, 1.0])
async def test_a_partial_batch_goes_behind_a_running_step_only_with_overlap(overlap_at):
    """With an engine in another process, the next step is sent before the running one ends
    (the worker prepares it meanwhile), though its batch is not full; with overlap_at >= 1 only
    a full batch would be. Either way every transcript is the stream's own."""
    engine = _WorkerLikeEngine(capacity=8, max_batch=8)
    audios = [make_audio(40 + i, engine.geometry.samples_needed(2)) for i in range(3)]
    expected = [transcribe_alone(engine, a) for a in audios]
    sched = await started(engine, batch_wait_s=0, overlap_at=overlap_at)
    first = sched.open_stream(label="first")
    engine.gate.clear()  # hold the engine inside the first step
    task = asyncio.gather(collect(first), feed(first, audios[0], 1))
    await wait_for(lambda: len(engine.submitted) == 1, "the first step to be handed over")
    others = [sched.open_stream(label=f"s{i}") for i in (1, 2)]
    tasks = [asyncio.gather(collect(h), feed(h, audios[i], i)) for i, h in zip((1, 2), others)]
    if overlap_at < 1:
        await wait_for(lambda: len(engine.submitted) == 2, "a second step behind the running one")
        assert engine.submitted[1] < engine.max_batch
    else:
        await asyncio.sleep(0.3)
        assert len(engine.submitted) == 1, engine.submitted
    engine.gate.set()
    results = await asyncio.gather(task, *tasks)
    for (events, _), want in zip(results, expected):
        assert events[-1].is_final and events[-1].transcript == want
    await sched.stop()
    for h in [first, *others]:
        h.close()
    assert engine.violations == [] and engine.slots_in_use() == 0


async def test_overlap_config_is_checked():
    with pytest.raises(ValueError):
        SchedulerConfig(overlap_at=-0.1)


@pytest.mark.parametrize("min_arrivals", [1.0, 0.0])
async def test_a_lone_chunk_at_low_load_does_not_wait_for_company(min_arrivals):
    """One stream: its chunk goes to the idle engine at once, though the batching deadline is
    long (0.6 s here); with wait_min_arrivals=0 (always wait) it waits that deadline."""
    engine = FakeEngine(capacity=4, max_batch=4)
    waits: list[float] = []

    class Watch(SchedulerObserver):
        def step_done(self, batch_size, step_seconds, queue_waits, *args, **kwargs):
            waits.extend(queue_waits)

    sched = Scheduler(engine, SchedulerConfig(batch_wait_s=0.6, wait_min_arrivals=min_arrivals), observer=Watch())
    await sched.start()
    await sched.warmup()
    handle = sched.open_stream(label="one")
    await handle.push_audio(make_audio(7, engine.geometry.samples_needed(0)))
    await wait_for(lambda: len(waits) >= 1, "the first step")
    handle.close()
    await sched.stop()
    if min_arrivals:
        assert waits[0] < 0.3, waits
    else:
        assert waits[0] >= 0.55, waits
    assert engine.violations == []


async def test_sample_queue_takes_spans_in_order_whatever_the_message_sizes():  # async: the module's mark
    """SampleQueue: a take from the front message is that message or a view of it; one that
    spans messages joins them; every sample comes out once, in order, as contiguous float32
    (a strided or float64 input is converted on the way in)."""
    from server.scheduling.stream_state import SampleQueue

    rng = np.random.default_rng(3)
    signal = rng.standard_normal(10_000).astype(np.float32)
    queue = SampleQueue()
    cuts = [0, 1000, 1000, 3500, 3600, 7000, 10_000]
    for a, b in zip(cuts, cuts[1:]):
        piece = signal[a:b]
        queue.append(piece.astype(np.float64) if a == 3500 else piece)
    strided = np.repeat(signal[:50], 2)[::2]  # a non-contiguous view
    queue.append(strided)
    assert len(queue) == 10_050
    taken = [queue.take(n) for n in (1000, 2550, 50, 2000, 1400, 2990, 60)]  # some span two messages
    assert len(queue) == 0
    assert all(t.dtype == np.float32 and t.flags.c_contiguous for t in taken)
    assert np.array_equal(np.concatenate(taken), np.concatenate([signal, signal[:50]]))
    with pytest.raises(ValueError):
        queue.take(1)


async def test_once_per_iteration_runs_its_callback_once_for_every_request_before_it():
    from server.scheduling.loop_calls import OncePerIteration

    calls = []
    soon = OncePerIteration(lambda: calls.append(len(calls)))
    for _ in range(3):
        soon.request()
    assert calls == []  # not before the loop's next iteration
    await asyncio.sleep(0)
    assert calls == [0]
    soon.request()
    await asyncio.sleep(0)
    assert calls == [0, 1]  # a request after the run: another run
