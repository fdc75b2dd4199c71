"""`asr-server --frontends N`: real server processes (the fake engine via --engine-factory), an
engine process and N gRPC frontend processes on one port.

The whole server suite also runs through the frontend <-> engine wire in one process
(ASR_TEST_FRONTEND_IPC=1, see tests/server_harness.py); here: what only separate processes
show. Connections spread over the frontends, every stream exact; a frontend killed mid-stream
costs only its own streams, its slots come back, and it is started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from client.loadgen_report import child_pids
from client.sdk import AsyncAsrClient
from proto import asr_stream_pb2_grpc as pb_grpc
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.server_harness import (
    ROOT, RATE, as_float, audio, config, final_transcript, held_open_outcome, pcm16_audio, requests_for, scrape,
    spawn_server,
)
from tests.waiting import wait_for

STREAMS = 16


async def start_server(*extra: str, env: dict | None = None) -> tuple[asyncio.subprocess.Process, int, int]:
    proc, match, _ = await spawn_server(
        "--engine-factory", "tests.fake_engine:build_fake_engine", "--frontends", "2",
        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--max-streams", "64", "--max-batch", "16", *extra, env=env,
        ready=r"listening on 127\.0\.0\.1:(\d+).*2 frontend processes.*metrics on http://127\.0\.0\.1:(\d+)")
    return proc, int(match.group(1)), int(match.group(2))


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            assert await asyncio.wait_for(proc.wait(), 60) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def own_channel(port: int, i: int) -> grpc.aio.Channel:
    """A channel with its own TCP connection: the kernel picks a frontend per connection."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.use_local_subchannel_pool", 1), ("test.channel", i)])


