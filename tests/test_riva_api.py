"""The Riva-compatible API (nvidia.riva.asr.RivaSpeechRecognition) through a real grpc.aio server
on a loopback port, with this repository's stubs of proto/riva: one response per audio message,
transcripts equal to the native API's, word times, model listing, and every refusal."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import wave

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.riva import riva_asr_pb2 as rpb
from proto.riva import riva_asr_pb2_grpc as rpb_grpc
from server.transport.call_skeleton import TransportLimits
from server.transport.riva_convert import ResponsePacer, RivaSettings
from server.transport.riva_servicer import RIVA_SERVICE_NAME
from server.scheduling.scheduler import SchedulerConfig
from tests.riva_harness import (
    raw_config, riva_config, riva_final, riva_stream, riva_stub_for, riva_sync, stream_requests,
)
from tests.server_harness import (
    expected_transcript,
    FAKE, RATE, as_float, final_transcript, make_engine, pcm16_audio, requests_for, run_stream, running_server,
    scrape, settle, split_bytes, stub_for, wav_bytes,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.asyncio


def float_wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def wav_8bit(n: int = 1600) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(RATE)
        w.writeframes(bytes(n))
    return buf.getvalue()


def message_ends(pieces: list[bytes], header: int = 0, sample_bytes: int = 2) -> list[int]:
    """Samples the audio reached after each message (the header carries none)."""
    ends, total = [], 0
    for p in pieces:
        total += len(p)
        ends.append(max(total - header, 0) // sample_bytes)
    return ends


# -- the response pacing, alone ------------------------------------------------------------------
async def test_pacer_answers_each_message_once_its_audio_is_decoded():
    pacer = ResponsePacer()
    pacer.message(0)                  # a WAV header alone: due at once
    assert pacer.ready() == 1
    for n in (1000, 1000, 0, 3000):   # ends 1000, 2000, 2000, 5000
        pacer.message(n)
    assert pacer.progress(999) == 0
    assert pacer.progress(2560) == 3  # the empty message rides with the one before it
    assert pacer.progress(2000) == 0 and pacer.open_messages == 1  # progress never goes back
    assert pacer.finish() == 1        # the last message carries the final
    assert pacer.finish() == 1        # nothing open: the final needs a response of its own
    assert (pacer.messages, pacer.answered) == (5, 5)


# -- streaming -----------------------------------------------------------------------------------
@pytest.mark.parametrize("interim", [True, False])
async def test_one_response_per_audio_message_and_the_final_on_the_last(interim):
    engine = make_engine(FAKE)
    clip = pcm16_audio(11, 2 * RATE + 333)
    expected = expected_transcript(engine, clip)
    data = wav_bytes(clip)
    pieces = [data[:44], *split_bytes(data[44:], np.random.default_rng(3), 5000)]
    pieces[3:3] = [b"", b""]  # empty messages get their responses too
    pieces.append(b"")        # even at the very end
    async with running_server(engine) as server, riva_stub_for(server) as stub, stub_for(server) as native_stub:
        responses = await riva_stream(stub, stream_requests(riva_config(), pieces, interim, request_id="req-7"))
        native = await run_stream(native_stub, requests_for(data, seed=4, sample_rate=0))
    assert len(responses) == len(pieces)
    final = riva_final(responses)
    assert final.alternatives[0].transcript == expected == final_transcript(native)
    assert final.audio_processed == pytest.approx(clip.size / RATE, abs=1e-3)
    assert not final.alternatives[0].words  # word times only when asked for
    assert all(r.id.value == "req-7" for r in responses)
    interims = responses[:-1]
    if not interim:
        assert all(not r.results for r in interims)
        return
    ends = message_ends(pieces, header=44)
    texts = [r.results[0].alternatives[0].transcript for r in interims]
    assert all(expected.startswith(t) for t in texts) and texts == sorted(texts, key=len)
    for end, r in zip(ends, interims):  # a response goes out once its message's audio is decoded
        result = r.results[0]
        assert not result.is_final and result.stability == 1.0
        assert round(result.audio_processed * RATE) >= end


async def test_no_audio_gets_one_final_and_empty_messages_one_response_each():
    engine = make_engine(FAKE)
    async with running_server(engine) as server, riva_stub_for(server) as stub:
        none = await riva_stream(stub, stream_requests(raw_config(), []))
        empties = await riva_stream(stub, stream_requests(raw_config(), [b"", b"", b""]))
    assert len(none) == 1 and riva_final(none).alternatives[0].transcript == ""
    # Messages without audio are answered at once, so the final needs a response of its own
    # (Riva's clients accept one response more than the messages they sent).
    assert len(empties) == 4 and riva_final(empties).alternatives[0].transcript == ""


async def test_raw_split_header_float_wav_and_resampled_audio_equal_the_native_api():
    engine = make_engine(FAKE)
    clip = pcm16_audio(12, RATE + 777)
    clip8k = pcm16_audio(13, 8000 + 999)
    wav = wav_bytes(clip)
    rng = np.random.default_rng(5)
    async with running_server(engine) as server, riva_stub_for(server) as stub, stub_for(server) as native:
        cases = {
            "raw": stream_requests(raw_config(), split_bytes(clip.tobytes(), rng)),
            "wav header byte by byte": stream_requests(riva_config(), [wav[i:i + 1] for i in range(50)] + [wav[50:]]),
            "wav with LINEAR_PCM and its rate": stream_requests(raw_config(), split_bytes(wav, rng)),
            "float wav": stream_requests(riva_config(), split_bytes(float_wav_bytes(as_float(clip)), rng)),
        }
        results = {k: await riva_stream(stub, v) for k, v in cases.items()}
        resampled = await riva_stream(stub, stream_requests(raw_config(sample_rate_hertz=8000),
                                                            split_bytes(clip8k.tobytes(), rng)))
        want = final_transcript(await run_stream(native, requests_for(clip.tobytes(), seed=1)))
        want8k = final_transcript(await run_stream(native, requests_for(clip8k.tobytes(), seed=2, sample_rate=8000)))
    for name, responses in results.items():
        assert len(responses) == len(cases[name]) - 1, name
        assert riva_final(responses).alternatives[0].transcript == want, name
    assert riva_final(resampled).alternatives[0].transcript == want8k


async def test_word_time_offsets_on_finals_in_milliseconds():
    engine = make_engine(FAKE)
    clip = pcm16_audio(14, 2 * RATE)
    async with running_server(engine) as server, riva_stub_for(server) as stub, stub_for(server) as native:
        responses = await riva_stream(stub, stream_requests(raw_config(enable_word_time_offsets=True),
                                                            split_bytes(clip.tobytes(), np.random.default_rng(6))))
        offline = await stub.Recognize(rpb.RecognizeRequest(config=riva_config(enable_word_time_offsets=True),
                                                            audio=wav_bytes(clip)))
        reference = (await run_stream(native, requests_for(clip.tobytes())))[-1].results[0]
    words = riva_final(responses).alternatives[0].words
    assert words and all(not r.results[0].alternatives[0].words for r in responses[:-1])
    expected = [(w.word, round(w.start_seconds * 1000), round(w.end_seconds * 1000)) for w in reference.words]
    assert [(w.word, w.start_time, w.end_time) for w in words] == expected
    assert [(w.word, w.start_time, w.end_time) for w in offline.results[0].alternatives[0].words] == expected


async def test_recognize_equals_the_native_api():
    engine = make_engine(FAKE)
    clip = pcm16_audio(15, 2 * RATE + 5)
    expected = expected_transcript(engine, clip)
    async with running_server(engine) as server, riva_stub_for(server) as stub:
        request = rpb.RecognizeRequest(config=riva_config(), audio=wav_bytes(clip))
        request.id.value = "offline-1"
        whole = await stub.Recognize(request)
        raw = await stub.Recognize(rpb.RecognizeRequest(config=raw_config(), audio=clip.tobytes()))
        empty = await stub.Recognize(rpb.RecognizeRequest(config=raw_config(), audio=b""))
    (result,) = whole.results
    assert result.alternatives[0].transcript == expected == raw.results[0].alternatives[0].transcript
    assert result.audio_processed == pytest.approx(clip.size / RATE, abs=1e-3) and result.channel_tag == 1
    assert whole.id.value == "offline-1"
    assert empty.results[0].alternatives[0].transcript == ""


async def test_model_listing_for_online_and_offline_scripts():
    engine = make_engine(FAKE, capacity=7, max_batch=3)
    async with running_server(engine, model_aliases=("builtin:tiny",)) as server, riva_stub_for(server) as stub:
        listing = await stub.GetRivaSpeechRecognitionConfig(rpb.RivaSpeechRecognitionConfigRequest())
        by_alias = await stub.GetRivaSpeechRecognitionConfig(
            rpb.RivaSpeechRecognitionConfigRequest(model_name="builtin:tiny"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRivaSpeechRecognitionConfig(rpb.RivaSpeechRecognitionConfigRequest(model_name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "fake:hash" in err.value.details()
    assert [(c.model_name, c.parameters["type"]) for c in listing.model_config] == [
        ("fake:hash", "online"), ("fake:hash", "offline")]
    params = listing.model_config[0].parameters
    assert params["language_code"] == "en" and params["sample_rate"] == "16000" and params["engine"] == "fake"
    assert params["max_streams"] == "7" and params["max_batch"] == "3" and params["automatic_punctuation"] == "false"
    assert by_alias == listing


async def test_riva_and_native_streams_batch_together_exactly():
    engine = make_engine(FAKE, capacity=16, max_batch=8)
    clips = [pcm16_audio(20 + i, RATE + 1000 * i) for i in range(8)]
    expected = [expected_transcript(engine, c) for c in clips]
    async with running_server(engine) as server, riva_stub_for(server) as stub, stub_for(server) as native:
        calls = [riva_stream(stub, stream_requests(raw_config(), split_bytes(c.tobytes(), np.random.default_rng(i))))
                 if i % 2 else run_stream(native, requests_for(c.tobytes(), seed=i)) for i, c in enumerate(clips)]
        results = await asyncio.gather(*calls)
        # With frontend processes an RPC's count reaches the engine process's registry in a
        # message after the call ended (w.Rpc): wait for it, then it must be exactly 4.
        key = 'asr_rpcs_total{code=OK,method=Riva/StreamingRecognize}'
        await wait_for(lambda: scrape(server.metrics_port).get(key, 0) >= 4, "the Riva calls' count")
        # written-chunk latencies: every native response once; a Riva stream's responses are
        # paced by its messages, and each event counts once, on the first response that carries it
        native_responses = sum(len(r) for i, r in enumerate(results) if i % 2 == 0)
        riva_responses = sum(len(r) for i, r in enumerate(results) if i % 2)
        await wait_for(lambda: scrape(server.metrics_port).get("asr_chunk_written_seconds_count", 0)
                       >= native_responses + 4, "the written-chunk counts")
        metrics = scrape(server.metrics_port)
    for i, responses in enumerate(results):
        got = riva_final(responses).alternatives[0].transcript if i % 2 else final_transcript(responses)
        assert got == expected[i], i
    assert engine.violations == [] and max(engine.batch_sizes) > 1 and engine.slots_in_use() == 0
    assert metrics[key] == 4
    assert native_responses + 4 <= metrics["asr_chunk_written_seconds_count"] <= native_responses + riva_responses


async def test_health_and_reflection_name_the_riva_service():
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with running_server(make_engine(FAKE)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=RIVA_SERVICE_NAME))

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            (listed,) = [r async for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask())]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert RIVA_SERVICE_NAME == "nvidia.riva.asr.RivaSpeechRecognition"
    assert RIVA_SERVICE_NAME in {s.name for s in listed.list_services_response.service}


# -- refusals ------------------------------------------------------------------------------------
def _with(**fields):
    def make():
        config = riva_config()
        for name, value in fields.items():
            if name == "speech_phrases":
                config.speech_contexts.add(phrases=value, boost=20.0)
            elif name == "diarize":
                config.diarization_config.enable_speaker_diarization = True
                config.diarization_config.max_speaker_count = 3
            elif name == "endpointing":
                config.endpointing_config.stop_history = value
            elif name == "custom":
                config.custom_configuration["foo"] = "bar"
            else:
                setattr(config, name, value)
        return config
    return make


CONFIG_REFUSALS = [
    (_with(model="parakeet-1.1b"), "model 'parakeet-1.1b' is not served"),
    (_with(language_code="de-DE"), "language_code 'de-DE'"),
    (_with(encoding=2), "encoding FLAC"),
    (_with(encoding=3), "encoding MULAW"),
    (_with(encoding=4), "encoding OGGOPUS"),
    (_with(encoding=20), "encoding ALAW"),
    (_with(sample_rate_hertz=4000), "sample_rate_hertz 4000"),
    (_with(sample_rate_hertz=-16000), "sample_rate_hertz -16000"),
    (_with(audio_channel_count=2), "audio_channel_count 2"),
    (_with(enable_separate_recognition_per_channel=True), "enable_separate_recognition_per_channel"),
    (_with(max_alternatives=-1), "max_alternatives -1"),
    (_with(profanity_filter=True), "profanity_filter"),
    (_with(diarize=True), "diarization"),
    (_with(speech_phrases=["nemo", "riva"]), "speech_contexts"),
    (_with(endpointing=6000), "endpointing_config.stop_history 6000"),
    (_with(custom=True), "custom_configuration keys not supported: 'foo'"),
]


@pytest.mark.parametrize("make_config,message", CONFIG_REFUSALS, ids=[m for _, m in CONFIG_REFUSALS])
async def test_unsupported_options_are_refused_with_invalid_argument(make_config, message):
    engine = make_engine(FAKE)
    data = wav_bytes(pcm16_audio(16, RATE // 2))
    async with running_server(engine) as server:
        for method, request in (("StreamingRecognize", stream_requests(make_config(), [data])),
                                ("Recognize", rpb.RecognizeRequest(config=make_config(), audio=data))):
            with pytest.raises(grpc.RpcError) as err:
                await riva_sync(server, method, request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
            assert message in err.value.details(), (method, err.value.details())
        assert server.scheduler.active_streams == 0 and engine.slots_in_use() == 0


async def test_what_is_harmless_or_declared_is_accepted():
    """Options that change nothing here pass; punctuation and written form are served as the
    model writes (every voice-agent framework asks for punctuation, LiveKit leaves verbatim
    false), whether or not the operator declares them; the text is the model's either way."""
    engine = make_engine(FAKE)
    clip = pcm16_audio(17, RATE)
    expected = expected_transcript(engine, clip)
    harmless = riva_config(language_code="en-US", max_alternatives=3, audio_channel_count=1)
    harmless.speech_contexts.add(boost=4.0)  # the C++ client always sends one, empty without a phrases file
    harmless.diarization_config.max_speaker_count = 3  # diarization not enabled
    harmless.custom_configuration["enable_vad_endpointing"] = "true"
    harmless.custom_configuration["neural_vad.onset"] = "0.65"
    declared = riva_config(enable_automatic_punctuation=True, verbatim_transcripts=False)
    for settings, punctuates in ((RivaSettings(model_punctuates=True, model_written_form=True), "true"),
                                 (RivaSettings(), "false")):
        async with running_server(engine, riva=settings) as server, riva_stub_for(server) as stub:
            for config in (harmless, declared):
                responses = await riva_stream(stub, stream_requests(config, [wav_bytes(clip)]))
                assert riva_final(responses).alternatives[0].transcript == expected
            listing = await stub.GetRivaSpeechRecognitionConfig(rpb.RivaSpeechRecognitionConfigRequest())
        assert listing.model_config[0].parameters["automatic_punctuation"] == punctuates


