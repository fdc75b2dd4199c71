"""Utterances through a real server on loopback (the fake engine: a chunk of exact zeros after
speech ends an utterance), native and Riva APIs, in process and through the frontend wire.

- Native: a stream with `endpointing` gets one final per utterance, in order, with its index,
  times and end reason; interims carry only the open utterance; `end_utterance` gets the final
  of what was sent in whole chunks, at once.
- Riva: endpointing is on by default; each utterance's final arrives mid-stream on a response
  (every audio message still gets its response); Recognize returns one result per utterance.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from proto import asr_stream_pb2 as pb
from proto.riva import riva_asr_pb2 as rpb
from tests.engine_alone import transcribe_alone
from tests.riva_harness import raw_config, riva_stream, riva_stub_for, stream_requests
from tests.server_harness import (FAKE, as_float, audio, config, make_engine, run_stream, running_server,
                                  split_bytes, stub_for)

pytestmark = pytest.mark.asyncio


def call_pcm(g, utterances: int, speech_chunks: int = 5, pause_chunks: int = 3, seed: int = 0) -> np.ndarray:
    """PCM16: speech-like noise in chunk-aligned runs, separated by runs of exact zeros."""
    rng = np.random.default_rng(seed)
    parts = [np.full(g.samples_needed(0), 500, np.int16)]
    for _ in range(utterances):
        parts.append((rng.standard_normal(speech_chunks * g.chunk_samples) * 3000 + 300).astype(np.int16))
        parts.append(np.zeros(pause_chunks * g.chunk_samples, np.int16))
    return np.concatenate(parts)


def squeeze(text: str) -> str:
    return text.replace(" ", "")


async def test_native_endpointing_one_final_per_utterance(server_path):
    engine = make_engine(FAKE)
    pcm = call_pcm(engine.geometry, 3)
    whole = transcribe_alone(engine, as_float(pcm))
    requests = [config(interim_results=True, endpointing=pb.EndpointingConfig(stop_history_ms=320)),
                *(audio(p) for p in split_bytes(pcm.tobytes(), np.random.default_rng(1)))]
    async with running_server(engine) as server, stub_for(server) as stub:
        responses = await run_stream(stub, requests)
    finals = [r for resp in responses for r in resp.results if r.is_final]
    assert len(finals) >= 3
    assert [f.utterance_index for f in finals] == list(range(len(finals)))
    assert [f.end_reason for f in finals[:3]] == ["endpoint"] * 3
    assert squeeze("".join(f.transcript for f in finals)) == squeeze(whole)
    assert all(f.words for f in finals if f.transcript)
    for a, b in zip(finals, finals[1:]):
        assert a.end_seconds <= b.start_seconds or not b.transcript
    # Interims: the open utterance only, whose index is the next final's.
    seen_final = 0
    for resp in responses:
        for r in resp.results:
            if r.is_final:
                seen_final += 1
            else:
                assert r.utterance_index == seen_final
    assert engine.slots_in_use() == 0


async def test_native_end_utterance_gets_the_final_now(server_path):
    engine = make_engine(FAKE)
    g = engine.geometry
    pcm = (np.random.default_rng(4).standard_normal(g.samples_needed(9)) * 3000 + 200).astype(np.int16)
    spoken = pcm[: g.samples_needed(3)]  # four whole chunks: all complete when the request comes
    got_final = asyncio.Event()

    async def requests():
        yield config(endpointing=pb.EndpointingConfig())
        yield audio(spoken.tobytes())
        yield pb.StreamingRecognizeRequest(end_utterance=True)
        await asyncio.wait_for(got_final.wait(), 30)
        yield audio(pcm[g.samples_needed(3):].tobytes())

    responses = []
    async with running_server(engine) as server, stub_for(server) as stub:
        async for response in stub.StreamingRecognize(requests()):
            responses.append(response)
            if any(r.is_final for r in response.results):
                got_final.set()
    finals = [r for resp in responses for r in resp.results if r.is_final]
    assert finals[0].end_reason == "client" and finals[0].utterance_index == 0
    assert finals[0].transcript == transcribe_alone(engine, as_float(spoken))
    # The rest of the audio is the next utterance, closed by the end of the audio.
    assert len(finals) == 2 and finals[1].end_reason == "end_of_audio" and finals[1].utterance_index == 1
    assert finals[1].transcript and finals[1].start_seconds >= finals[0].end_seconds
    assert engine.slots_in_use() == 0


async def test_riva_finals_per_utterance_mid_stream_and_a_response_per_message(server_path):
    engine = make_engine(FAKE)
    pcm = call_pcm(engine.geometry, 3, seed=2)
    whole = transcribe_alone(engine, as_float(pcm))
    cfg = raw_config()
    cfg.endpointing_config.stop_history = 320
    pieces = split_bytes(pcm.tobytes(), np.random.default_rng(3), max_piece=3000)
    async with running_server(engine) as server, riva_stub_for(server) as stub:
        responses = await riva_stream(stub, stream_requests(cfg, pieces))
        recognized = await stub.Recognize(rpb.RecognizeRequest(config=raw_config(), audio=pcm.tobytes()))
    finals = [r for resp in responses for r in resp.results if r.is_final]
    assert len(finals) >= 3
    first_final_at = next(i for i, resp in enumerate(responses) if any(r.is_final for r in resp.results))
    assert first_final_at < len(pieces) // 2  # the first utterance's final came mid-stream
    assert squeeze("".join(f.alternatives[0].transcript for f in finals)) == squeeze(whole)
    assert len(responses) >= len(pieces)  # every audio message answered
    assert len(recognized.results) >= 3
    assert squeeze("".join(r.alternatives[0].transcript for r in recognized.results)) == squeeze(whole)
    assert engine.slots_in_use() == 0
