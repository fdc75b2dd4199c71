"""server.runtime.engine_worker: the engine in a child process of its own, behind the StreamingEngine
interface. Real child processes throughout: the real builtin:tiny model (transcripts equal to
the same engine in this process), and fake engines (tests.fake_engine) for the error paths."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import numpy as np
import pytest

from engines.api import (BadChunkError, ChunkWork, EngineError, EngineOverloadedError, EngineState, StepPlan,
                         StepResult, StreamStateLostError, StreamUpdate, TokenEvent)
from engines.config import EngineConfig
from server.runtime.engine_worker import ChildOptions, EngineWorker
from tests.fake_engine import FakeEngine

QUIET = ChildOptions(log_level="WARNING", gc_freeze=False)


class _ScriptedFaults(FakeEngine):
    """Fails a step by the name of its first stream: oom-*, lost-*, bad-*, boom-*."""

    def step(self, plan: StepPlan):
        sid = plan.chunks[0].stream_id
        if sid.startswith("oom"):
            raise EngineOverloadedError("out of device memory (scripted)", batch_size=len(plan.chunks))
        if sid.startswith("lost"):
            raise StreamStateLostError("commit failed (scripted)", (sid,))
        if sid.startswith("bad"):
            raise BadChunkError("invalid chunks (scripted)", (sid,))
        if sid.startswith("boom"):
            raise RuntimeError("the device fell over (scripted)")
        if sid.startswith("big"):  # a reply larger than the socket's buffer
            tokens = tuple(TokenEvent(7, "x" * 20, j) for j in range(500))
            return StepResult(updates=tuple(StreamUpdate(stream_id=c.stream_id, slot=c.slot, tokens=tokens,
                                                         text_delta="x" * 2000, is_final=False, frames_decoded=1,
                                                         audio_seconds=0.0) for c in plan.chunks), engine="fake")
        return super().step(plan)


def build_scripted_faults(cfg: EngineConfig) -> FakeEngine:
    return _ScriptedFaults(capacity=cfg.max_streams, max_batch=cfg.max_batch, lookahead_ms=cfg.lookahead_ms)


def build_host_part_fault(cfg: EngineConfig):
    """A real engine whose step fails in its host part (after its device state is committed)
    when the plan holds a stream named "boom": StreamStateLostError, as a broken commit gives."""
    from engines.factory import build_engine

    engine = build_engine(cfg)
    inner = engine._result_columns

    def result_columns(plan, *args, **kwargs):
        if "boom" in plan.stream_ids:
            raise RuntimeError("injected fault in the step's host part")
        return inner(plan, *args, **kwargs)

    engine._result_columns = result_columns
    return engine


def build_early_next(cfg: EngineConfig):
    """A real engine that lets the next step's device work be queued as soon as a step's encoder
    is (StreamingEngine.next_at = QUEUED, as on a GPU with a decode stream), so the worker begins
    the next step before this one's decode."""
    from engines.api import QUEUED
    from engines.factory import build_engine

    engine = build_engine(cfg)
    engine.next_at = QUEUED
    return engine


def build_refusing(cfg: EngineConfig):
    raise ValueError("no model at /nowhere/model.nemo")


def _fake_cfg() -> EngineConfig:
    return EngineConfig(model="fake", max_streams=8, max_batch=4, lookahead_ms=160)


def _run_streams(engine, audios: list[np.ndarray]) -> list[tuple[str, tuple]]:
    """Step several streams together, chunk by chunk, to the end: (text, labels) per stream."""
    g = engine.geometry
    slots = [engine.acquire_slot() for _ in audios]
    texts, labels = [""] * len(audios), [[] for _ in audios]
    try:
        for k in range(max(g.total_chunks(len(a)) for a in audios)):
            chunks = []
            for i, (slot, a) in enumerate(zip(slots, audios)):
                if k < g.total_chunks(len(a)):
                    start, end = g.chunk_span(k, len(a), True)
                    chunks.append(ChunkWork(f"s{i}", slot, a[start:end], k == 0, end == len(a)))
            for u in engine.step(StepPlan(tuple(chunks))).updates:
                i = int(u.stream_id[1:])
                assert u.slot == slots[i]  # the child's slot numbers never leak out
                texts[i] += u.text_delta
                labels[i] += [(t.token_id, t.frame) for t in u.tokens]
    finally:
        for slot in slots:
            engine.release_slot(slot)
    return list(zip(texts, (tuple(x) for x in labels)))


