"""Several engine cores in one real `asr-server` process (`--device cpu --engine-cores 2`: two
engine worker processes, each with its own scheduler, the hash-chain fake engine in each):
placement on the core with the most free slots, a stream's transcript as if alone, the drain
of every core on SIGTERM, one core's death (only its streams fail, the other goes on, health
stays SERVING, /health reads the core DEAD) and the death of every core (NOT_SERVING, the engine-death exit status); with
frontend processes too. And `--gpus` on a machine without GPUs: a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.service.app import AsrServer
from server.service.cli import EXIT_ENGINE_DEAD
from server.runtime.engine_cores import EngineCore, EngineCores
from server.scheduling.scheduler import Scheduler, SchedulerConfig
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.fault_engine import FaultyEngine
from tests.server_harness import (ROOT, RATE, as_float, audio, config, final_transcript, held_open_outcome,
                                  pcm16_audio, python_path, requests_for, run_stream, scrape, server_settings,
                                  spawn_server, stub_for, wav_bytes)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def start_server(*extra: str) -> tuple[asyncio.subprocess.Process, int, int]:
    """Two engine cores on the CPU with 2 slots each; the process, its gRPC and metrics ports."""
    proc, match, lines = await spawn_server(
        "--engine-factory", "tests.fake_engine:build_fake_engine", "--device", "cpu", "--engine-cores", "2",
        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--max-streams", "2", "--max-batch", "4", *extra,
        env={"FAKE_ENGINE_STEP_DELAY_S": "0.003"},
        ready=r"listening on 127\.0\.0\.1:(\d+) \(engine fake, 2 engine cores.*metrics on http://127\.0\.0\.1:(\d+)")
    assert any("engine cores: core 0 on cpu: 2 slots, core 1 on cpu: 2 slots" in line for line in lines), lines
    return proc, int(match.group(1)), int(match.group(2))


def health_json(metrics_port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 503 once dead: the body is the same JSON
        return json.loads(exc.read())


def per_core(metrics_port: int, name: str) -> list[float]:
    m = scrape(metrics_port)
    return [m[f"{name}{{core={i},device=cpu}}"] for i in (0, 1)]


async def wait_for_core_streams(metrics_port: int, expected: list[int]) -> None:
    for _ in range(2000):
        if per_core(metrics_port, "asr_core_active_streams") == expected:
            return
        await asyncio.sleep(0.01)
    assert per_core(metrics_port, "asr_core_active_streams") == expected


def sync_outcome(port: int, requests) -> tuple[str, str, list]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return "OK", "", list(pb_grpc.SpeechRecognitionStub(channel).StreamingRecognize(iter(requests)))
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", []


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


@pytest.mark.parametrize("frontends", ["1", "2"])  # 2: frontend processes around the engine process
async def test_streams_go_to_the_core_with_most_free_slots_and_sigterm_drains_every_core(frontends):
    proc, port, metrics_port = await start_server("--frontends", frontends, "--drain-grace-s", "60")
    clip = pcm16_audio(7, 2 * RATE)
    expected = transcribe_alone(FakeEngine(), as_float(clip))
    resume, halfway = asyncio.Event(), asyncio.Event()
    try:
        cores = health_json(metrics_port)["cores"]
        assert [(c["core"], c["device"], c["state"], c["engine"]) for c in cores] == [
            (0, "cpu", "SERVING", "fake"), (1, "cpu", "SERVING", "fake")]
        assert len({c["pid"] for c in cores}) == 2 and all(c["pid"] for c in cores)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)
            held = []
            # One at a time: equal free slots go to the lowest core, then to the emptier one.
            for i, after in enumerate(([1, 0], [1, 1], [2, 1])):
                held.append(asyncio.create_task(held_open_outcome(stub, i, resume)))
                await wait_for_core_streams(metrics_port, after)

            async def clip_stream():
                data = clip.tobytes()
                pieces = [data[p:p + 3200] for p in range(0, len(data), 3200)]

                async def requests():
                    yield config()
                    for n, piece in enumerate(pieces):
                        if n == len(pieces) // 2:
                            halfway.set()
                            await resume.wait()
                        yield audio(piece)

                return [r async for r in stub.StreamingRecognize(requests())]

            streaming = asyncio.create_task(clip_stream())
            await halfway.wait()
            await wait_for_core_streams(metrics_port, [2, 2])  # the only free slot was core 1's
            code, details, _ = await asyncio.to_thread(sync_outcome, port, requests_for(clip.tobytes()))
            assert code == "RESOURCE_EXHAUSTED" and "stream slots are in use" in details, (code, details)
            assert health_json(metrics_port)["slots_capacity"] == 4

            proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(1000):
                if (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
            code, details, _ = await asyncio.to_thread(sync_outcome, port, requests_for(clip.tobytes()))
            assert code == "UNAVAILABLE" and "draining" in details, (code, details)
            assert proc.returncode is None  # the open streams on both cores go on
            status = health_json(metrics_port)
            assert status["status"] == "DRAINING" and [c["state"] for c in status["cores"]] == ["DRAINING"] * 2
            resume.set()
            assert final_transcript(await streaming) == expected
            assert await asyncio.gather(*held) == [("OK", "")] * 3
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        resume.set()
        await stop(proc)


@pytest.mark.parametrize("frontends", ["1", "2"])
async def test_a_dead_core_fails_only_its_streams_the_other_serves_on_until_it_dies_too(frontends):
    proc, port, metrics_port = await start_server("--frontends", frontends, "--exit-on-engine-death-s", "0.5")
    clip = pcm16_audio(8, RATE + 4000)
    expected = transcribe_alone(FakeEngine(), as_float(clip))
    resume_core0, resume_core1 = asyncio.Event(), asyncio.Event()
    try:
        pids = [c["pid"] for c in health_json(metrics_port)["cores"]]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            on_core0, on_core1 = [], []
            for i, (group, resume, after) in enumerate(((on_core0, resume_core0, [1, 0]),
                                                         (on_core1, resume_core1, [1, 1]),
                                                         (on_core0, resume_core0, [2, 1]),
                                                         (on_core1, resume_core1, [2, 2]))):
                group.append(asyncio.create_task(held_open_outcome(stub, i, resume)))
                await wait_for_core_streams(metrics_port, after)

            os.kill(pids[1], signal.SIGKILL)
            for code, details in await asyncio.wait_for(asyncio.gather(*on_core1), 30):
                assert code == "UNAVAILABLE" and "the engine of core 1 (cpu) failed" in details, (code, details)
                assert "engine worker process exited" in details, details
            await wait_for_core_streams(metrics_port, [2, 0])
            status = health_json(metrics_port)
            assert status["status"] == "SERVING" and status["slots_capacity"] == 2
            assert [c["state"] for c in status["cores"]] == ["SERVING", "DEAD"]
            assert "engine worker process exited" in status["cores"][1]["dead_reason"]
            m = scrape(metrics_port)
            assert m["asr_lifecycle_state{role=core-1,state=DEAD}"] == 1 and m["asr_lifecycle_state{role=server,state=SERVING}"] == 1
            assert per_core(metrics_port, "asr_core_up") == [1, 0] and scrape(metrics_port)["asr_engine_up"] == 1
            assert not any(t.done() for t in on_core0)  # core 0's streams did not notice

            # Core 0 has no free slot now, so a new stream is refused; once one of its streams
            # ends, the next goes there (never to the dead core) and is exact.
            code, details, _ = await asyncio.to_thread(sync_outcome, port, requests_for(clip.tobytes()))
            assert code == "RESOURCE_EXHAUSTED", (code, details)
            resume_core0.set()
            assert await asyncio.gather(*on_core0) == [("OK", "")] * 2
            code, details, responses = await asyncio.to_thread(sync_outcome, port, requests_for(clip.tobytes()))
            assert code == "OK", details
            assert final_transcript(responses) == expected
            assert per_core(metrics_port, "asr_core_step_seconds_count")[0] > 0
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING

            # The last core dies: now the server is dead, and exits for a restart.
            last = asyncio.create_task(held_open_outcome(stub, 9, resume_core1))
            await wait_for_core_streams(metrics_port, [1, 0])
            os.kill(pids[0], signal.SIGKILL)
            code, details = await asyncio.wait_for(last, 30)
            # (With frontends, the frontend may hear that the whole engine is dead first: its
            # message names every core.)
            assert code == "UNAVAILABLE" and "core 0 (cpu)" in details and "failed" in details, (code, details)
            statuses = []
            try:
                while (message := await watch.read()) is not grpc.aio.EOF:
                    statuses.append(message.status)
            except grpc.aio.AioRpcError:
                pass  # the server went away under the watch
            assert statuses and statuses[-1] == NOT_SERVING
        assert await asyncio.wait_for(proc.wait(), 60) == EXIT_ENGINE_DEAD
        stderr = (await proc.stderr.read()).decode()
        assert f"exiting with status {EXIT_ENGINE_DEAD}" in stderr and "every engine core failed" in stderr
    finally:
        resume_core0.set()
        resume_core1.set()
        await stop(proc)


async def test_gpus_without_a_gpu_is_a_clear_error():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.service.cli", "--engine-factory", "tests.fake_engine:build_fake_engine",
        "--gpus", "all", cwd=ROOT, env=dict(os.environ, PYTHONPATH=python_path(), CUDA_VISIBLE_DEVICES=""),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2, stderr
    assert b"--gpus all: no CUDA GPU is visible" in stderr and b"--engine-cores" in stderr, stderr


# -- in this process: AsrServer on EngineCores over two fake engines ---------------------------
@contextlib.asynccontextmanager
async def server_on_cores(*engines, **settings):
    s = server_settings(**settings)
    cores = EngineCores([EngineCore(i, "cpu", Scheduler(e, s.scheduler)) for i, e in enumerate(engines)])
    server = AsrServer(engines[0], s, scheduler=cores)
    await server.start()
    try:
        yield server, cores
    finally:
        await server.stop()


async def test_streaming_and_unary_calls_spread_over_the_cores_and_are_exact():
    engines = [FakeEngine(capacity=2, max_batch=4), FakeEngine(capacity=2, max_batch=4)]
    clips = [pcm16_audio(20 + i, RATE + 2500 * i) for i in range(4)]
    expected = [transcribe_alone(FakeEngine(), as_float(c)) for c in clips]
    async with server_on_cores(*engines) as (server, cores), stub_for(server) as stub:
        for e in engines:
            e.gate.clear()  # no step runs until all four calls hold a slot
        async def recognize(clip):
            return await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(), audio=wav_bytes(clip)))

        calls = [asyncio.create_task(run_stream(stub, requests_for(clips[0].tobytes()))),
                 asyncio.create_task(recognize(clips[1])),
                 asyncio.create_task(run_stream(stub, requests_for(clips[2].tobytes()))),
                 asyncio.create_task(recognize(clips[3]))]
        for _ in range(2000):
            if [c.scheduler.active_streams for c in cores.cores] == [2, 2]:
                break
            await asyncio.sleep(0.01)
        assert [c.scheduler.active_streams for c in cores.cores] == [2, 2]
        for e in engines:
            e.gate.set()
        results = await asyncio.gather(*calls)
        assert final_transcript(results[0]) == expected[0] and final_transcript(results[2]) == expected[2]
        assert results[1].result.transcript == expected[1] and results[3].result.transcript == expected[3]
        for _ in range(500):
            if cores.active_streams == 0:
                break
            await asyncio.sleep(0.01)
        assert [e.slots_in_use() for e in engines] == [0, 0] and cores.active_streams == 0
        assert not cores._core_of  # the router forgot every closed stream
    assert all(not e.violations for e in engines)


async def test_a_core_whose_steps_fail_dies_alone_and_the_server_serves_on():
    engines = [FakeEngine(capacity=2, max_batch=4), FaultyEngine(FakeEngine(capacity=2, max_batch=4), fail_all=True)]
    clip = pcm16_audio(30, RATE + 1000)
    expected = transcribe_alone(FakeEngine(), as_float(clip))
    resume = asyncio.Event()
    async with server_on_cores(*engines, scheduler=SchedulerConfig(batch_wait_s=0.002, stall_timeout_s=20.0,
                                                                   dead_after_failures=2)) as (server, cores):
        async with stub_for(server) as stub:
            held = asyncio.create_task(held_open_outcome(stub, 1, resume))  # core 0 (equal free slots)
            for _ in range(500):
                if cores.cores[0].scheduler.active_streams == 1:
                    break
                await asyncio.sleep(0.01)
            # The next two go to core 1 (more free slots): its steps fail; the second failure kills it.
            first = await asyncio.to_thread(sync_outcome, server.port, requests_for(clip.tobytes()))
            assert first[0] == "INTERNAL" and "injected fault" in first[1], first
            second = await asyncio.to_thread(sync_outcome, server.port, requests_for(clip.tobytes()))
            assert second[0] == "UNAVAILABLE", second
            assert "the engine of core 1 (cpu) failed: 2 consecutive failed steps" in second[1], second
            status = server.http_status()
            assert status["status"] == "SERVING" and server.engine_failure is None
            assert [c["state"] for c in status["cores"]] == ["SERVING", "DEAD"]
            assert scrape(server.metrics_port)["asr_engine_up"] == 1
            # The next stream goes to the core that serves, and is exact; the held one goes on.
            assert final_transcript(await run_stream(stub, requests_for(clip.tobytes()))) == expected
            assert not held.done()
            resume.set()
            assert await held == ("OK", "")
            assert server.lifecycle.name == "SERVING"
    # Stopped: the core that served is STOPPED, the dead one stays DEAD with its reason, and so
    # does the server's own lifecycle (it never died: one core served on).
    assert [c.state for c in cores.cores] == ["STOPPED", "DEAD"]
    assert "2 consecutive failed steps" in cores.cores[1].lifecycle.reason
    assert server.lifecycle.name == "STOPPED" and server.http_status()["status"] == "STOPPED"
    assert not engines[0].violations


@pytest.mark.parametrize("argv, visible, devices", [
    ([], 0, ["auto"]),
    (["--device", "cpu", "--engine-cores", "3"], 0, ["cpu"] * 3),
    (["--gpus", "all"], 2, ["cuda:0", "cuda:1"]),
    (["--gpus", "1,0", "--engine-cores", "2", "--max-streams", "8"], 2, ["cuda:1", "cuda:1", "cuda:0", "cuda:0"]),
    (["--gpus", "all", "--engine-cores", "2"], 2, "need --max-streams (per core) in place of auto"),
    (["--engine-cores", "2"], 0, "need --max-streams (per core) in place of auto"),
    (["--gpus", "2"], 2, "2 CUDA GPU(s) visible"),
    (["--gpus", "0,0"], 2, "each GPU index once"),
    (["--gpus", "x"], 2, "expected all or GPU indices"),
    (["--gpus", "0", "--device", "cuda:1"], 2, "exclude each other"),
    (["--engine-cores", "0"], 0, "at least 1"),
])
def test_core_devices_from_the_flags(monkeypatch, argv, visible, devices):
    import server.service.cli as cli

    monkeypatch.setattr(cli, "visible_gpu_count", lambda: visible)
    args = cli.parse_args(argv)
    if isinstance(devices, list):
        assert cli.core_devices(args) == devices
    else:
        with pytest.raises(ValueError, match=devices.replace("(", r"\(").replace(")", r"\)")):
            cli.core_devices(args)
