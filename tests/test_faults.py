"""A failing batch fails only what it must (docs/RELIABILITY.md lists what each test covers).

Engine level (real builtin:tiny): a step that raises, inside the engine after the encoder ran,
changes no stream's state; out of device memory is translated into EngineOverloadedError; a
failure while committing is StreamStateLostError naming the streams.

Server level (a real server on loopback, fake and real engines behind tests/fault_engine.py):
a stream whose audio makes the engine fail is isolated by retry and bisection and fails alone
with INTERNAL, the others of its batch end with transcripts equal to a fault-free run; out of
memory above a batch size splits the batch, lowers the maximum batch, and loses no stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import numpy as np
import pytest

from engines.api import ChunkWork, EngineError, EngineOverloadedError, StepPlan, StreamStateLostError
from proto import asr_stream_pb2 as pb
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.fault_engine import POISON_MESSAGE, FaultyEngine
from tests.server_harness import (
    RATE, as_float, audio, config, engine_scheduler, final_transcript, pcm16_audio, requests_for, running_server,
    scrape, settle, stub_for,
)
from tests.waiting import wait_for

MARK = 12345  # a poisoned stream's first PCM16 sample


def is_poisoned(chunk: ChunkWork) -> bool:
    return chunk.first and chunk.samples.size > 0 and chunk.samples[0] == np.float32(MARK / 32768.0)


def clip(seed: int, n: int, poisoned: bool = False) -> np.ndarray:
    pcm = pcm16_audio(seed, n)
    pcm[0] = MARK if poisoned else (0 if pcm[0] == MARK else pcm[0])
    return pcm


async def outcome(server, requests) -> tuple[str, str, list]:
    """(status code name, details, responses) through the sync gRPC API (exact statuses)."""
    def call():
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            from proto import asr_stream_pb2_grpc as pb_grpc
            responses = []
            try:
                for r in pb_grpc.SpeechRecognitionStub(channel).StreamingRecognize(iter(requests)):
                    responses.append(r)
            except grpc.RpcError as exc:
                return exc.code().name, exc.details() or "", responses
            return "OK", "", responses

    return await asyncio.get_running_loop().run_in_executor(_CLIENTS, call)


_CLIENTS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="sync-client")


class held_batch:
    """Makes the next step take every stream at once: a blocker stream's step waits on the
    fault engine's gate while the streams under test queue their first chunks."""

    def __init__(self, server, engine: FaultyEngine, n_streams: int):
        self.server, self.engine, self.n = server, engine, n_streams

    async def __aenter__(self):
        g = self.engine.geometry
        data = clip(999, g.samples_needed(0)).tobytes()
        self.resume = asyncio.Event()
        self.engine.gate.clear()
        entered = self.engine.steps_entered

        async def blocker_requests():
            yield config()
            yield audio(data)
            await self.resume.wait()

        self._stub_cm = stub_for(self.server)
        stub = await self._stub_cm.__aenter__()
        self.blocker = asyncio.create_task(_collect(stub.StreamingRecognize(blocker_requests())))
        await wait_for(lambda: self.engine.steps_entered > entered, "the blocker's step to start")
        return self

    async def release_when_queued(self) -> None:
        await wait_for(lambda: engine_scheduler(self.server).ready_streams >= self.n, f"{self.n} streams queued")
        self.engine.gate.set()

    async def __aexit__(self, *exc):
        self.engine.gate.set()
        self.resume.set()
        await _collect_quietly(self.blocker)
        await self._stub_cm.__aexit__(*exc)


async def _collect(call):
    return [r async for r in call]


async def _collect_quietly(task):
    try:
        await task
    except grpc.aio.AioRpcError:
        pass


# -- engine level: the real engine's promise -------------------------------------------------------
def _snapshot(e) -> dict:
    return {"pool": {k: v.clone() for k, v in e.pool.tensors.items()}, "history": e.featurizer.history.copy(),
            "seen": e.featurizer.samples_seen.copy(), "chunks": e.chunks_done.copy(), "frames": e.frames_done.copy(),
            "text": e.text_started.copy(), "finished": e.finished.copy()}