def test_the_real_model_in_a_worker_transcribes_exactly_as_in_this_process():
    from engines.factory import build_engine
    from engines.models import speechlike_audio

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", lookahead_ms=160,
                       max_streams=6, max_batch=4)
    audios = [speechlike_audio(s, seed=20 + i) for i, s in enumerate((1.3, 2.1, 0.7))]
    local = build_engine(cfg)
    local.warmup()
    expected = _run_streams(local, audios)
    worker = EngineWorker.start("engines.factory:build_engine", cfg, QUIET)
    try:
        assert worker.geometry == local.geometry and worker.model_info == local.model_info
        assert worker.startup_report["engine"] == "eager"
        assert sorted(worker._buffers) == [0, 1]  # step audio goes through shared buffers, not inline in the step message
        before = worker.executions()["eager"]
        assert worker.warmup() == "eager"
        # The warm-up took and gave back slots of the child's own, so its free list no longer
        # matches ours: every slot below goes through the mapping.
        got = _run_streams(worker, audios)
        assert got == expected and any(text for text, _ in got)
        assert worker.executions()["eager"] > before + 1  # counted in the child, where it ran
        assert worker.slots_in_use() == 0
        # Slots come back in the child too: the whole capacity can be taken, and used, again.
        taken = [worker.acquire_slot() for _ in range(cfg.max_streams)]
        for slot in taken:
            worker.release_slot(slot)
        assert _run_streams(worker, audios) == expected
    finally:
        worker.close()
    assert worker._process.exitcode == 0


def test_engine_errors_come_back_as_the_same_types_with_their_details():
    worker = EngineWorker.start("tests.test_engine_worker:build_scripted_faults", _fake_cfg(), QUIET)
    try:
        worker.warmup()
        slot = worker.acquire_slot()
        audio = np.zeros(worker.geometry.samples_needed(0), np.float32)

        def step(sid: str):
            return worker.step(StepPlan((ChunkWork(sid, slot, audio, True, False),)))

        with pytest.raises(EngineOverloadedError, match="scripted") as oom:
            step("oom-1")
        assert oom.value.batch_size == 1
        with pytest.raises(StreamStateLostError) as lost:
            step("lost-1")
        assert lost.value.stream_ids == ("lost-1",)
        with pytest.raises(BadChunkError) as bad:
            step("bad-1")
        assert bad.value.stream_ids == ("bad-1",)
        with pytest.raises(EngineError, match=r"RuntimeError: the device fell over"):
            step("boom-1")
        assert step("fine").updates[0].stream_id == "fine"  # the worker goes on after each
        # A slot this side never acquired is refused by name, as the engine itself refuses one.
        with pytest.raises(BadChunkError) as unknown:
            worker.step(StepPlan((ChunkWork("stray", slot + 1, audio, True, False),)))
        assert unknown.value.stream_ids == ("stray",)
        assert worker.state is EngineState.READY
    finally:
        worker.close()


def test_an_engine_that_cannot_start_says_why():
    with pytest.raises(EngineError, match="no model at /nowhere/model.nemo"):
        EngineWorker.start("tests.test_engine_worker:build_refusing", _fake_cfg(), QUIET)
    with pytest.raises(EngineError, match="cannot load the engine factory 'tests.nowhere:build'"):
        EngineWorker.start("tests.nowhere:build", _fake_cfg(), QUIET)