def _req(**kwargs) -> rpb.StreamingRecognizeRequest:
    return rpb.StreamingRecognizeRequest(**kwargs)


def _cfg_req(config=None, interim=True) -> rpb.StreamingRecognizeRequest:
    return _req(streaming_config=rpb.StreamingRecognitionConfig(config=config or riva_config(), interim_results=interim))


STREAM_REFUSALS = [
    ("audio first", [_req(audio_content=b"\0\0" * 100)], "first request must carry the streaming_config"),
    ("nothing", [], "ended before a streaming_config"),
    ("config twice", [_cfg_req(raw_config()), _req(audio_content=b"\0\0" * 100), _cfg_req()], "sent twice"),
    ("runtime_config", [_cfg_req(raw_config()), _req(audio_content=b"\0\0", runtime_config={"k": "v"})],
     "runtime_config"),
    ("raw audio without a rate", [_cfg_req(), _req(audio_content=b"\1\0" * 800)], "sample_rate_hertz is required"),
    ("WAV rate differs", [_cfg_req(riva_config(sample_rate_hertz=8000)),
                          _req(audio_content=wav_bytes(pcm16_audio(1, 1600)))], "WAV header says 16000"),
    ("float WAV as LINEAR_PCM", [_cfg_req(riva_config(encoding=1)),
                                 _req(audio_content=float_wav_bytes(np.zeros(1600, np.float32)))],
     "encoding is LINEAR_PCM"),
    ("stereo WAV", [_cfg_req(), _req(audio_content=wav_bytes(pcm16_audio(1, 3200), channels=2))], "2 channels"),
    ("8-bit WAV", [_cfg_req(), _req(audio_content=wav_8bit())], "8-bit"),
    ("partial sample at the end", [_cfg_req(raw_config()), _req(audio_content=b"\1\0\2")], "partial"),
    ("message too large", [_cfg_req(raw_config()), _req(audio_content=bytes(300 << 10))], "exceeds the limit"),
]