def _assert_same(a: dict, b: dict) -> None:
    import torch

    for name in a["pool"]:
        assert torch.equal(a["pool"][name], b["pool"][name]), f"pool tensor {name} changed"
    for key in ("history", "seen", "chunks", "frames", "text", "finished"):
        assert np.array_equal(a[key], b[key]), f"{key} changed"


def _plan(g, audios, slots, k) -> StepPlan:
    chunks = []
    for i, (a, slot) in enumerate(zip(audios, slots)):
        start, end = g.chunk_span(k, a.size, True)
        chunks.append(ChunkWork(f"s{i}", slot, a[start:end], first=k == 0, audio_ended=end == a.size))
    return StepPlan(tuple(chunks))


def test_a_raising_step_changes_no_state_in_the_real_engine(tiny_engine):
    g = tiny_engine.geometry
    n = g.samples_needed(3)  # four chunks each, all ending together
    audios = [as_float(clip(10 + i, n)) for i in range(3)]
    expected = [transcribe_alone(tiny_engine, a) for a in audios]
    slots = [tiny_engine.acquire_slot() for _ in audios]
    faulty = FaultyEngine(tiny_engine)
    try:
        texts = ["" for _ in audios]
        for k in range(4):
            if k in (1, 3):  # a failure inside the engine, after its encoder ran, then out of memory
                for fault, error in (({"fail_next": 1}, EngineError), ({"oom_above": 1}, EngineOverloadedError)):
                    before = _snapshot(tiny_engine)
                    faulty.fail_next, faulty.oom_above = fault.get("fail_next", 0), fault.get("oom_above")
                    with pytest.raises(error) as err:
                        faulty.step(_plan(g, audios, slots, k))
                    faulty.oom_above = None
                    _assert_same(before, _snapshot(tiny_engine))
                    if error is EngineOverloadedError:
                        assert err.value.batch_size == 3 and "out of device memory" in str(err.value)
                        assert "CUDA out of memory" in str(err.value.__cause__)
            for i, u in enumerate(faulty.step(_plan(g, audios, slots, k)).updates):
                texts[i] += u.text_delta
                assert u.is_final == (k == 3)
        assert texts == expected
        assert faulty.faults() == ["transient", "oom", "transient", "oom"]
    finally:
        faulty.restore()
        for slot in slots:
            tiny_engine.release_slot(slot)


def test_a_failed_commit_names_the_streams_whose_state_is_lost(tiny_engine, monkeypatch):
    g = tiny_engine.geometry
    audios = [as_float(clip(20 + i, g.samples_needed(1))) for i in range(2)]
    slots = [tiny_engine.acquire_slot() for _ in audios]
    try:
        def broken_commit(*args, **kwargs):
            raise RuntimeError("device lost during the copy")

        monkeypatch.setattr(tiny_engine.featurizer, "commit", broken_commit)
        with pytest.raises(StreamStateLostError) as err:
            tiny_engine.step(_plan(g, audios, slots, 0))
        assert err.value.stream_ids == ("s0", "s1") and "device lost" in str(err.value)
    finally:
        monkeypatch.undo()
        for slot in slots:
            tiny_engine.release_slot(slot)


# -- server level ----------------------------------------------------------------------------------
async def _poisoned_batch_run(engine: FaultyEngine, clips: list[np.ndarray], poisoned: int, expected: list[str]):
    async with running_server(engine) as server:
        async with held_batch(server, engine, len(clips)) as held:
            calls = [asyncio.create_task(outcome(server, requests_for(c.tobytes(), seed=i)))
                     for i, c in enumerate(clips)]
            await held.release_when_queued()
            results = await asyncio.gather(*calls)
        await wait_for(lambda: server.scheduler.active_streams == 0 and engine.slots_in_use() == 0, "streams to close")
        await settle(server)
        metrics = scrape(server.metrics_port)
    for i, (code, details, responses) in enumerate(results):
        if i == poisoned:
            assert code == "INTERNAL", (code, details)
            assert POISON_MESSAGE in details and "the other streams of its batch went on" in details
        else:
            assert code == "OK", (i, code, details)
            assert final_transcript(responses) == expected[i]
    # The poisoned stream was in a batch with the others, which were retried, then bisected.
    first_poisoned = next(size for size, fault in engine.attempts if fault == "poison")
    assert first_poisoned == len(clips)
    assert metrics["asr_step_faults_total{kind=retry}"] >= 1 and metrics["asr_step_faults_total{kind=split}"] >= 1
    assert metrics["asr_step_faults_total{kind=isolated}"] == 1
    assert metrics["asr_engine_up"] == 1 and metrics["asr_slots_in_use"] == 0