def test_a_killed_worker_is_reported_at_once_and_every_later_call_fails_cleanly():
    worker = EngineWorker.start("tests.fake_engine:build_fake_engine", _fake_cfg(), QUIET)
    died = threading.Event()
    reasons: list[str] = []
    worker.watch(lambda reason: (reasons.append(reason), died.set()))
    try:
        worker.warmup()
        slot = worker.acquire_slot()
        os.kill(worker.pid, signal.SIGKILL)
        assert died.wait(10), "the watcher did not report the exit"
        assert reasons == [f"the engine worker process exited (status {-signal.SIGKILL})"]
        assert worker.state is EngineState.DEAD
        audio = np.zeros(worker.geometry.samples_needed(0), np.float32)
        with pytest.raises(EngineError, match="engine worker process exited"):
            worker.step(StepPlan((ChunkWork("s", slot, audio, True, False),)))
        with pytest.raises(EngineError, match="engine worker process exited"):
            worker.acquire_slot()
        worker.release_slot(slot)  # the books here stay right; the child's slots died with it
        assert worker.slots_in_use() == 0
    finally:
        worker.close()


def test_close_stops_the_child_and_does_not_report_it_as_a_death():
    worker = EngineWorker.start("tests.fake_engine:build_fake_engine", _fake_cfg(), QUIET)
    reasons: list[str] = []
    worker.watch(reasons.append)
    worker.close()
    assert worker._process.exitcode == 0
    assert reasons == []


@pytest.mark.asyncio
async def test_a_server_on_a_worker_hosted_engine_transcribes_as_in_process_and_reports_phases():
    """The real model behind AsrServer twice, in this process and in a worker: the same final
    transcripts; the worker's step timings reach the metrics (profile_every=1: every step's
    phases)."""
    import asyncio

    from engines.factory import build_engine
    from engines.models import speechlike_audio
    from tests.server_harness import (final_transcript, requests_for, running_server, run_stream, scrape,
                                      stub_for)

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", lookahead_ms=160,
                       max_streams=8, max_batch=4, profile_every=1)
    pcm = [(np.clip(speechlike_audio(s, seed=40 + i), -1, 1) * 32767).astype(np.int16) for i, s in enumerate((1.1, 1.7))]

    async def transcripts(engine) -> tuple[list[str], dict]:
        async with running_server(engine) as server, stub_for(server) as stub:
            runs = await asyncio.gather(*(run_stream(stub, requests_for(p.tobytes(), seed=i))
                                          for i, p in enumerate(pcm)))
            return [final_transcript(r) for r in runs], scrape(server.metrics_port)

    expected, local_metrics = await transcripts(build_engine(cfg))
    assert local_metrics.get("asr_engine_worker_seconds_count{part=to_worker}", 0) == 0  # no worker there
    worker = EngineWorker.start("engines.factory:build_engine", cfg, QUIET)
    try:
        got, metrics = await transcripts(worker)
    finally:
        worker.close()
    assert got == expected and all(expected)
    steps = sum(v for k, v in metrics.items() if k.startswith("asr_steps_total"))
    assert steps == metrics["asr_step_seconds_count"]
    assert steps > 0 and metrics["asr_engine_step_seconds_count"] == steps
    for phase in ("assemble", "features", "gather", "encoder", "decode", "commit", "results"):
        assert metrics[f"asr_engine_phase_seconds_count{{phase={phase}}}"] == steps, phase
    assert metrics["asr_engine_phase_seconds_sum{phase=encoder}"] > 0
    for part in ("to_worker", "worker_before", "worker_after", "from_worker", "unpack"):
        assert metrics[f"asr_engine_worker_seconds_count{{part={part}}}"] == steps, part
    assert metrics["asr_step_seconds_sum"] > 0 and metrics["asr_engine_step_seconds_sum"] > 0


