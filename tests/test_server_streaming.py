"""Streaming, unary and ListModels through a real grpc.aio server on a loopback port."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from proto import asr_stream_pb2 as pb
from tests.server_harness import (
    expected_transcript,
    ALL_ENGINE_KINDS, FAKE, RATE, as_float, audio, config, final_transcript, make_engine, pcm16_audio,
    requests_for, run_stream, running_server, stub_for, wav_bytes,
)

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("engine_kind", ALL_ENGINE_KINDS)
async def test_32_concurrent_streams_each_exact(engine_kind):
    engine = make_engine(engine_kind, capacity=40, max_batch=16)
    rng = np.random.default_rng(32)
    g = engine.geometry
    # Random lengths, plus the edges: just past a chunk boundary, ending exactly where a chunk
    # completes mid-stream (the final needs no step), shorter than a chunk, and shorter than a frame.
    lengths = [int(rng.integers(RATE // 4, 3 * RATE)) for _ in range(28)]
    lengths += [g.chunk_samples + 50, g.samples_needed(2), 1, 300]  # 1: no frame, no step
    clips = [pcm16_audio(i, n) for i, n in enumerate(lengths)]
    expected = [expected_transcript(engine, c) for c in clips]  # before the server owns the engine
    async with running_server(engine) as server, stub_for(server) as stub:
        results = await asyncio.gather(*(
            run_stream(stub, requests_for(c.tobytes(), seed=i, interim_results=bool(i % 2), client_label=f"c{i}"))
            for i, c in enumerate(clips)))
        assert server.scheduler.active_streams == 0
    for i, responses in enumerate(results):
        assert final_transcript(responses) == expected[i], f"stream {i}"
        indices = [r.chunk_index for r in responses]
        first = 0 if g.total_chunks(clips[i].size) else -1  # -1: too short for any step
        assert indices == sorted(indices) and indices[0] == first, f"stream {i}: chunk order {indices}"
    assert any(len(set(r.stream_id for r in rs)) == 1 for rs in results)
    if engine_kind == FAKE:
        assert engine.violations == [] and max(engine.batch_sizes) > 1
    assert engine.slots_in_use() == 0


async def test_interim_results_and_word_times():
    engine = make_engine(FAKE)
    clip = pcm16_audio(1, 2 * RATE)
    async with running_server(engine) as server, stub_for(server) as stub:
        with_interim = await run_stream(stub, requests_for(clip.tobytes(), interim_results=True))
        without = await run_stream(stub, requests_for(clip.tobytes(), interim_results=False))
    assert all(len(r.results) == 1 for r in with_interim)
    assert [r.chunk_index for r in with_interim] == [r.chunk_index for r in without]  # a response per chunk
    assert all(not r.results for r in without[:-1]) and without[-1].results[0].is_final
    transcripts = [r.results[0].transcript for r in with_interim]
    assert all(b.startswith(a) for a, b in zip(transcripts, transcripts[1:]))  # append-only text
    final = with_interim[-1].results[0]
    assert final.transcript == transcripts[-1] and final.stability == 1.0
    assert " ".join(w.word for w in final.words) == final.transcript
    starts = [w.start_seconds for w in final.words]
    assert starts == sorted(starts) and all(w.end_seconds > w.start_seconds for w in final.words)
    assert final.tokens and all(t.start_seconds >= 0 for t in final.tokens)
    assert with_interim[-1].audio_processed == pytest.approx(2.0, abs=0.02)
    processed = [r.audio_processed for r in with_interim]
    assert processed == sorted(processed)


async def test_wav_float32_and_raw_give_the_same_transcript():
    engine = make_engine(FAKE)
    clip = pcm16_audio(2, RATE + 777)
    expected = expected_transcript(engine, clip)
    async with running_server(engine) as server, stub_for(server) as stub:
        raw = await run_stream(stub, requests_for(clip.tobytes(), seed=1))
        wav = await run_stream(stub, requests_for(wav_bytes(clip), seed=2, sample_rate=0,
                                                  encoding=pb.AUDIO_ENCODING_UNSPECIFIED))
        # The WAV header split into one-byte messages.
        data = wav_bytes(clip)
        tiny = await run_stream(stub, [config(sample_rate=0), *(audio(data[i:i + 1]) for i in range(60)),
                                       audio(data[60:])])
        floats = await run_stream(stub, requests_for(as_float(clip).astype("<f4").tobytes(), seed=3,
                                                     encoding=pb.FLOAT32))
    for responses in (raw, wav, tiny, floats):
        assert final_transcript(responses) == expected


async def test_other_sample_rates_are_resampled():
    engine = make_engine(FAKE)
    clip8k = pcm16_audio(3, 8000 * 2)
    async with running_server(engine) as server, stub_for(server) as stub:
        raw = await run_stream(stub, requests_for(clip8k.tobytes(), sample_rate=8000))
        wav = await run_stream(stub, requests_for(wav_bytes(clip8k, rate=8000), sample_rate=0))
        stereo = np.repeat(clip8k[:, None], 2, axis=1).reshape(-1)
        two_ch = await run_stream(stub, requests_for(stereo.tobytes(), sample_rate=8000, channels=2))
    assert raw[-1].results[0].is_final and raw[-1].audio_processed == pytest.approx(2.0, abs=0.05)
    assert final_transcript(wav) == final_transcript(raw)
    assert final_transcript(two_ch) == final_transcript(raw)  # identical channels mix down to the same


async def test_empty_audio_gets_an_empty_final():
    engine = make_engine(FAKE)
    async with running_server(engine) as server, stub_for(server) as stub:
        responses = await run_stream(stub, [config()])
        also_empty = await run_stream(stub, [config(), audio(b""), audio(b"")])
    for rs in (responses, also_empty):
        assert len(rs) == 1 and rs[0].results[0].is_final and rs[0].results[0].transcript == ""
        assert rs[0].chunk_index == -1


async def test_unary_recognize_equals_streaming():
    engine = make_engine(FAKE)
    clip = pcm16_audio(4, RATE * 2 + 5)
    expected = expected_transcript(engine, clip)
    async with running_server(engine) as server, stub_for(server) as stub:
        response = await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(), audio=wav_bytes(clip)))
        raw = await stub.Recognize(pb.RecognizeRequest(
            config=pb.RecognitionConfig(sample_rate=RATE, encoding=pb.PCM16), audio=clip.tobytes()))
    assert response.result.is_final and response.result.transcript == expected
    assert raw.result.transcript == expected and response.stream_id
    assert response.audio_processed == pytest.approx(clip.size / RATE, abs=0.02)


async def test_list_models_reports_what_ran():
    engine = make_engine(FAKE, capacity=7, max_batch=3)
    async with running_server(engine) as server, stub_for(server) as stub:
        await run_stream(stub, requests_for(pcm16_audio(5, RATE).tobytes()))
        models = (await stub.ListModels(pb.ListModelsRequest())).models
    (m,) = models
    assert m.name == "fake:hash" and m.sample_rate == RATE and m.lookahead_ms == 160
    assert m.engine == "fake" and m.engine_executions["fake"] >= 2  # warm-up and at least one step
    assert m.max_streams == 7 and m.max_batch == 3 and m.random_weights and m.chunk_ms == pytest.approx(160)


async def test_model_and_lookahead_may_be_named():
    engine = make_engine(FAKE)
    clip = pcm16_audio(6, RATE)
    async with running_server(engine, model_aliases=("builtin:tiny",)) as server, stub_for(server) as stub:
        a = await run_stream(stub, requests_for(clip.tobytes(), model="fake:hash", lookahead_ms=160))
        b = await run_stream(stub, requests_for(clip.tobytes(), model="builtin:tiny", language="en"))
    assert final_transcript(a) == final_transcript(b)