@pytest.mark.asyncio
async def test_connections_spread_over_the_frontends_and_every_stream_is_exact():
    proc, port, metrics_port = await start_server()
    clips = [pcm16_audio(100 + i, RATE // 2 + 1700 * i) for i in range(STREAMS)]
    reference = FakeEngine()
    expected = [transcribe_alone(reference, as_float(c)) for c in clips]
    try:
        async def one(i: int):
            async with own_channel(port, i) as channel:
                stub = pb_grpc.SpeechRecognitionStub(channel)
                return [r async for r in stub.StreamingRecognize(iter(requests_for(clips[i].tobytes(), seed=i)))]

        results = await asyncio.gather(*(one(i) for i in range(STREAMS)))
        for i, responses in enumerate(results):
            assert final_transcript(responses) == expected[i], f"stream {i}"
        await wait_for(lambda: scrape(metrics_port).get("asr_rpcs_total{code=OK,method=StreamingRecognize}") == STREAMS,
                       "the frontends' RPC counts to reach the engine process")
        # each frontend's written responses reach the engine process's endpoint as counts
        responses = sum(len(r) for r in results)
        await wait_for(lambda: scrape(metrics_port).get("asr_chunk_written_seconds_count") == responses,
                       "the frontends' written-chunk counts to reach the engine process")
        m = scrape(metrics_port)
        assert m["asr_chunk_written_seconds_sum"] > 0 and m["asr_chunk_latency_seconds_count"] > 0
        per_frontend = {k: v for k, v in m.items() if k.startswith("asr_frontend_streams_total")}
        assert sum(per_frontend.values()) == STREAMS
        # 16 connections, two frontends: all on one would happen with probability 2 / 2**16.
        assert len(per_frontend) == 2 and min(per_frontend.values()) >= 1, per_frontend
        assert m["asr_frontends_ready"] == 2 and m["asr_slots_in_use"] == 0 and m["asr_active_streams"] == 0
        assert m["asr_audio_seconds_total"] == pytest.approx(sum(c.size for c in clips) / RATE)
        assert m["asr_steps_total{engine=fake}"] > 0

        # The SDK's client for many streams at once: `connections=` opens that many connections,
        # its streams taking them in turn, so both frontends carry some (as above, all on one
        # would happen with probability 2 / 2**16), and every transcript is exact.
        async with AsyncAsrClient(f"127.0.0.1:{port}", connections=STREAMS) as client:
            assert len(client._connections.channels) == STREAMS

            async def sdk(i: int):
                return [f.transcript async for r in client.stream([clips[i].tobytes()], sample_rate=RATE,
                                                                  encoding="PCM16") for f in r.finals]

            finals = await asyncio.gather(*(sdk(i) for i in range(STREAMS)))
        assert finals == [[e] for e in expected]
        await wait_for(lambda: scrape(metrics_port).get("asr_rpcs_total{code=OK,method=StreamingRecognize}")
                       == 2 * STREAMS, "the frontends' RPC counts to reach the engine process")
        later = {k: v for k, v in scrape(metrics_port).items() if k.startswith("asr_frontend_streams_total")}
        added = {k: later[k] - per_frontend.get(k, 0) for k in later}
        assert sum(added.values()) == STREAMS and len(added) == 2 and min(added.values()) >= 1, added
    finally:
        await stop(proc)


@pytest.mark.asyncio
async def test_a_killed_frontend_costs_only_its_streams_and_is_started_again():
    proc, port, metrics_port = await start_server(env={"FAKE_ENGINE_STEP_DELAY_S": "0.002"})
    clips = [pcm16_audio(200 + i, 2 * RATE + 900 * i) for i in range(STREAMS)]
    reference = FakeEngine()
    expected = [transcribe_alone(reference, as_float(c)) for c in clips]
    halfway = [asyncio.Event() for _ in clips]
    resume = asyncio.Event()
    try:
        async def one(i: int) -> tuple[str, str]:
            data = clips[i].tobytes()
            pieces = [data[p:p + 6400] for p in range(0, len(data), 6400)]

            async def requests():
                yield config()
                for n, piece in enumerate(pieces):
                    if n == len(pieces) // 2:
                        halfway[i].set()
                        await resume.wait()
                    yield audio(piece)

            async with own_channel(port, i) as channel:
                stub = pb_grpc.SpeechRecognitionStub(channel)
                try:
                    responses = [r async for r in stub.StreamingRecognize(requests())]
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, exc.details() or ""
                return "OK", final_transcript(responses)

        calls = [asyncio.create_task(one(i)) for i in range(STREAMS)]
        await asyncio.gather(*(h.wait() for h in halfway))
        await wait_for(lambda: scrape(metrics_port)["asr_active_streams"] == STREAMS, "every stream open")
        frontends = child_pids(proc.pid, "frontend")
        assert len(frontends) == 2, frontends
        os.kill(frontends[0], signal.SIGKILL)
        await asyncio.sleep(0.2)
        resume.set()
        outcomes = await asyncio.gather(*calls)
        lost = [i for i, (code, _) in enumerate(outcomes) if code != "OK"]
        kept = [i for i, (code, _) in enumerate(outcomes) if code == "OK"]
        assert lost and kept, outcomes  # both frontends carried streams (see the spread test)
        for i in kept:
            assert outcomes[i][1] == expected[i], f"stream {i} on the surviving frontend"
        for i in lost:
            assert outcomes[i][0] == "UNAVAILABLE", outcomes[i]
        # The dead frontend's streams were closed in the engine process: their slots are back.
        await wait_for(lambda: scrape(metrics_port)["asr_slots_in_use"] == 0
                       and scrape(metrics_port)["asr_active_streams"] == 0, "the dead frontend's slots")
        await wait_for(lambda: scrape(metrics_port)["asr_frontends_ready"] == 2, "the frontend started again")
        assert scrape(metrics_port)["asr_frontend_restarts_total"] == 1
        # Its lifecycle: the killed process read DEAD (with its exit status); the new one is SERVING.
        await wait_for(lambda: [f["state"] for f in health(metrics_port)["frontends"]] == ["SERVING"] * 2,
                       "both frontends SERVING in /health")
        listed = health(metrics_port)["frontends"]
        assert sorted(f["restarts"] for f in listed) == [0, 1], listed
        killed = next(f for f in listed if f["restarts"])
        assert killed["last_exit"] == "the frontend process exited with status -9", killed
        assert killed["pid"] not in frontends and killed["reason"] is None
        again = await asyncio.gather(*(
            _transcribe(port, i, clips[i]) for i in range(STREAMS)))
        assert again == expected
        assert sorted(child_pids(proc.pid, "frontend")) != sorted(frontends)
    finally:
        resume.set()
        await stop(proc)


def health(metrics_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=10) as r:
        return json.loads(r.read())


async def _transcribe(port: int, i: int, clip) -> str | None:
    async with own_channel(port, 1000 + i) as channel:
        stub = pb_grpc.SpeechRecognitionStub(channel)
        return final_transcript([r async for r in stub.StreamingRecognize(iter(requests_for(clip.tobytes(), seed=i)))])


@pytest.mark.asyncio
async def test_when_the_engine_process_dies_the_frontends_fail_their_streams_and_exit():
    proc, port, metrics_port = await start_server()
    resume = asyncio.Event()
    try:
        async def held_open(i: int) -> tuple[str, str]:
            async with own_channel(port, 2000 + i) as channel:
                return await held_open_outcome(pb_grpc.SpeechRecognitionStub(channel), 300 + i, resume)

        calls = [asyncio.create_task(held_open(i)) for i in range(4)]
        await wait_for(lambda: scrape(metrics_port)["asr_active_streams"] == 4, "the streams open")
        frontends = child_pids(proc.pid, "frontend")
        workers = child_pids(proc.pid, "engine")
        assert len(frontends) == 2 and len(workers) == 1, (frontends, workers)
        proc.kill()  # the engine process, without a word to anyone
        await proc.wait()
        for code, details in await asyncio.wait_for(asyncio.gather(*calls), 30):
            assert code == "UNAVAILABLE" and "engine" in details, (code, details)

        def alive(pid: int) -> bool:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            return stat.rsplit(")", 1)[1].split()[0] != "Z"

        await wait_for(lambda: not any(alive(p) for p in frontends), "the orphaned frontends to exit", 30)
        # The engine worker too: an orphan would keep the GPU's memory.
        await wait_for(lambda: not any(alive(p) for p in workers), "the orphaned engine worker to exit", 30)
    finally:
        resume.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.asyncio
async def test_a_second_server_on_a_taken_port_fails_instead_of_sharing_it():
    proc, port, _ = await start_server()
    try:
        for frontends in ("2", "1"):
            second = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.service.cli", "--engine-factory", "tests.fake_engine:build_fake_engine",
                "--frontends", frontends, "--host", "127.0.0.1", "--port", str(port), "--no-metrics",
                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(second.communicate(), 120)
            assert second.returncode != 0, (frontends, out.decode(), err.decode())
            assert "listening" not in out.decode()
            assert "cannot listen" in err.decode() or "start-up failed" in err.decode(), err.decode()
    finally:
        await stop(proc)
