"""/health, /ready and /metrics on the metrics port of a real `asr-server` process
(server/ops/ops_http.py): the JSON names the engine that really executed, /ready follows the serving
state through a drain, a dead engine makes /health 503, other paths are 404, and half-open
connections hold neither a thread each nor the endpoint for good."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import urllib.error
import urllib.request

import grpc
import pytest

from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.service.cli import parse_args
from server.ops.ops_http import WORKERS
from tests.server_harness import RATE, held_open_outcome, pcm16_audio, requests_for, run_stream_sync, scrape, spawn_server

READY = r"listening on 127\.0\.0\.1:(\d+).*metrics on http://127\.0\.0\.1:(\d+)"


async def start_server(factory: str, *extra: str) -> tuple[asyncio.subprocess.Process, int, int]:
    proc, match, _ = await spawn_server(
        "--engine-factory", factory, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--max-streams", "16", "--max-batch", "8", *extra, ready=READY)
    return proc, int(match.group(1)), int(match.group(2))


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def poll(port: int, path: str, want, tries: int = 500) -> tuple[int, dict]:
    for _ in range(tries):
        code, _, body = await asyncio.to_thread(get, port, path)
        status = json.loads(body)
        if want(code, status):
            return code, status
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never matched: last {code} {status}")


async def stop(proc) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


def test_the_metrics_port_binds_loopback_unless_told():
    assert parse_args([]).metrics_host == "127.0.0.1"
    assert parse_args(["--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"


@pytest.mark.parametrize("frontends", ["1", "2"])  # 2: the engine process serves the endpoint
async def test_health_and_ready_report_the_engine_that_ran_and_follow_a_drain(frontends):
    proc, port, metrics_port = await start_server("tests.fake_engine:build_fake_engine", "--frontends", frontends,
                                                  "--drain-grace-s", "30")
    resume = asyncio.Event()
    try:
        code, kind, body = await asyncio.to_thread(get, metrics_port, "/ready")
        assert (code, kind) == (200, "application/json")
        status = json.loads(body)
        assert status["status"] == "SERVING" and status["ready"] is True
        if frontends == "2":  # the engine process lists each frontend process's lifecycle
            assert [(f["name"], f["state"]) for f in status["frontends"]] == [
                ("frontend-0", "SERVING"), ("frontend-1", "SERVING")]
        executions = {k: v for k, v in scrape(metrics_port).items() if k.startswith("asr_engine_executions_total")}
        assert status["engine"] and executions == {
            f"asr_engine_executions_total{{engine={name}}}": float(n) for name, n in status["engine_executions"].items()}
        assert status["engine_executions"][status["engine"]] > 0, "the warm-up ran the engine it names"
        assert status["slots_capacity"] == 16
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)
            model = (await stub.ListModels(pb.ListModelsRequest())).models[0]
            assert status["model"] == model.name and status["engine"] == model.engine
            held = asyncio.create_task(held_open_outcome(stub, 1, resume))
            await poll(metrics_port, "/health", lambda c, s: s["slots_in_use"] == 1 and s["active_streams"] == 1)
            assert (await asyncio.to_thread(get, metrics_port, "/nothing"))[0] == 404
            assert (await asyncio.to_thread(get, metrics_port, "/metrics/x"))[0] == 404
            code, kind, body = await asyncio.to_thread(get, metrics_port, "/metrics")
            assert code == 200 and kind.startswith("text/plain") and b"asr_active_streams 1.0" in body

            proc.send_signal(signal.SIGTERM)
            code, status = await poll(metrics_port, "/ready", lambda c, s: s["status"] == "DRAINING")
            assert code == 503
            code, _, body = await asyncio.to_thread(get, metrics_port, "/health")
            status = json.loads(body)
            assert code == 200 and status["status"] == "DRAINING", "draining is alive, not ready"
            assert status["ready"] is False
            if frontends == "2":  # each frontend was told to drain: its own report follows within moments
                await poll(metrics_port, "/health",
                           lambda c, s: [f["state"] for f in s["frontends"]] == ["DRAINING", "DRAINING"])
            metrics = scrape(metrics_port)
            assert metrics['asr_lifecycle_state{role=server,state=DRAINING}'] == 1.0
            assert metrics['asr_lifecycle_state{role=server,state=SERVING}'] == 0.0
            resume.set()
            assert (await held)[0] == "OK", "the open stream finished during the drain"
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        resume.set()
        await stop(proc)


async def test_health_is_503_once_the_engine_is_dead():
    proc, port, metrics_port = await start_server("tests.fault_engine:build_dead_engine",
                                                  "--dead-after-failures", "1", "--exit-on-engine-death-s", "-1")
    try:
        assert (await asyncio.to_thread(get, metrics_port, "/health"))[0] == 200
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)
            with pytest.raises(grpc.RpcError):
                list(stub.StreamingRecognize(iter(requests_for(pcm16_audio(3, RATE).tobytes()))))
        code, status = await poll(metrics_port, "/health", lambda c, s: s["status"] == "DEAD")
        assert code == 503 and status["dead_reason"] and status["ready"] is False
        assert scrape(metrics_port)['asr_lifecycle_state{role=server,state=DEAD}'] == 1.0
        assert (await asyncio.to_thread(get, metrics_port, "/ready"))[0] == 503
    finally:
        await stop(proc)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_half_open_connections_are_bounded_and_do_not_hold_the_endpoint():
    proc, _, metrics_port = await start_server("tests.fake_engine:build_fake_engine", "--no-engine-worker")
    sockets: list[socket.socket] = []
    try:
        assert (await asyncio.to_thread(get, metrics_port, "/ready"))[0] == 200
        before = _threads(proc.pid)
        for _ in range(300):  # connect and send nothing
            s = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
            sockets.append(s)
        await asyncio.sleep(1.0)
        during = _threads(proc.pid)
        assert during <= before + 1, f"{before} threads before 300 half-open connections, {during} with them"
        for s in sockets:
            s.close()
        sockets.clear()
        # The workers were held by half-open connections for at most their read timeout.
        code, _ = await poll(metrics_port, "/ready", lambda c, s: c == 200)
        assert code == 200
        assert _threads(proc.pid) <= before + 1
        assert WORKERS < 300
    finally:
        for s in sockets:
            s.close()
        await stop(proc)


@pytest.mark.parametrize("frontends", ["1", "2"])
async def test_drain_notice_reports_draining_before_refusing(frontends):
    """--drain-notice-s: /ready 503 and gRPC health NOT_SERVING at SIGTERM, new streams still
    accepted during the notice, refused after it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc, port, metrics_port = await start_server("tests.fake_engine:build_fake_engine", "--frontends", frontends,
                                                  "--drain-notice-s", "2", "--drain-grace-s", "10")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            proc.send_signal(signal.SIGTERM)
            code, _ = await poll(metrics_port, "/ready", lambda c, s: s["status"] == "DRAINING")
            assert code == 503
            for _ in range(200):
                if (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("gRPC health stayed SERVING during the notice")
            clip = pcm16_audio(4, RATE // 2).tobytes()
            responses = [r async for r in stub.StreamingRecognize(iter(requests_for(clip)))]
            assert responses and responses[-1].results[0].is_final, "a stream during the notice is served"
            await asyncio.sleep(2.5)

            # Sync API in a thread: refused while it may still be writing (by the draining
            # server, or by gRPC as the server stops), a grpc.aio client can report INTERNAL
            # "Internal error from Core" in place of UNAVAILABLE (grpc/grpc#36066).
            with pytest.raises(grpc.RpcError) as err:
                await run_stream_sync(port, requests_for(clip))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        await stop(proc)