def test_audio_through_the_shared_buffer_and_inline_in_the_step_message_give_the_same_results():
    """Steps too large for the shared buffer (or with none) send their audio inline in the step message;
    the fake engine's hash chains say both ways deliver the same samples to the same streams."""
    worker = EngineWorker.start("tests.fake_engine:build_fake_engine", _fake_cfg(), QUIET)
    try:
        worker.warmup()
        shared = dict(worker._buffers)
        assert 0 in shared
        rng = np.random.default_rng(3)
        audio = [rng.standard_normal(worker.geometry.samples_needed(7)).astype(np.float32) for _ in range(2)]
        a = [worker.acquire_slot() for _ in audio]
        b = [worker.acquire_slot() for _ in audio]
        g = worker.geometry
        emitted = []
        for k in range(8):
            start, end = g.chunk_span(k, len(audio[0]), False)
            plans = [StepPlan(tuple(ChunkWork(f"{tag}{i}", s, x[start:end], k == 0, False)
                                    for i, (s, x) in enumerate(zip(slots, audio)))) for tag, slots in (("a", a), ("b", b))]
            worker._buffers = dict(shared)
            through_buffer = worker.step(plans[0]).updates
            worker._buffers = {}
            inline = worker.step(plans[1]).updates
            assert [(u.text_delta, u.tokens) for u in through_buffer] == [(u.text_delta, u.tokens) for u in inline]
            emitted += [u.tokens for u in through_buffer if u.tokens]
        assert emitted  # the comparison above compared something
        worker._buffers = dict(shared)
        for slot in a + b:
            worker.release_slot(slot)
    finally:
        worker.close()


@pytest.mark.asyncio
async def test_asynchronous_steps_in_flight_together_each_get_their_own_result():
    """step_async (the scheduler's path): two steps sent at once, each with its own buffer;
    replies go to the right callers, equal to the same steps taken one at a time; a worker
    killed with a step in flight fails that step, not the loop."""
    import asyncio

    worker = EngineWorker.start("tests.fake_engine:build_fake_engine", _fake_cfg(), QUIET)
    try:
        worker.warmup()
        g = worker.geometry
        rng = np.random.default_rng(5)
        audio = [rng.standard_normal(g.samples_needed(5)).astype(np.float32) for _ in range(4)]
        together = [worker.acquire_slot() for _ in audio]
        alone = [worker.acquire_slot() for _ in audio]

        def plan(k: int, slots: list[int], rows: range, tag: str) -> StepPlan:
            start, end = g.chunk_span(k, len(audio[0]), False)
            return StepPlan(tuple(ChunkWork(f"{tag}{i}", slots[i], audio[i][start:end], k == 0, False) for i in rows))

        for k in range(5):
            first, second = await asyncio.gather(worker.step_async(plan(k, together, range(0, 2), "t")),
                                                 worker.step_async(plan(k, together, range(2, 4), "t")))
            one_at_a_time = [await worker.step_async(plan(k, alone, rows, "a")) for rows in (range(0, 2), range(2, 4))]
            for got, want in zip((first, second), one_at_a_time):
                assert [u.stream_id[1:] for u in got.updates] == [u.stream_id[1:] for u in want.updates]
                assert [(u.text_delta, u.tokens) for u in got.updates] == [(u.text_delta, u.tokens) for u in want.updates]
                assert got.timings.to_worker_ms > 0 and got.timings.unpack_ms >= 0
        assert sorted(worker._free_buffers) == [0, 1] and not worker._waiting
        with pytest.raises(EngineError, match="the reply reader owns the link"):
            worker.step(plan(0, alone, range(0, 1), "x"))  # a blocking reply would be the reader's

        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="engine worker process exited"):
            await worker.step_async(plan(0, together, range(0, 2), "t"))
        assert worker.state is EngineState.DEAD
    finally:
        worker.close()


