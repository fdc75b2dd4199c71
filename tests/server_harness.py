"""Shared pieces of the server tests: engines by kind, a real grpc.aio server on a loopback
port, audio makers and request builders.

Engine kinds: "fake" (tests/fake_engine.py) always; "builtin:tiny" (the real engine via
engines.factory.build_engine) where that factory exists, skipped with the reason otherwise.
Tests that must hold for every engine take `engine_kind` from ALL_ENGINE_KINDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import re
import sys
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest

from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.service.app import AsrServer, ServerSettings
from server.transport.call_skeleton import TransportLimits
from server.scheduling.scheduler import SchedulerConfig
from bench.soak import scrape  # noqa: F401 - the metrics endpoint as {name{labels}: value}, for the tests
from tests.fake_engine import FakeEngine

FAKE = "fake"
REAL_TINY = "builtin:tiny"
ALL_ENGINE_KINDS = (FAKE, REAL_TINY)
RATE = 16000


def make_engine(kind: str, capacity: int = 64, max_batch: int = 16, **fake_kwargs):
    if kind == FAKE:
        return FakeEngine(capacity=capacity, max_batch=max_batch, **fake_kwargs)
    try:
        from engines.config import EngineConfig
        from engines.factory import build_engine
    except ImportError as exc:
        pytest.skip(f"real engine {kind} unavailable: {exc}")
    return build_engine(EngineConfig(model=kind, engine="eager", device="cpu",
                                     max_streams=capacity, max_batch=max_batch))


def server_settings(**overrides) -> ServerSettings:
    limits = overrides.pop("limits", TransportLimits(idle_timeout_s=20.0, max_audio_message_bytes=256 << 10))
    scheduler = overrides.pop("scheduler", SchedulerConfig(batch_wait_s=0.002, stall_timeout_s=20.0))
    base = dict(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, drain_grace_s=10.0,
                max_message_bytes=4 << 20, limits=limits, scheduler=scheduler)
    base.update(overrides)
    return ServerSettings(**base)


# ASR_TEST_FRONTEND_IPC=1 runs every test that uses running_server through the frontend <->
# engine process wire (server.runtime.engine_host + server.runtime.remote_scheduler, both in this process over
# a real Unix socket): the suite that `asr-server --frontends N` must pass as well.
FRONTEND_IPC = os.environ.get("ASR_TEST_FRONTEND_IPC") == "1"
SERVER_PATH = "wire" if FRONTEND_IPC else "local"  # set per test by the server_path fixture (conftest)


def through_wire() -> bool:
    return SERVER_PATH == "wire"


@contextlib.asynccontextmanager
async def running_server(engine, **settings):
    if through_wire():
        async with running_frontend_pair(engine, **settings) as server:
            yield server
        return
    server = AsrServer(engine, server_settings(**settings))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def settle(server) -> None:
    """Through a frontend, closes and counts reach the engine process a moment after the
    client saw its status: wait until they have (a no-op on an in-process server)."""
    sync = getattr(server.scheduler, "sync", None)
    if sync is not None:
        server.metrics.flush_gc()  # GC pauses recorded since the frontend last forwarded them
        await sync()


def engine_scheduler(server):
    """The scheduler that batches (its ready queue, max batch, dead reason): the server's own,
    or the engine host's behind a frontend."""
    host = getattr(server, "engine_host", None)
    return host.scheduler if host is not None else server.scheduler


def wall_time_limit_only_for(server, label: str | None = None) -> None:
    """`max_stream_seconds` bounds both a stream's audio and its wall time since it opened. A test
    of the audio limit (or a bystander stream beside a test of the wall-time limit) must not end
    by the wall clock on a loaded machine: from here on only streams whose client_label is `label`
    (none, with None) are ended by wall time. The audio limit is untouched."""
    sched = engine_scheduler(server)
    reached = sched._time_limit_reached

    def only_labelled(stream):
        if label is not None and stream.label == label:
            reached(stream)

    sched._time_limit_reached = only_labelled  # looked up when a stream opens (loop.call_later)


@contextlib.asynccontextmanager
async def running_frontend_pair(engine, **settings):
    """An engine host and one frontend AsrServer on it, in this process. The server it yields
    reports the engine host's metrics port (the endpoint that serves the whole server)."""
    import tempfile

    from server.runtime.engine_host import EngineHost
    from server.runtime.remote_scheduler import RemoteMetrics, RemoteScheduler

    s = server_settings(**settings)
    with tempfile.TemporaryDirectory(prefix="asr-ipc-") as tmp:
        host = EngineHost(engine, s.scheduler, os.path.join(tmp, "engine.sock"))
        await host.start(s.metrics_host, s.metrics_port)
        remote = RemoteScheduler(host.socket_path, name="frontend-test")
        try:
            facts = await remote.connect()
            server = AsrServer(facts, dataclasses.replace(s, metrics_port=None), scheduler=remote,
                               metrics=RemoteMetrics(remote, max_batch=facts.max_batch))
            server.engine_host = host
            await server.start()
            server.metrics_port = host.metrics_port
            remote.announce_ready()
            try:
                yield server
            finally:
                await server.stop()
        finally:
            await host.stop()


