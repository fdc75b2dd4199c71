"""Client SDK (sync and async) and the asr-client CLI against a real server on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from client.audio_source import AudioFormat, array_chunks, file_chunks
from client.sdk import AsrClient, AsrError, AsyncAsrClient, StreamOptions
from tests.engine_alone import transcribe_alone
from tests.server_harness import FAKE, RATE, as_float, make_engine, pcm16_audio, running_server, wav_bytes

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clip_file(tmp_path):
    clip = pcm16_audio(21, RATE * 2 + 333)
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(clip))
    return clip, path


async def test_sync_client_stream_transcribe_recognize_and_models(clip_file):
    clip, path = clip_file
    engine = make_engine(FAKE)
    expected = transcribe_alone(engine, as_float(clip))
    async with running_server(engine) as server:
        target = f"127.0.0.1:{server.port}"

        def use_client():
            with AsrClient(target) as client:
                arrays = list(client.stream(array_chunks(clip, RATE, 100), sample_rate=RATE))
                floats = list(client.stream(array_chunks(as_float(clip), RATE, 37), sample_rate=RATE))
                raw_bytes = list(client.stream([clip.tobytes()[i:i + 999] for i in range(0, clip.nbytes, 999)],
                                               sample_rate=RATE))
                interim = list(client.transcribe(path, options=StreamOptions(interim=True, label="t")))
                final = client.transcribe_file(path)
                unary = client.recognize(path)
                models = client.list_models()
                return arrays, floats, raw_bytes, interim, final, unary, models

        arrays, floats, raw_bytes, interim, final, unary, models = await asyncio.to_thread(use_client)
    for responses in (arrays, floats, raw_bytes, interim):
        assert responses[-1].is_final and responses[-1].result.transcript == expected
        assert sum(r.is_final for r in responses) == 1
    assert all(r.result is not None for r in interim)
    assert all(r.result is None for r in arrays[:-1])  # interim off: responses without results
    assert final.transcript == expected and unary.transcript == expected
    assert " ".join(w.word for w in final.words) == expected
    assert models[0].engine == "fake"


async def test_sync_client_results_arrive_while_sending():
    engine = make_engine(FAKE)
    clip = pcm16_audio(22, RATE * 2)
    first_response = threading.Event()

    def source():
        chunks = list(array_chunks(clip, RATE, 200))
        yield from chunks[:3]
        # A client that only read after sending everything would block here forever.
        assert first_response.wait(30), "no response arrived while audio was still being sent"
        yield from chunks[3:]

    async with running_server(engine) as server:
        def use_client():
            with AsrClient(f"127.0.0.1:{server.port}") as client:
                out = []
                for response in client.stream(source(), sample_rate=RATE):
                    first_response.set()
                    out.append(response)
                return out

        responses = await asyncio.to_thread(use_client)
    assert responses[-1].is_final


async def test_async_client(clip_file):
    clip, path = clip_file
    engine = make_engine(FAKE)
    expected = transcribe_alone(engine, as_float(clip))
    first_response = asyncio.Event()

    async def microphone():
        for n, chunk in enumerate(array_chunks(clip, RATE, 100)):
            if n == 3:
                await asyncio.wait_for(first_response.wait(), 30)  # results come while we send
            yield chunk

    async with running_server(engine) as server:
        async with AsyncAsrClient(f"127.0.0.1:{server.port}") as client:
            live = []
            async for response in client.stream(microphone(), sample_rate=RATE, encoding="PCM16"):
                first_response.set()
                live.append(response)
            paced = [r async for r in client.transcribe(path, realtime=True, chunk_ms=250)]
            final = await client.transcribe_file(path, options=StreamOptions(interim=True))
            unary = await client.recognize(clip.tobytes(), sample_rate=RATE, encoding="PCM16")
            models = await client.list_models()
            with pytest.raises(AsrError) as err:
                await client.recognize(clip.tobytes()[:-1], sample_rate=RATE)
    assert live[-1].result.transcript == expected and paced[-1].result.transcript == expected
    assert final.transcript == expected and unary.transcript == expected
    assert models[0].name == "fake:hash"
    assert err.value.code == "INVALID_ARGUMENT" and "partial PCM16 sample" in err.value.details


async def test_sync_client_error_is_asr_error():
    engine = make_engine(FAKE)
    async with running_server(engine) as server:
        def use_client():
            with AsrClient(f"127.0.0.1:{server.port}") as client:
                return list(client.stream([b"\x00" * 101], sample_rate=RATE, options=StreamOptions(model="nope")))

        with pytest.raises(AsrError) as err:
            await asyncio.to_thread(use_client)
    assert err.value.code == "INVALID_ARGUMENT" and "not served" in err.value.details


async def test_file_chunks_need_a_format_for_raw_files(tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(pcm16_audio(1, 1000).tobytes())
    with pytest.raises(ValueError, match="not a WAV file"):
        file_chunks(raw)
    fmt, chunks = file_chunks(raw, 10, AudioFormat(RATE, "PCM16"))
    pieces = list(chunks)
    assert b"".join(pieces) == raw.read_bytes() and all(len(p) % 2 == 0 for p in pieces)
    assert len(pieces[0]) == 320  # 10 ms at 16 kHz PCM16


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.cli", *args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_transcribe_and_models(tmp_path):
    engine = make_engine(FAKE)
    clips = [pcm16_audio(30 + i, RATE + 4000 * i) for i in range(2)]
    paths = []
    for i, clip in enumerate(clips):
        paths.append(tmp_path / f"f{i}.wav")
        paths[-1].write_bytes(wav_bytes(clip))
    raw = tmp_path / "r.raw"
    raw.write_bytes(clips[0].tobytes())
    expected = [transcribe_alone(engine, as_float(c)) for c in clips]
    async with running_server(engine) as server:
        target = f"127.0.0.1:{server.port}"
        code, out, err = await run_cli("transcribe", "--server", target, *map(str, paths))
        assert code == 0, err
        assert f"{paths[0]}: {expected[0]}" in out.splitlines() and f"{paths[1]}: {expected[1]}" in out.splitlines()
        code, out, err = await run_cli("transcribe", "--server", target, "--interim", "--words", str(paths[0]))
        assert code == 0 and "[interim]" in out and f"{paths[0]}: {expected[0]}" in out
        code, out, _ = await run_cli("transcribe", "--server", target, "--sample-rate", "16000", str(raw))
        assert code == 0 and f"{raw}: {expected[0]}" in out
        code, _, err = await run_cli("transcribe", "--server", target, str(raw))  # raw without a rate
        assert code == 1 and "not a WAV file" in err
        code, out, err = await run_cli("models", "--server", target)
        assert code == 0 and "fake:hash" in out and "engine fake" in out and "RANDOM weights" in out


async def test_connections_are_checked_and_taken_in_turn():
    """`connections=N` opens N channels of their own and calls take them in turn; a given
    channel and a number of connections together, or fewer than one, are refused."""
    import grpc

    with pytest.raises(ValueError):
        AsrClient("127.0.0.1:1", connections=0)
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError):
        AsrClient("127.0.0.1:1", channel=channel, connections=2)
    client = AsrClient("127.0.0.1:1", connections=3)
    try:
        stubs = client._connections.stubs
        assert len({id(c) for c in client._connections.channels}) == 3
        assert [client._stub for _ in range(6)] == stubs + stubs
    finally:
        client.close()