@pytest.mark.asyncio
async def test_a_poisoned_stream_fails_alone_and_its_batch_goes_on_fake():
    engine = FaultyEngine(FakeEngine(capacity=32, max_batch=16), poison=is_poisoned)
    clips = [clip(30 + i, RATE + 1111 * i, poisoned=i == 5) for i in range(8)]
    reference = FakeEngine()
    expected = [transcribe_alone(reference, as_float(c)) for c in clips]
    await _poisoned_batch_run(engine, clips, 5, expected)
    assert engine.violations == []


@pytest.mark.asyncio
async def test_a_poisoned_stream_fails_alone_and_its_batch_goes_on_real(tiny_engine):
    clips = [clip(40 + i, RATE // 2 + 700 * i, poisoned=i == 1) for i in range(4)]
    expected = [transcribe_alone(tiny_engine, as_float(c)) for c in clips]
    engine = FaultyEngine(tiny_engine, poison=is_poisoned)
    try:
        await _poisoned_batch_run(engine, clips, 1, expected)
    finally:
        engine.restore()


async def _oom_run(engine: FaultyEngine, clips: list[np.ndarray], expected: list[str], limit: int):
    async with running_server(engine) as server, stub_for(server) as stub:
        async with held_batch(server, engine, len(clips)) as held:
            calls = [asyncio.create_task(outcome(server, requests_for(c.tobytes(), seed=i)))
                     for i, c in enumerate(clips)]
            await held.release_when_queued()
            results = await asyncio.gather(*calls)
        models = (await stub.ListModels(pb.ListModelsRequest())).models
        await settle(server)
        metrics = scrape(server.metrics_port)
        await wait_for(lambda: server.scheduler.active_streams == 0 and engine.slots_in_use() == 0, "streams to close")
    for i, (code, details, responses) in enumerate(results):
        assert code == "OK", (i, code, details)
        assert final_transcript(responses) == expected[i]
    lowered = engine_scheduler(server).max_batch
    assert 1 <= lowered <= limit
    assert models[0].max_batch == lowered and metrics["asr_max_batch"] == lowered
    assert metrics["asr_step_faults_total{kind=overloaded}"] >= 1 and metrics["asr_engine_up"] == 1
    # Once lowered, no batch above the new maximum was tried again.
    sizes = [size for size, _ in engine.attempts]
    last_oom = max(i for i, (_, fault) in enumerate(engine.attempts) if fault == "oom")
    assert all(size <= lowered for size in sizes[last_oom + 1:])
    assert sorted({fault for _, fault in engine.attempts}) == ["ok", "oom"]


@pytest.mark.asyncio
async def test_out_of_memory_splits_the_batch_lowers_max_batch_and_loses_no_stream_fake():
    engine = FaultyEngine(FakeEngine(capacity=32, max_batch=16), oom_above=3)
    clips = [clip(50 + i, RATE + 900 * i) for i in range(10)]
    reference = FakeEngine()
    expected = [transcribe_alone(reference, as_float(c)) for c in clips]
    await _oom_run(engine, clips, expected, limit=3)
    assert engine.violations == []


@pytest.mark.asyncio
async def test_out_of_memory_splits_the_batch_lowers_max_batch_and_loses_no_stream_real(tiny_engine):
    clips = [clip(60 + i, RATE // 2 + 500 * i) for i in range(4)]
    expected = [transcribe_alone(tiny_engine, as_float(c)) for c in clips]
    engine = FaultyEngine(tiny_engine, oom_above=2)  # torch.cuda.OutOfMemoryError inside the real step
    try:
        await _oom_run(engine, clips, expected, limit=2)
    finally:
        engine.restore()


@pytest.mark.asyncio
async def test_out_of_memory_with_a_single_chunk_fails_that_stream_only():
    engine = FaultyEngine(FakeEngine(capacity=8, max_batch=8), oom_above=0)
    async with running_server(engine) as server:
        code, details, _ = await outcome(server, requests_for(clip(70, RATE).tobytes()))
        assert code == "INTERNAL" and "ran out of memory on this stream alone" in details
        engine.oom_above = None
        code, _, responses = await outcome(server, requests_for(clip(71, RATE).tobytes()))
        assert code == "OK" and final_transcript(responses) is not None
        assert server.scheduler.dead_reason is None
    assert engine.slots_in_use() == 0


# -- scheduler level: the isolation policy itself ---------------------------------------------------
async def _scheduler_batch(engine: FaultyEngine, clips: list[np.ndarray], **config):
    """Run the clips through a bare scheduler as one batch (the engine gate holds the first
    step until all first chunks are queued); returns each stream's last event."""
    from server.scheduling.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(engine, SchedulerConfig(batch_wait_s=0.001, **config))
    await sched.start()
    await sched.warmup()
    engine.gate.clear()
    handles = [sched.open_stream() for _ in clips]
    for h, c in zip(handles, clips):
        await h.push_audio(as_float(c))
        h.end_audio()
    await wait_for(lambda: engine.steps_entered >= 1, "the first step")
    engine.gate.set()

    async def last_event(h):
        events = [e async for e in h]
        h.close()
        return events[-1]

    results = await asyncio.gather(*(last_event(h) for h in handles))
    await sched.stop()
    return sched, results


@pytest.mark.asyncio
async def test_two_poisoned_streams_in_one_batch_are_both_isolated():
    engine = FaultyEngine(FakeEngine(capacity=16, max_batch=16), poison=is_poisoned)
    clips = [clip(80 + i, RATE // 2 + 300 * i, poisoned=i in (2, 6)) for i in range(8)]
    reference = FakeEngine()
    expected = [transcribe_alone(reference, as_float(c)) for c in clips]
    sched, results = await _scheduler_batch(engine, clips)
    for i, event in enumerate(results):
        if i in (2, 6):
            assert event.kind.value == "INTERNAL" and POISON_MESSAGE in event.message
        else:
            assert event.is_final and event.transcript == expected[i]
    assert sched.dead_reason is None and engine.slots_in_use() == 0 and engine.violations == []


@pytest.mark.asyncio
async def test_a_dead_engine_is_tried_a_bounded_number_of_times_per_batch():
    engine = FaultyEngine(FakeEngine(capacity=16, max_batch=16))
    engine.fail_all = True
    clips = [clip(90 + i, RATE // 2) for i in range(8)]
    sched, results = await _scheduler_batch(engine, clips, dead_after_failures=1)
    # One batch of 8: the attempt, its retry, then halves: at most 2 + 4 * log2(8) attempts.
    assert len(engine.faults()) <= 2 + 4 * 3
    assert all(e.kind.value == "UNAVAILABLE" and "the engine failed" in e.message for e in results)
    assert sched.dead_reason is not None and engine.slots_in_use() == 0


class LosingEngine(FakeEngine):
    """Fails one step while 'committing' for its first two streams (and commits nothing)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.lose_once = True

    def step(self, plan):
        if self.lose_once and len(plan.chunks) > 2:
            self.lose_once = False
            lost = tuple(c.stream_id for c in plan.chunks[:2])
            raise StreamStateLostError("injected: the copy back to the slots failed", lost)
        return super().step(plan)


@pytest.mark.asyncio
async def test_streams_whose_state_was_lost_fail_and_the_rest_of_the_batch_goes_on():
    engine = FaultyEngine(LosingEngine(capacity=16, max_batch=16))
    clips = [clip(100 + i, RATE // 2) for i in range(5)]
    reference = FakeEngine()
    expected = [transcribe_alone(reference, as_float(c)) for c in clips]
    sched, results = await _scheduler_batch(engine, clips)
    lost = [e for e in results if not getattr(e, "is_final", False)]
    assert len(lost) == 2 and all(e.kind.value == "INTERNAL" and "lost this stream's state" in e.message for e in lost)
    for i, e in enumerate(results):
        if getattr(e, "is_final", False):
            assert e.transcript == expected[i]
    assert sched.dead_reason is None and engine.slots_in_use() == 0
