"""Every refusal has the fitting status code and a message that says what was wrong, and the
streams running beside it are unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import grpc
import numpy as np
import pytest

from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from proto.riva import riva_asr_pb2_grpc as rpb_grpc
from server.scheduling.scheduler import SchedulerConfig
from server.transport.call_skeleton import END_REASON_KEY, TransportLimits
from tests.riva_harness import raw_config, riva_final, stream_requests
from tests.engine_alone import transcribe_alone
from tests.server_harness import (
    FAKE, RATE, as_float, audio, config, final_transcript, make_engine, pcm16_audio, request_stream, requests_for,
    run_stream, run_stream_sync, running_server, scrape, stub_for, wall_time_limit_only_for, wav_bytes,
)

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def bystander(stub, engine, seed: int = 99):
    """A good stream that is half sent while the body runs, and must end exact afterwards."""
    clip = pcm16_audio(seed, 2 * RATE)
    expected = transcribe_alone(engine, as_float(clip)) if not engine.slots_in_use() else None
    opened = asyncio.Event()
    resume = asyncio.Event()
    data = clip.tobytes()

    async def requests():
        yield config(interim_results=True)
        yield audio(data[:len(data) // 2 + 1])  # an odd split: half a sample waits on the server
        await resume.wait()
        yield audio(data[len(data) // 2 + 1:])

    async def run():
        call = stub.StreamingRecognize(requests())
        first = await call.read()  # a first result: the stream is open and running on the server
        opened.set()
        responses = [first]
        while (r := await call.read()) is not grpc.aio.EOF:
            responses.append(r)
        return responses

    task = asyncio.create_task(run())
    await asyncio.wait({task, asyncio.ensure_future(opened.wait())}, return_when=asyncio.FIRST_COMPLETED)
    assert opened.is_set(), task.exception() if task.done() else "bystander did not open"
    yield
    resume.set()
    responses = await task
    if expected is not None:
        assert final_transcript(responses) == expected


def wav_header_8bit() -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, RATE, RATE, 1, 8)
    return b"RIFF" + struct.pack("<I", 36 + 100) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", 100) + bytes(100)


PCM = pcm16_audio(7, RATE // 2).tobytes()
BAD_STREAMS = {
    "missing config": ([], "ended before a config"),
    "empty first request": ([pb.StreamingRecognizeRequest(), audio(PCM)], "first request must carry the config"),
    "audio before config": ([audio(PCM), config()], "first request must carry the config"),
    "config twice": ([config(), audio(PCM), config()], "config sent twice"),
    "unknown model": ([config(model="whisper"), audio(PCM)], "'whisper' is not served"),
    "wrong lookahead": ([config(lookahead_ms=560), audio(PCM)], "lookahead_ms 560 is not served"),
    "sample rate too low": ([config(sample_rate=100), audio(PCM)], "sample_rate 100 Hz is outside"),
    "sample rate too high": ([config(sample_rate=10_000_000), audio(PCM)], "sample_rate 10000000 Hz is outside"),
    "raw audio without rate": ([config(sample_rate=0), audio(PCM)], "sample_rate is required for raw audio"),
    "unknown encoding": ([config(encoding=7), audio(PCM)], "encoding 7 is unknown"),
    "prompt": ([config(prompt="hello"), audio(PCM)], "takes no prompt"),
    "unsupported language": ([config(language="xx"), audio(PCM)], "language 'xx' is not supported"),
    "label too long": ([config(client_label="x" * 200)], "client_label must be at most 128"),
    "too many channels": ([config(channels=99)], "channels 99 is outside"),
    "WAV rate contradicts config": ([config(sample_rate=8000), audio(wav_bytes(pcm16_audio(1, 800)))],
                                    "WAV header says 16000 Hz"),
    "WAV encoding contradicts config": ([config(sample_rate=0, encoding=pb.FLOAT32), audio(wav_bytes(pcm16_audio(1, 800)))],
                                        "WAV header says PCM16"),
    "8-bit WAV": ([config(sample_rate=0), audio(wav_header_8bit())], "8-bit samples is not supported"),
    "truncated WAV header": ([config(sample_rate=0), audio(wav_bytes(pcm16_audio(1, 10))[:30])],
                             "ended inside the WAV header"),
    "PCM16 ends on half a sample": ([config(), audio(PCM[:1001]), audio(PCM[1001:2001])],
                                    "ended on a partial PCM16 sample: 1 trailing byte"),
    "FLOAT32 ends on a partial sample": ([config(encoding=pb.FLOAT32), audio(bytes(4 * 100 + 3))],
                                         "partial FLOAT32 sample: 3 trailing byte"),
    "FLOAT32 NaN": ([config(encoding=pb.FLOAT32), audio(np.full(100, np.nan, dtype="<f4").tobytes())],
                    "NaN or infinite"),
    "oversized audio message": ([config(), audio(bytes(300 << 10))], "exceeds the limit of 262144 bytes"),
}


async def test_every_bad_stream_is_invalid_argument_and_bystanders_are_unaffected():
    engine = make_engine(FAKE, capacity=8)
    async with running_server(engine) as server, stub_for(server) as stub:
        for name, (requests, message) in BAD_STREAMS.items():
            async with bystander(stub, engine, seed=len(name)):
                with pytest.raises(grpc.RpcError) as err:
                    await run_stream_sync(server, requests)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert message in err.value.details(), f"{name}: {err.value.details()}"
        metrics = scrape(server.metrics_port)
        assert server.scheduler.active_streams == 0
    assert metrics["asr_errors_total{code=INVALID_ARGUMENT,method=StreamingRecognize}"] == len(BAD_STREAMS)
    assert engine.slots_in_use() == 0 and engine.violations == []


async def test_a_refusal_reaches_a_half_closed_client_while_a_response_is_in_flight():
    """"config twice" after half a second of audio: the stream fails while the response to its
    first chunk is being written to a client that has already half-closed. The status must go
    out after that write; sent beside it (before the fix) the sync client waited forever in
    about one call in four."""
    engine = make_engine(FAKE, capacity=8)
    requests = [config(), audio(PCM), config()]

    def call(port: int) -> tuple[str, str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                list(pb_grpc.SpeechRecognitionStub(channel).StreamingRecognize(iter(requests), timeout=5))
            except grpc.RpcError as exc:
                return exc.code().name, exc.details() or ""
        return "OK", ""

    async with running_server(engine) as server:
        outcomes = [await asyncio.to_thread(call, server.port) for _ in range(40)]
    assert all(code == "INVALID_ARGUMENT" and "config sent twice" in details for code, details in outcomes), \
        sorted(set(outcomes))
    assert engine.slots_in_use() == 0


async def test_bad_unary_requests():
    engine = make_engine(FAKE)
    async with running_server(engine) as server, stub_for(server) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(sample_rate=RATE), audio=b"\x00" * 3))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "partial PCM16" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(model="nope"), audio=b""))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not served" in err.value.details()


async def test_stream_limit_is_resource_exhausted_then_slots_come_back():
    engine = make_engine(FAKE, capacity=2)
    async with running_server(engine) as server, stub_for(server) as stub:
        async with bystander(stub, engine, seed=1), bystander(stub, engine, seed=2):
            with pytest.raises(grpc.RpcError) as err:
                await run_stream_sync(server, requests_for(PCM))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "all 2 stream slots are in use" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(sample_rate=RATE), audio=PCM))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        responses = await run_stream(stub, requests_for(PCM))
        assert responses[-1].results[0].is_final
    assert engine.slots_in_use() == 0


async def test_message_over_the_transport_limit_is_resource_exhausted():
    engine = make_engine(FAKE)
    async with running_server(engine, max_message_bytes=1 << 20,
                              limits=TransportLimits(max_audio_message_bytes=1 << 20)) as server, stub_for(server) as stub:
        async with bystander(stub, engine):
            with pytest.raises(grpc.RpcError) as err:
                await run_stream_sync(server, [config(), audio(bytes(2 << 20))])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()
    assert engine.slots_in_use() == 0


async def test_idle_client_gets_deadline_exceeded():
    engine = make_engine(FAKE)
    never = asyncio.Event()
    stalled = request_stream([config(), audio(PCM[:3200])], until=never)  # the client goes quiet without closing

    async with running_server(engine, limits=TransportLimits(idle_timeout_s=0.3)) as server, stub_for(server) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [r async for r in stub.StreamingRecognize(stalled)]
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle timeout: no request for 0.3 s" in err.value.details()
        assert server.scheduler.active_streams == 0
    assert engine.slots_in_use() == 0


async def test_client_deadline_is_honoured_and_frees_the_slot():
    engine = make_engine(FAKE)
    never = asyncio.Event()

    async with running_server(engine) as server, stub_for(server) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [r async for r in stub.StreamingRecognize(request_stream([config(), audio(PCM)], until=never),
                                                          timeout=0.5)]
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(2000):  # the server learns of the deadline asynchronously
            if server.scheduler.active_streams == 0 and engine.slots_in_use() == 0:
                break
            await asyncio.sleep(0.01)
        assert server.scheduler.active_streams == 0 and engine.slots_in_use() == 0
        assert (await run_stream(stub, requests_for(PCM)))[-1].results[0].is_final


async def test_max_stream_duration_ends_a_stream_with_a_final_and_refuses_a_longer_file():
    engine = make_engine(FAKE)
    clip = pcm16_audio(3, 2 * RATE)
    expected = transcribe_alone(engine, as_float(clip[:RATE]))
    async with running_server(engine, scheduler=SchedulerConfig(max_stream_seconds=1.0)) as server, \
            stub_for(server) as stub:
        wall_time_limit_only_for(server, None)  # the audio limit is under test; load must not end it first
        def stream():
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = pb_grpc.SpeechRecognitionStub(channel).StreamingRecognize(iter(requests_for(clip.tobytes())))
                responses = list(call)
                return responses, call.code(), dict(call.trailing_metadata())

        responses, code, trailing = await asyncio.to_thread(stream)
        assert code == grpc.StatusCode.OK and final_transcript(responses) == expected
        assert "maximum duration of 1 s of audio" in trailing[END_REASON_KEY]

        # The Riva API ends it the same way: its final, OK, and the same trailer (one call skeleton).
        def riva_stream_sync():
            pieces = [clip.tobytes()[i:i + 6400] for i in range(0, clip.nbytes, 6400)]
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = rpb_grpc.RivaSpeechRecognitionStub(channel).StreamingRecognize(
                    iter(stream_requests(raw_config(), pieces)))
                responses = list(call)
                return responses, call.code(), dict(call.trailing_metadata())

        responses, code, trailing = await asyncio.to_thread(riva_stream_sync)
        assert code == grpc.StatusCode.OK and riva_final(responses).alternatives[0].transcript == expected
        assert "maximum duration of 1 s of audio" in trailing[END_REASON_KEY]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(sample_rate=RATE), audio=clip.tobytes()))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "maximum duration of 1 s" in err.value.details()
    assert engine.slots_in_use() == 0


async def test_engine_failure_is_internal_and_the_server_goes_on():
    engine = make_engine(FAKE)
    async with running_server(engine) as server, stub_for(server) as stub:
        engine.fail_next_steps = 2  # the attempt and its retry
        with pytest.raises(grpc.RpcError) as err:
            await run_stream_sync(server, requests_for(PCM))
        assert err.value.code() == grpc.StatusCode.INTERNAL and "engine step failed" in err.value.details()
        assert (await run_stream(stub, requests_for(PCM)))[-1].results[0].is_final
    assert engine.slots_in_use() == 0