@pytest.mark.parametrize("requests,message", [c[1:] for c in STREAM_REFUSALS], ids=[c[0] for c in STREAM_REFUSALS])
async def test_bad_streams_end_with_invalid_argument(requests, message):
    engine = make_engine(FAKE)
    async with running_server(engine) as server:
        with pytest.raises(grpc.RpcError) as err:
            await riva_sync(server, "StreamingRecognize", requests)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert message in err.value.details()
        await settle(server)
        assert engine.slots_in_use() == 0
        metrics = scrape(server.metrics_port)
    assert metrics["asr_errors_total{code=INVALID_ARGUMENT,method=Riva/StreamingRecognize}"] == 1


async def test_bad_offline_audio_is_invalid_argument():
    engine = make_engine(FAKE)
    async with running_server(engine) as server:
        for config, audio, message in (
                (riva_config(), b"\1\0" * 800, "sample_rate_hertz is required"),
                (riva_config(sample_rate_hertz=22050), wav_bytes(pcm16_audio(2, 1600)), "WAV header says 16000"),
                (riva_config(), wav_bytes(pcm16_audio(2, 1600))[:30], "ended inside the WAV header")):
            with pytest.raises(grpc.RpcError) as err:
                await riva_sync(server, "Recognize", rpb.RecognizeRequest(config=config, audio=audio))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


