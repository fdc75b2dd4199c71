"""Client SDK and asr-client with utterances (endpointing, end_utterance) against a real server
on loopback with the fake engine, whose endpointer is exact: a chunk with any non-zero sample
is speech, a chunk of exact zeros after speech ends the utterance (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

from client.audio_source import array_chunks
from client.sdk import END_UTTERANCE, AsrClient, AsyncAsrClient, Endpointing, StreamOptions
from tests.server_harness import FAKE, RATE, make_engine, pcm16_audio, running_server, wav_bytes
from tests.test_client import run_cli

pytestmark = pytest.mark.asyncio
CHUNK = 2560          # the fake engine's chunk at 160 ms
PAUSE = 3 * CHUNK     # long enough to hold a whole chunk of zeros whatever the alignment
ENDPOINTING = StreamOptions(endpointing=Endpointing(stop_history_ms=320))


def call_audio(seed: int, speech_samples: list[int]) -> np.ndarray:
    """Speech (non-zero noise) of the given lengths, each followed by a pause of zeros."""
    parts = []
    for i, n in enumerate(speech_samples):
        clip = pcm16_audio(seed + i, n)
        clip[clip == 0] = 1  # no sample of speech is silent
        parts += [clip, np.zeros(PAUSE, dtype=np.int16)]
    return np.concatenate(parts)


def squeeze(text: str) -> str:
    return "".join(text.split())


async def test_endpointing_gives_one_final_per_utterance_and_plain_streams_keep_one_final(tmp_path):
    speech = [RATE, RATE // 2 + 700, RATE + 1300]
    clip = call_audio(40, speech)
    path = tmp_path / "call.wav"
    path.write_bytes(wav_bytes(clip))
    async with running_server(make_engine(FAKE)) as server:
        target = f"127.0.0.1:{server.port}"

        def use_client():
            with AsrClient(target) as client:
                plain = list(client.stream(array_chunks(clip, RATE, 100), sample_rate=RATE))
                split = list(client.stream(array_chunks(clip, RATE, 100), sample_rate=RATE, options=ENDPOINTING))
                return plain, split, client.transcribe_file(path), client.transcribe_file(path, options=ENDPOINTING)

        plain, split, whole, joined = await asyncio.to_thread(use_client)
        async with AsyncAsrClient(target) as client:
            finals_async = await client.transcribe_utterances(path, options=ENDPOINTING)
    # Without endpointing: one final, at the end, as before.
    assert sum(len(r.finals) for r in plain) == 1 and plain[-1].is_final and plain[-1].result.end_reason == "end_of_audio"
    assert whole.transcript == plain[-1].result.transcript
    # With it: the speaker's stops end the utterances while the stream is open.
    finals = [f for r in split for f in r.finals]
    assert [f.utterance_index for f in finals] == list(range(len(finals)))
    assert [f.end_reason for f in finals[:len(speech)]] == ["endpoint"] * len(speech)
    ends = np.cumsum([n + PAUSE for n in speech]) / RATE  # each pause's end
    for k, f in enumerate(finals[:len(speech)]):
        assert f.start < f.end <= ends[k], (k, f)
    assert all(r.chunk_index >= 0 for r in split)
    assert any(r.finals for r in split[:-1])  # finals before the stream's last response
    # Nothing lost or doubled: the finals' texts are the plain stream's text.
    assert squeeze(" ".join(f.transcript for f in finals)) == squeeze(whole.transcript) != ""
    assert squeeze(joined.transcript) == squeeze(whole.transcript)
    assert [(f.transcript, f.end_reason) for f in finals_async] == [(f.transcript, f.end_reason) for f in finals]
    assert len(joined.words) == sum(len(f.words) for f in finals)


async def test_end_utterance_closes_the_open_utterance(tmp_path):
    first, second = pcm16_audio(50, RATE), pcm16_audio(51, RATE // 2)
    async with running_server(make_engine(FAKE)) as server:
        target = f"127.0.0.1:{server.port}"

        def use_sync():
            with AsrClient(target) as client:
                chunks = [*array_chunks(first, RATE, 160), END_UTTERANCE, *array_chunks(second, RATE, 160)]
                in_stream = list(client.stream(chunks, sample_rate=RATE))
                with client.live(sample_rate=RATE) as call:
                    for c in array_chunks(first, RATE, 160):
                        call.send(c)
                    call.end_utterance()
                    got = []
                    for response in call:
                        got.append(response)
                        if response.finals:
                            break  # the first utterance's final arrived while the stream is open
                    call.send(second)
                    call.close()
                    got += list(call)
                return in_stream, got

        in_stream, live_sync = await asyncio.to_thread(use_sync)
        async with AsyncAsrClient(target) as client:
            async with client.live(sample_rate=RATE, options=StreamOptions(interim=True)) as call:
                for c in array_chunks(first, RATE, 160):
                    await call.send(c)
                await call.end_utterance()
                live_async = []
                async for response in call:
                    live_async.append(response)
                    if response.finals:
                        break
                await call.send(second)
                await call.close()
                live_async += [r async for r in call]
    for responses in (in_stream, live_sync, live_async):
        finals = [f for r in responses for f in r.finals]
        assert [(f.utterance_index, f.end_reason) for f in finals] == [(0, "client"), (1, "end_of_audio")], finals
        assert finals[0].transcript and finals[0].end <= len(first) / RATE + 1e-6
    texts = {tuple(f.transcript for r in rs for f in r.finals) for rs in (in_stream, live_sync, live_async)}
    assert len(texts) == 1  # the same split, however the request was sent


async def test_cli_prints_each_utterances_final_with_times(tmp_path):
    speech = [RATE, RATE // 2]
    path = tmp_path / "call.wav"
    path.write_bytes(wav_bytes(call_audio(60, speech)))
    async with running_server(make_engine(FAKE)) as server:
        target = f"127.0.0.1:{server.port}"
        code, plain, err = await run_cli("transcribe", "--server", target, str(path))
        assert code == 0, err
        code, out, err = await run_cli("transcribe", "--server", target, "--endpointing", "--stop-history-ms", "320",
                                       str(path))
        assert code == 0, err
    lines = [m.groups() for m in re.finditer(rf"^{re.escape(str(path))} \[(\d+)\] ([\d.]+)-([\d.]+) s \((\w+)\): (.*)$",
                                              out, re.M)]
    assert [int(i) for i, *_ in lines] == list(range(len(lines))) and len(lines) >= len(speech)
    assert [r for *_, r, _ in lines[:len(speech)]] == ["endpoint"] * len(speech)
    assert all(float(a) < float(b) for _, a, b, *_ in lines[:len(speech)])
    (whole,) = plain.splitlines()
    assert squeeze(" ".join(t for *_, t in lines)) == squeeze(whole.split(": ", 1)[1])