async def test_a_cancelled_step_keeps_its_buffer_until_the_worker_replies(monkeypatch):
    """A caller cancelled while its step runs gets CancelledError at once; the step's shared
    buffer stays the worker's until the reply comes (the worker may still be reading it), then
    is free again, and the next step's result is its own."""
    import asyncio

    monkeypatch.setenv("FAKE_ENGINE_STEP_DELAY_S", "0.4")  # read by the child's factory
    worker = EngineWorker.start("tests.fake_engine:build_fake_engine", _fake_cfg(), QUIET)
    try:
        worker.warmup()
        g = worker.geometry
        rng = np.random.default_rng(11)
        audio = rng.standard_normal(g.samples_needed(1)).astype(np.float32)
        start, end = g.chunk_span(0, len(audio), False)
        slot = worker.acquire_slot()
        step = asyncio.ensure_future(worker.step_async(StepPlan((ChunkWork("c0", slot, audio[start:end], True, False),))))
        await asyncio.sleep(0.1)  # sent; the worker is inside its 0.4 s step
        assert len(worker._free_buffers) == 1 and len(worker._waiting) == 1
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        assert len(worker._free_buffers) == 1, "the buffer went back while the worker still had the step"
        deadline = asyncio.get_running_loop().time() + 10
        while worker._waiting and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert not worker._waiting and sorted(worker._free_buffers) == [0, 1]  # the reply freed it
        other = worker.acquire_slot()
        result = await worker.step_async(StepPlan((ChunkWork("d0", other, audio[start:end], True, False),)))
        assert [u.stream_id for u in result.updates] == ["d0"]
        worker.release_slot(slot)
        worker.release_slot(other)
        assert worker.slots_in_use() == 0
    finally:
        worker.close()


def test_replies_larger_than_the_socket_buffer_arrive_whole_under_uvloop():
    """asr-server runs on uvloop, which puts a descriptor it watches into non-blocking mode; the
    replies' reader must not depend on the loop watching the pipe (a first version did, and a
    reply larger than the socket buffer then failed the engine at 2,880 streams on the H100)."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed here")
    cfg = EngineConfig(model="fake", max_streams=64, max_batch=64, lookahead_ms=160)
    worker = EngineWorker.start("tests.test_engine_worker:build_scripted_faults", cfg, QUIET)
    try:
        worker.warmup()
        slots = [worker.acquire_slot() for _ in range(64)]
        audio = np.zeros(worker.geometry.samples_needed(0), np.float32)
        plan = StepPlan(tuple(ChunkWork(f"big{i}", s, audio, True, False) for i, s in enumerate(slots)))

        async def main():
            import asyncio
            return await asyncio.gather(*(worker.step_async(plan) for _ in range(3)))

        for result in uvloop.run(main()):
            assert len(result.updates) == 64 and all(len(u.tokens) == 500 for u in result.updates)
        assert worker.state is EngineState.READY
    finally:
        worker.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("factory", ["engines.factory:build_engine", "tests.test_engine_worker:build_early_next"])
async def test_the_worker_prepares_the_next_step_while_one_runs_and_keeps_every_result(factory):
    """Two steps in flight on a real engine (the scheduler's way: each stream in one of them):
    the child reads the second while the first runs, prepares it (checks, waveform windows)
    and runs it after; every result equals the same steps taken one at a time in this process.
    A slot claimed while a step runs is in place for the next step; a bad chunk in a step read
    ahead fails that step alone, in its turn. With build_early_next the second step's device
    work is begun before the first one's decode (StreamingEngine.next_at)."""
    import asyncio

    from engines.factory import build_engine
    from engines.models import speechlike_audio

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", lookahead_ms=160,
                       max_streams=12, max_batch=6)
    g_local = build_engine(cfg)
    rounds = 6
    audio = [speechlike_audio(1.8 + 0.1 * i, seed=40 + i) for i in range(6)]
    n = min(len(a) for a in audio)

    def plan(k: int, slots: dict[int, int], rows) -> StepPlan:
        start, end = g_local.geometry.chunk_span(k, n, False)
        return StepPlan(tuple(ChunkWork(f"s{i}", slots[i], audio[i][start:end], k == 0, False) for i in rows))

    local_slots = {i: g_local.acquire_slot() for i in range(6)}
    want = [[g_local.step(plan(k, local_slots, rows)) for rows in (range(0, 3), range(3, 6))] for k in range(rounds)]
    for slot in local_slots.values():
        g_local.release_slot(slot)
    assert g_local.slots_in_use() == 0

    worker = EngineWorker.start(factory, cfg, QUIET)
    try:
        worker.warmup()
        slots = {i: worker.acquire_slot() for i in range(5)}
        ahead = 0
        for k in range(rounds):
            first = asyncio.ensure_future(worker.step_async(plan(k, slots, range(0, 3))))
            await asyncio.sleep(0)
            if k == 0:
                slots[5] = worker.acquire_slot()  # claimed while the first step is on its way
            second = await worker.step_async(plan(k, slots, range(3, 6)))
            got = [await first, second]
            for g, w_ in zip(got, want[k]):
                assert [(u.stream_id, u.text_delta, u.tokens, u.is_final) for u in g.updates] == \
                    [(u.stream_id, u.text_delta, u.tokens, u.is_final) for u in w_.updates]
            ahead += sum(r.timings.prepared_ahead for r in got)
        assert any(u.text_delta for r in want for s in r for u in s.updates), "nothing transcribed: vacuous"
        assert ahead >= rounds // 2, f"the second step was prepared ahead in {ahead} of {rounds} rounds"

        bad = plan(rounds, slots, range(3, 6))
        bad_audio = bad.chunks[1].samples.copy()
        bad_audio[3] = np.nan
        bad = StepPlan((bad.chunks[0], dataclasses.replace(bad.chunks[1], samples=bad_audio), bad.chunks[2]))
        ok, failed = await asyncio.gather(worker.step_async(plan(rounds, slots, range(0, 3))),
                                          worker.step_async(bad), return_exceptions=True)
        assert isinstance(failed, BadChunkError) and "s4" in failed.stream_ids, failed
        assert not isinstance(ok, BaseException) and len(ok.updates) == 3
        for slot in slots.values():
            worker.release_slot(slot)
        assert worker.slots_in_use() == 0
    finally:
        worker.close()
    assert worker._process.exitcode == 0