async def test_idle_client_and_cancelled_stream_free_their_slots():
    engine = make_engine(FAKE)
    limits = TransportLimits(idle_timeout_s=0.5, max_audio_message_bytes=256 << 10)
    async with running_server(engine, limits=limits) as server, riva_stub_for(server) as stub:
        def idle():
            yield stream_requests(raw_config(), [])[0]
            yield rpb.StreamingRecognizeRequest(audio_content=b"\0\0" * 1600)
            time.sleep(2.0)  # longer than the idle timeout

        with pytest.raises(grpc.RpcError) as err:
            await riva_sync(server, "StreamingRecognize", idle())
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle timeout" in err.value.details()

        release = asyncio.Event()

        async def requests():
            yield stream_requests(raw_config(), [])[0]
            for _ in range(10):
                yield rpb.StreamingRecognizeRequest(audio_content=pcm16_audio(1, 1600).tobytes())
            await release.wait()  # never: the client cancels first

        call = stub.StreamingRecognize(requests())
        first = await call.read()
        assert first.results and not first.results[0].is_final
        call.cancel()
        for _ in range(200):
            if server.scheduler.active_streams == 0:
                break
            await asyncio.sleep(0.01)
        assert server.scheduler.active_streams == 0 and engine.slots_in_use() == 0


