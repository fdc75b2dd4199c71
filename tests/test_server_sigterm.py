"""SIGTERM during load, on a real `asr-server` process (the fake engine via --engine-factory):
open streams finish with finals, new ones get UNAVAILABLE, health goes NOT_SERVING, exit 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import asr_stream_pb2_grpc as pb_grpc
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.server_harness import (
    RATE, as_float, audio, config, final_transcript, pcm16_audio, requests_for, scrape, spawn_server,
)

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent


async def start_server(*extra: str) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """The process, its gRPC port, and its start-up lines (the metrics URL among them)."""
    proc, match, seen = await spawn_server(
        "--engine-factory", "tests.fake_engine:build_fake_engine",
        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--max-streams", "16", "--max-batch", "8", "--drain-grace-s", "60", *extra,
        env={"FAKE_ENGINE_STEP_DELAY_S": "0.003"})
    return proc, int(match.group(1)), seen


@pytest.mark.parametrize("frontends", ["1", "2"])  # 2: frontend processes around an engine process
async def test_sigterm_drains_open_streams_and_exits_zero(frontends):
    proc, port, startup = await start_server("--frontends", frontends)
    target = f"127.0.0.1:{port}"
    reference = FakeEngine()
    clips = [pcm16_audio(40 + i, RATE + 3000 * i) for i in range(6)]
    expected = [transcribe_alone(reference, as_float(c)) for c in clips]
    halfway = [asyncio.Event() for _ in clips]
    resume = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING

            async def open_stream(i: int):
                data = clips[i].tobytes()
                pieces = [data[p:p + 3201] for p in range(0, len(data), 3201)]

                async def requests():
                    yield config(interim_results=True)
                    for n, piece in enumerate(pieces):
                        if n == len(pieces) // 2:
                            halfway[i].set()
                            await resume.wait()
                        yield audio(piece)
                        await asyncio.sleep(0.001)

                return [r async for r in stub.StreamingRecognize(requests())]

            streams = [asyncio.create_task(open_stream(i)) for i in range(len(clips))]
            await asyncio.gather(*(h.wait() for h in halfway))
            metrics_port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)", startup[-1]).group(1))
            for _ in range(1000):  # every stream is open on the server before the signal
                if scrape(metrics_port)["asr_active_streams"] == len(clips):
                    break
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            for _ in range(1000):
                status = (await health.Check(health_pb2.HealthCheckRequest())).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING

            def refused():
                with grpc.insecure_channel(target) as sync_channel:
                    list(pb_grpc.SpeechRecognitionStub(sync_channel).StreamingRecognize(
                        iter(requests_for(clips[0].tobytes()))))

            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(refused)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            assert proc.returncode is None  # still serving the open streams
            resume.set()
            results = await asyncio.gather(*streams)
        for i, responses in enumerate(results):
            assert final_transcript(responses) == expected[i]
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        stderr = (await proc.stderr.read()).decode()
        assert "draining" in stderr and "open_streams=6" in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("frontends", ["1", "2"])
async def test_sigterm_when_idle_exits_zero_at_once(frontends):
    proc, _, startup = await start_server("--frontends", frontends)
    try:
        # Random weights are announced, with how to serve a real model.
        assert any("RANDOM weights" in line and "--model /path/to/model.nemo" in line for line in startup)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_flags_exit_nonzero_with_a_message():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.service.cli", "--engine-factory", "tests.fake_engine:build_fake_engine",
        "--max-streams", "0", cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2 and b"max_streams must be at least 1" in stderr
