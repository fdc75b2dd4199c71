"""Repeated engine failure on a real `asr-server` process (--engine-factory pointing to an
engine that warms up and then fails every step): the streams in the failing steps get
INTERNAL until the engine is marked dead, then health is NOT_SERVING, every open stream gets
UNAVAILABLE, and the process exits with a non-zero status so an orchestrator restarts it."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.loadgen_report import child_pids
from proto import asr_stream_pb2_grpc as pb_grpc
from server.service.cli import EXIT_ENGINE_DEAD
from tests.server_harness import RATE, held_open_outcome, pcm16_audio, requests_for, scrape, spawn_server

pytestmark = pytest.mark.asyncio
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def start_server(factory: str, *extra: str) -> tuple[asyncio.subprocess.Process, int, int]:
    """The process, its gRPC port and its metrics port."""
    proc, match, _ = await spawn_server(
        "--engine-factory", factory,
        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--max-streams", "16", "--max-batch", "8", *extra,
        ready=r"listening on 127\.0\.0\.1:(\d+).*metrics on http://127\.0\.0\.1:(\d+)")
    return proc, int(match.group(1)), int(match.group(2))


def sync_outcome(port: int, requests) -> tuple[str, str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            list(pb_grpc.SpeechRecognitionStub(channel).StreamingRecognize(iter(requests)))
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
    return "OK", ""


async def held_open_streams(stub, metrics_port: int, resume: asyncio.Event, n: int) -> list[asyncio.Task]:
    """n streams held open (held_open_outcome), once the server counts them all."""
    tasks = [asyncio.create_task(held_open_outcome(stub, i, resume)) for i in range(n)]
    for _ in range(2000):
        if scrape(metrics_port)["asr_active_streams"] == n:
            break
        await asyncio.sleep(0.01)
    assert scrape(metrics_port)["asr_active_streams"] == n
    return tasks


async def statuses_to_the_end(watch) -> list:
    """Every health status a Watch call reports until it ends (or the server goes away under it)."""
    statuses = []
    try:
        while (message := await watch.read()) is not grpc.aio.EOF:
            statuses.append(message.status)
    except grpc.aio.AioRpcError:
        pass  # the server went away under the watch
    return statuses


@pytest.mark.parametrize("frontends", ["1", "2"])  # 2: frontend processes around an engine process
async def test_repeated_engine_failure_goes_not_serving_fails_open_streams_unavailable_and_exits_nonzero(frontends):
    proc, port, metrics_port = await start_server(
        "tests.fault_engine:build_dead_engine", "--dead-after-failures", "2", "--exit-on-engine-death-s", "0.5",
        "--frontends", frontends)
    target = f"127.0.0.1:{port}"
    resume = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING

            stub = pb_grpc.SpeechRecognitionStub(channel)
            bystanders = await held_open_streams(stub, metrics_port, resume, 3)

            trigger = requests_for(pcm16_audio(9, RATE).tobytes())
            first = await asyncio.to_thread(sync_outcome, port, trigger)
            assert first[0] == "INTERNAL" and "engine step failed: injected fault: the device is gone" in first[1]
            second = await asyncio.to_thread(sync_outcome, port, trigger)
            assert second[0] == "UNAVAILABLE" and "the engine failed: 2 consecutive failed steps" in second[1]
            for code, details in await asyncio.gather(*bystanders):
                assert code == "UNAVAILABLE" and "the engine failed" in details
            statuses = await statuses_to_the_end(watch)
            assert statuses and statuses[-1] == NOT_SERVING and SERVING not in statuses
        assert await asyncio.wait_for(proc.wait(), 60) == EXIT_ENGINE_DEAD
        stderr = (await proc.stderr.read()).decode()
        assert f"exiting with status {EXIT_ENGINE_DEAD}" in stderr and "engine marked dead" in stderr
    finally:
        resume.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("frontends", ["1", "2"])
async def test_a_killed_engine_worker_fails_open_streams_unavailable_and_the_server_exits_nonzero(frontends):
    """The engine's own process (server.runtime.engine_worker) killed while streams are open and no
    step runs: the server notices the exit itself, not at the next step."""
    proc, port, metrics_port = await start_server(
        "tests.fake_engine:build_fake_engine", "--exit-on-engine-death-s", "0.5", "--frontends", frontends)
    resume = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            stub = pb_grpc.SpeechRecognitionStub(channel)
            held = await held_open_streams(stub, metrics_port, resume, 3)
            workers = child_pids(proc.pid, "engine")
            assert len(workers) == 1, workers
            os.kill(workers[0], signal.SIGKILL)
            for code, details in await asyncio.wait_for(asyncio.gather(*held), 30):
                assert code == "UNAVAILABLE" and "engine worker process exited" in details, (code, details)
            statuses = await statuses_to_the_end(watch)
            assert statuses and statuses[-1] == NOT_SERVING
        assert await asyncio.wait_for(proc.wait(), 60) == EXIT_ENGINE_DEAD
    finally:
        resume.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