async def test_a_client_that_stops_reading_loses_its_place_and_gets_an_error():
    """Responses wait on gRPC flow control while the client does not read; once the stream
    fails behind them, the call frees its place at once and ends with an error status."""
    engine = make_engine(FAKE)
    scheduler = SchedulerConfig(batch_wait_s=0.002, response_buffer=4, max_pending_seconds=1.0, stall_timeout_s=1.0)
    async with running_server(engine, scheduler=scheduler) as server:
        stop = threading.Event()
        chunk = pcm16_audio(3, 1600).tobytes()

        def requests():
            yield stream_requests(raw_config(), [])[0]
            for _ in range(3000):  # 5 minutes of audio, far more than the buffers hold
                if stop.is_set():
                    return
                yield rpb.StreamingRecognizeRequest(audio_content=chunk)

        # A receive window of ~1 KiB: a few unread responses fill it.
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                        options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
        call = rpb_grpc.RivaSpeechRecognitionStub(channel).StreamingRecognize(requests())
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not server.scheduler.active_streams:
                assert loop.time() < deadline, "the stream did not open"
                await asyncio.sleep(0.01)
            while server.scheduler.active_streams:  # freed while the client still reads nothing
                assert loop.time() < deadline, "a client that does not read kept its place"
                await asyncio.sleep(0.01)
            # With frontend processes the frontend forgets the stream first; the engine process
            # frees the slot when the frontend's message arrives (a busy frontend spaces its frames
            # up to a millisecond apart) and any step holding the slot has returned.
            await wait_for(lambda: engine.slots_in_use() == 0, "the slot freed", timeout_s=5.0)
            stop.set()

            def read_all():
                responses = []
                try:
                    for r in call:
                        responses.append(r)
                except grpc.RpcError as exc:
                    return responses, exc.code()
                return responses, grpc.StatusCode.OK

            responses, code = await asyncio.to_thread(read_all)
        finally:
            stop.set()
            channel.close()
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED), code
    assert responses and not any(r.results[0].is_final for r in responses if r.results)


async def test_undecodable_first_request_is_invalid_argument():
    """Bytes that are no StreamingRecognizeRequest get INVALID_ARGUMENT naming the message,
    as on the native API (not UNKNOWN)."""
    engine = make_engine(FAKE)
    async with running_server(engine) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            method = channel.stream_stream(f"/{RIVA_SERVICE_NAME}/StreamingRecognize", request_serializer=None,
                                           response_deserializer=rpb.StreamingRecognizeResponse.FromString)
            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(lambda: list(method(iter([b"\x0f\xff\xff\xff"]), timeout=30)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "StreamingRecognizeRequest" in err.value.details()
        assert engine.slots_in_use() == 0