@pytest.mark.asyncio
async def test_a_step_failing_in_its_host_part_leaves_the_next_step_begun_meanwhile_whole():
    """The worker queues step B's device work before step A's host part; when A's host part
    fails (its streams' state is lost: StreamStateLostError), B still runs to its end and gets
    its own result, the one it gets alone."""
    import asyncio

    from engines.models import speechlike_audio

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", lookahead_ms=160, max_streams=8, max_batch=4)
    worker = EngineWorker.start("tests.test_engine_worker:build_host_part_fault", cfg, QUIET)
    try:
        worker.warmup()
        g = worker.geometry
        audio = [speechlike_audio(1.5, seed=60 + i) for i in range(4)]
        slots = [worker.acquire_slot() for _ in audio]
        ids = ["boom", "a1", "b0", "b1"]

        def plan(k: int, rows) -> StepPlan:
            start, end = g.chunk_span(k, len(audio[0]), False)
            return StepPlan(tuple(ChunkWork(ids[i], slots[i], audio[i][start:end], k == 0, False) for i in rows))

        outcomes = []
        for _ in range(3):  # a few tries: B must arrive while A runs for the overlap to happen
            # a reply lost with its failed neighbour would hang: bounded, it fails the test instead
            failed, ok = await asyncio.wait_for(asyncio.gather(
                worker.step_async(plan(0, (0, 1))), worker.step_async(plan(0, (2, 3))), return_exceptions=True), 60)
            assert isinstance(failed, StreamStateLostError) and "boom" in failed.stream_ids, failed
            assert not isinstance(ok, BaseException) and [u.stream_id for u in ok.updates] == ["b0", "b1"]
            outcomes.append(ok.timings.prepared_ahead)
            for slot in slots:  # the lost streams, and B's, start afresh in new slots
                worker.release_slot(slot)
            slots[:] = [worker.acquire_slot() for _ in audio]
        assert any(outcomes), "B was never begun while A ran: the overlap was not exercised"
        for slot in slots:
            worker.release_slot(slot)
        assert worker.slots_in_use() == 0
    finally:
        worker.close()


