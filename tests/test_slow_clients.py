"""Slow and stuck clients on a real server on loopback (fake engine): a client that stops
reading is bounded and then refused with RESOURCE_EXHAUSTED, one that goes quiet times out,
one that never half-closes is ended at the maximum duration with a final result; the streams
beside them are exact, and every slot comes back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import grpc
import pytest

from proto import asr_stream_pb2_grpc as pb_grpc
from server.transport.call_skeleton import TransportLimits
from server.scheduling.scheduler import SchedulerConfig
from server.transport.call_skeleton import END_REASON_KEY
from tests.server_harness import (
    expected_transcript,
    FAKE, RATE, audio, config, final_transcript, make_engine, pcm16_audio, requests_for, run_stream,
    noise_audio, running_server, scrape, stub_for, wall_time_limit_only_for,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.asyncio
# A client whose receive window is tiny: a few responses fill it when it does not read.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="stuck-client")


def record_streams(server) -> list:
    """The scheduler state of every stream the server opens from now on."""
    states = []
    original = server.scheduler.open_stream

    def open_stream(*args, **kwargs):
        handle = original(*args, **kwargs)
        states.append(handle.state)
        return handle

    server.scheduler.open_stream = open_stream
    return states


class NonReadingClient:
    """A sync gRPC call whose responses nobody reads until `read_all` (the sync API receives
    only when iterated); its requests are sent from gRPC's own thread, until `stop_sending`."""

    def __init__(self, port: int, requests, keep_open: bool):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=SMALL_WINDOW)
        self._stop = threading.Event()
        self.sent = 0

        def generate():
            for r in requests:
                if self._stop.is_set():
                    return
                yield r
                self.sent += 1
            if keep_open:
                self._stop.wait()  # never half-closes on its own

        self.call = pb_grpc.SpeechRecognitionStub(self.channel).StreamingRecognize(generate())

    def stop_sending(self) -> None:
        self._stop.set()

    def read_all(self) -> tuple[list, grpc.StatusCode, str]:
        responses = []
        try:
            for r in self.call:
                responses.append(r)
        except grpc.RpcError as exc:
            return responses, exc.code(), exc.details() or ""
        finally:
            self.stop_sending()
            self.channel.close()
        return responses, grpc.StatusCode.OK, ""


async def exact_bystander(stub, engine, seed: int, n: int = 2 * RATE):
    clip = pcm16_audio(seed, n)
    responses = await run_stream(stub, requests_for(clip.tobytes(), seed=seed, interim_results=True))
    return final_transcript(responses), clip


async def test_a_client_that_stops_reading_is_bounded_then_resource_exhausted():
    engine = make_engine(FAKE, capacity=8)
    reference = make_engine(FAKE)
    scheduler = SchedulerConfig(batch_wait_s=0.002, response_buffer=4, max_pending_seconds=1.0, stall_timeout_s=20.0)
    message = 1600 * 2  # 0.1 s of PCM16 per message
    # far more than the bounds hold; noise, so that the fake engine gives nearly every chunk a
    # result and the results pile up before the audio does
    data = noise_audio(5, 60 * RATE).tobytes()
    requests = [config(interim_results=True), *(audio(data[p:p + message]) for p in range(0, len(data), message))]
    async with running_server(engine, scheduler=scheduler) as server, stub_for(server) as stub:
        states = record_streams(server)
        stuck = await asyncio.to_thread(NonReadingClient, server.port, requests, True)
        await wait_for(lambda: states and states[0].status.terminal, "the stuck stream to be failed")
        # The server let go of the stream while the client still reads nothing.
        await wait_for(lambda: server.scheduler.active_streams == 0 and engine.slots_in_use() == 0, "the slot back")
        state = states[0]
        # Memory stayed bounded: results and audio held for the stream never passed their limits
        # (results by the one from a step already running and the failure itself; audio by at
        # most one message, which arrives before the check).
        assert state.peak_events <= scheduler.response_buffer + 2
        assert state.peak_pending <= scheduler.max_pending_seconds * RATE + message // 2
        assert stuck.sent < len(requests) - 1  # the client was held back, not buffered without bound
        # Others are unaffected while the stuck call is still unread.
        transcript, clip = await exact_bystander(stub, engine, 77)
        assert transcript == expected_transcript(reference, clip)
        responses, code, details = await asyncio.get_running_loop().run_in_executor(_THREADS, stuck.read_all)
        metrics = scrape(server.metrics_port)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "the client is not reading responses" in details and "limits: 4 results" in details
    assert 0 < len(responses) < len(requests)
    assert metrics["asr_errors_total{code=RESOURCE_EXHAUSTED,method=StreamingRecognize}"] == 1
    assert engine.slots_in_use() == 0 and engine.violations == []


async def test_a_client_that_neither_reads_nor_sends_times_out():
    engine = make_engine(FAKE, capacity=8)
    data = pcm16_audio(6, 5 * RATE).tobytes()
    requests = [config(interim_results=True), *(audio(data[p:p + 3200]) for p in range(0, len(data), 3200))]
    limits = TransportLimits(idle_timeout_s=0.5, max_audio_message_bytes=256 << 10)
    async with running_server(engine, limits=limits) as server:
        states = record_streams(server)
        stuck = await asyncio.to_thread(NonReadingClient, server.port, requests, True)
        await wait_for(lambda: states and states[0].status.terminal, "the quiet stream to end")
        await wait_for(lambda: server.scheduler.active_streams == 0 and engine.slots_in_use() == 0, "the slot back")
        responses, code, details = await asyncio.get_running_loop().run_in_executor(_THREADS, stuck.read_all)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
    assert "idle timeout: no request for 0.5 s" in details or "read no response for 0.5 s" in details
    assert engine.slots_in_use() == 0


async def test_a_client_that_never_half_closes_gets_a_final_at_the_maximum_duration():
    engine = make_engine(FAKE, capacity=8)
    clip = pcm16_audio(7, RATE // 2)
    expected = expected_transcript(engine, clip)
    never = asyncio.Event()

    async def requests():
        yield config(interim_results=True, client_label="limited")
        yield audio(clip.tobytes())
        await never.wait()  # keeps the stream open, sending nothing

    async with running_server(engine, scheduler=SchedulerConfig(batch_wait_s=0.002, max_stream_seconds=1.0)) as server, \
            stub_for(server) as stub:
        # Only this stream meets the wall-time limit: the bystander's 0.75 s of audio must not be
        # cut by the clock when a loaded machine takes over a second to send it.
        wall_time_limit_only_for(server, "limited")
        bystander = asyncio.create_task(exact_bystander(stub, engine, 78, RATE * 3 // 4))
        call = stub.StreamingRecognize(requests())
        responses = [r async for r in call]
        trailing = dict(await call.trailing_metadata())
        assert await call.code() == grpc.StatusCode.OK
        transcript, other = await bystander
        never.set()
        await wait_for(lambda: server.scheduler.active_streams == 0 and engine.slots_in_use() == 0, "the slot back")
    assert final_transcript(responses) == expected
    assert "maximum duration of 1 s since it opened" in trailing[END_REASON_KEY]
    assert transcript == expected_transcript(engine, other)
