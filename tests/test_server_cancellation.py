"""Streams cancelled or disconnected at random points leave no stream and no slot behind."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from proto import asr_stream_pb2_grpc as pb_grpc
from tests.engine_alone import transcribe_alone
from tests.server_harness import (
    FAKE, RATE, as_float, audio, config, final_transcript, make_engine, pcm16_audio, requests_for, run_stream,
    running_server, scrape, split_bytes, stub_for,
)

pytestmark = pytest.mark.asyncio


async def cancelled_stream(stub, channel_factory, i: int) -> str:
    """One stream that ends abnormally at a random point; returns how it ended."""
    rng = np.random.default_rng(1000 + i)
    pieces = split_bytes(pcm16_audio(i, int(rng.integers(RATE // 2, 3 * RATE))).tobytes(), rng, 4000)
    cut_after = int(rng.integers(0, len(pieces) + 2))  # pieces sent before the cut; > len: after the end
    how = ("cancel", "disconnect")[int(rng.integers(0, 2))]
    read_some = int(rng.integers(0, 4))
    cut = asyncio.Event()
    channel = channel_factory() if how == "disconnect" else None
    call_stub = pb_grpc.SpeechRecognitionStub(channel) if channel else stub

    async def requests():
        yield config(interim_results=True)
        for n, piece in enumerate(pieces):
            if n == cut_after:
                cut.set()
            yield audio(piece)
            await asyncio.sleep(0)
        cut.set()
        if cut_after <= len(pieces):
            await asyncio.Event().wait()  # keep the stream open until it is cut

    call = call_stub.StreamingRecognize(requests())
    try:
        reads = 0
        while reads < read_some and not cut.is_set():
            if await call.read() is grpc.aio.EOF:
                break
            reads += 1
        await cut.wait()
        if how == "cancel":
            call.cancel()
        else:
            await channel.close(grace=None)
        return how
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        if channel is not None:
            await channel.close()


async def test_100_random_cancellations_leave_nothing_behind():
    engine = make_engine(FAKE, capacity=128, max_batch=16, step_delay_s=0.002)
    async with running_server(engine) as server, stub_for(server) as stub:
        def new_channel():
            return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")

        outcomes = await asyncio.gather(*(cancelled_stream(stub, new_channel, i) for i in range(100)))
        assert set(outcomes) <= {"cancel", "disconnect"}, outcomes
        for _ in range(3000):  # the server hears of cancellations asynchronously
            if server.scheduler.active_streams == 0 and engine.slots_in_use() == 0:
                break
            await asyncio.sleep(0.01)
        assert server.scheduler.active_streams == 0
        assert engine.slots_in_use() == 0
        metrics = scrape(server.metrics_port)
        assert metrics["asr_active_streams"] == 0 and metrics["asr_slots_in_use"] == 0
        assert metrics.get("asr_rpcs_total{code=CANCELLED,method=StreamingRecognize}", 0) > 0
        # New streams work, and are exact.
        clips = [pcm16_audio(500 + i, RATE + 1000 * i) for i in range(4)]
        results = await asyncio.gather(*(run_stream(stub, requests_for(c.tobytes(), seed=i)) for i, c in enumerate(clips)))
    for clip, responses in zip(clips, results):
        assert final_transcript(responses) == transcribe_alone(engine, as_float(clip))
    assert engine.violations == []