@contextlib.asynccontextmanager
async def stub_for(server: AsrServer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                         options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.SpeechRecognitionStub(channel)


# -- audio ------------------------------------------------------------------------------------
def pcm16_audio(seed: int, n: int) -> np.ndarray:
    """`n` samples of speech-like audio (client/synth_audio.py: voiced syllables, fricatives,
    pauses) as int16: a real model transcribes it into something, so exactness tests against the
    real engine compare non-empty transcripts."""
    from client.synth_audio import synth_speechlike

    out = synth_speechlike(n / RATE + 0.01, seed, RATE)[:n]
    return np.pad(out, (0, n - out.size)).astype(np.int16)


def noise_audio(seed: int, n: int) -> np.ndarray:
    """Noise with a slow envelope, as int16: for the fake engine, whose hash chain gives almost
    every chunk of it tokens (a test that needs results to pile up relies on that)."""
    rng = np.random.default_rng(seed)
    env = 0.3 + 0.2 * np.sin(np.arange(n) / 2000.0 + seed)
    return np.clip(rng.standard_normal(n) * 6000 * env, -32768, 32767).astype(np.int16)


def expected_transcript(engine, pcm: np.ndarray) -> str:
    """The transcript of `pcm` (int16) run alone through `engine` (before a server owns it). For
    the real engine and half a second of audio or more it must not be empty: an exactness test
    over an empty transcript would pass with the feature missing."""
    from tests.engine_alone import transcribe_alone

    text = transcribe_alone(engine, as_float(pcm))
    if hasattr(engine, "encoder_engine") and pcm.size >= RATE // 2:
        assert text.strip(), f"the real engine transcribed {pcm.size} samples of speech-like audio as nothing"
    return text


def as_float(pcm: np.ndarray) -> np.ndarray:
    """What the server makes of PCM16 samples (x / 32768, exact in float32)."""
    return pcm.astype(np.float32) / np.float32(32768.0)


def wav_bytes(pcm: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def split_bytes(data: bytes, rng: np.random.Generator, max_piece: int = 7000) -> list[bytes]:
    """Random-size pieces, odd sizes included: messages may split samples."""
    pieces, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(1, max_piece))
        pieces.append(data[pos:pos + n])
        pos += n
    return pieces


def config(**fields) -> pb.StreamingRecognizeRequest:
    fields.setdefault("sample_rate", RATE)
    fields.setdefault("encoding", pb.PCM16)
    return pb.StreamingRecognizeRequest(config=pb.RecognitionConfig(**fields))


def audio(data: bytes) -> pb.StreamingRecognizeRequest:
    return pb.StreamingRecognizeRequest(audio=data)


def requests_for(data: bytes, seed: int = 0, **config_fields) -> list[pb.StreamingRecognizeRequest]:
    return [config(**config_fields), *(audio(p) for p in split_bytes(data, np.random.default_rng(seed)))]


async def request_stream(requests, until: asyncio.Event | None = None):
    """The requests as a client's request stream; with `until`, the client then keeps the
    stream open, sending nothing, until the event is set."""
    for r in requests:
        yield r
    if until is not None:
        await until.wait()


async def held_open_outcome(stub, seed: int, resume: asyncio.Event) -> tuple[str, str]:
    """A stream with less than one chunk of audio (in no engine step), held open until `resume`:
    (status code name, details) of how the server ended it, ("OK", "") if it did not."""
    try:
        requests = request_stream([config(), audio(pcm16_audio(seed, 800).tobytes())], until=resume)
        _ = [r async for r in stub.StreamingRecognize(requests)]
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


async def run_stream(stub, requests) -> list[pb.StreamingRecognizeResponse]:
    """Send the requests, return every response; raises grpc.aio.AioRpcError on an error status."""
    return [r async for r in stub.StreamingRecognize(request_stream(requests))]


async def run_stream_sync(server: AsrServer | int, requests) -> list[pb.StreamingRecognizeResponse]:
    """Like run_stream, through the sync gRPC API in a thread, on an in-process server or the port
    of a server process. Use it to check error statuses: a grpc.aio client still writing when the
    server ends the call may report INTERNAL "Internal error from Core" instead of the server's
    status (grpc/grpc#36066); the sync API does not."""
    port = server if isinstance(server, int) else server.port

    def call():
        with grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            return list(pb_grpc.SpeechRecognitionStub(channel).StreamingRecognize(iter(requests)))

    return await asyncio.to_thread(call)


def final_transcript(responses) -> str:
    finals = [r.results[0] for r in responses if r.results and r.results[0].is_final]
    assert len(finals) == 1, f"expected one final, got {len(finals)}"
    assert responses[-1].results and responses[-1].results[0].is_final, "the final is the last response"
    return finals[0].transcript


ROOT = Path(__file__).resolve().parent.parent
LISTENING = r"listening on 127\.0\.0\.1:(\d+)"


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH already holds (on a GPU host, the folder
    the carried wheels were installed into)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


async def spawn_server(*args: str, env: dict | None = None, ready: str = LISTENING):
    """`python -m server.service.cli ARGS` in its own process; returns once it printed `ready` (a regex
    over its stdout lines): (process, the match, the lines it printed until then)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.service.cli", *args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=python_path(), **(env or {})),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    seen = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        if not line:
            raise AssertionError(f"server exited before listening: {seen} {(await proc.stderr.read()).decode()}")
        seen.append(line)
        if match := re.search(ready, line):
            return proc, match, seen