def test_while_the_device_is_busy_the_child_keeps_taking_messages_until_it_is_not():
    """ReadAhead.during_step: a message that arrives after the step was queued, while the
    device still runs it, is taken then (here a slot claim, applied at once), not after the
    step; and once the device is done it stops waiting though nothing came."""
    import socket
    import time

    from server.runtime import wire as w
    from server.runtime.worker_link import ChildSlots, Link
    from server.runtime.worker_process import ReadAhead

    class Run:  # a step at QUEUED whose device work lasts until `until`
        def __init__(self, seconds):
            self.until = time.monotonic() + seconds

        def device_busy(self):
            return time.monotonic() < self.until

    class Staged(FakeEngine):  # an engine with stages, as far as the read-ahead asks
        def start_step(self, work):
            raise AssertionError("not reached")

        def prepare(self, plan):
            raise AssertionError("not reached")

    parent, child = socket.socketpair()
    try:
        engine = Staged(capacity=4)
        slots = ChildSlots(engine)
        ahead = ReadAhead(Link(child, w.TO_WORKER), engine, slots, {})
        sender = threading.Timer(0.05, lambda: parent.sendall(w.encode_frame([w.Claim(slot=2)])))
        sender.start()
        t0 = time.monotonic()
        ahead.during_step(Run(0.4))
        waited = time.monotonic() - t0
        sender.join()
        assert slots.to_child[2] >= 0, "the claim that came while the device was busy was not taken"
        assert 0.3 <= waited < 5.0, waited  # it waited for the device, and no longer
        t0 = time.monotonic()
        ahead.during_step(Run(0.0))
        assert time.monotonic() - t0 < 0.3
    finally:
        parent.close()
        child.close()


@pytest.mark.parametrize("next_at", ["queued", "device_done"])
def test_the_next_step_is_begun_from_the_stage_the_engine_names(next_at, monkeypatch):
    """finish_step: with the engine's next_at QUEUED the step read ahead is begun right after the
    read-ahead, before the current step's decode (its advance from QUEUED); with DEVICE_DONE
    only after it. With QUEUED, a step that arrives during the decode is taken then (a read
    that does not wait) and begun before the current step's host part."""
    from engines.api import DEVICE_DONE, QUEUED
    import types

    from server.runtime.worker_process import Started, finish_step

    order = []

    class Run:
        stage = QUEUED

        def advance(self):
            order.append(f"advance from {self.stage}")
            self.stage = {QUEUED: DEVICE_DONE, DEVICE_DONE: None}[self.stage]
            return self.stage is not None

        @property
        def result(self):
            return "result"

    class Ahead:
        stages = True
        arrived = False

        def during_step(self, run, wait=True):
            order.append("read ahead" if wait else "read what arrived")

        def start_next(self):
            order.append("begin next")
            return "next" if self.arrived else None

    class Engine:
        pass

    engine = Engine()
    engine.next_at = QUEUED if next_at == "queued" else DEVICE_DONE
    ahead = Ahead()
    ahead.arrived = True
    current = Started(message=types.SimpleNamespace(id=1), got=0.0, began=0.0, plan=None, run=Run())
    import server.runtime.worker_process as wp
    monkeypatch.setattr(wp, "step_reply", lambda *args: "reply")
    reply, nxt = finish_step(current, engine, ahead, None)
    assert (reply, nxt) == ("reply", "next")
    if next_at == "queued":
        assert order == ["read ahead", "begin next", "advance from queued", "advance from device_done"]
    else:
        assert order == ["read ahead", "advance from queued", "begin next", "advance from device_done"]
    order.clear()
    ahead.arrived = False  # nothing read ahead: with QUEUED, what came during the decode is taken
    reply, nxt = finish_step(Started(message=types.SimpleNamespace(id=1), got=0.0, began=0.0, plan=None, run=Run()), engine, ahead, None)
    assert nxt is None
    if next_at == "queued":
        assert order == ["read ahead", "begin next", "advance from queued", "read what arrived", "begin next",
                         "advance from device_done"]
    else:
        assert order == ["read ahead", "advance from queued", "begin next", "advance from device_done"]
    # A step synchronized at each phase (profile_every) finishes before the next begins: its
    # phases then hold its own device work only.
    order.clear()
    ahead.arrived = True
    synced = Run()
    synced.synced = True
    reply, nxt = finish_step(Started(message=types.SimpleNamespace(id=1), got=0.0, began=0.0, plan=None, run=synced),
                             engine, ahead, None)
    assert reply == "reply" and nxt is None
    assert order == ["read ahead", "advance from queued", "advance from device_done"]
