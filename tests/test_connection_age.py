"""Maximum connection age (--max-connection-age-s): the server sends GOAWAY on an old
connection, the client's channel leaves it (its state goes IDLE) while the stream open on it
goes on to its final, and the next call runs on a new connection."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.service.app import ServerSettings
from server.service.cli import build_settings, parse_args
from tests.fake_engine import FakeEngine
from tests.server_harness import RATE, audio, config, final_transcript, pcm16_audio, running_server



def stream_across(port: int, seconds: float) -> tuple[list[str], str, int]:
    """One stream held open for `seconds` (with audio before and after), then a ListModels on
    the same channel: (channel states seen, the stream's final transcript, connections made)."""
    states: list[str] = []
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    channel.subscribe(lambda s: states.append(s.name), try_to_connect=False)
    try:
        stub = pb_grpc.SpeechRecognitionStub(channel)
        clip = pcm16_audio(7, RATE).tobytes()

        def requests():
            yield config()
            yield audio(clip[: len(clip) // 2])
            time.sleep(seconds)
            yield audio(clip[len(clip) // 2:])

        transcript = final_transcript(list(stub.StreamingRecognize(requests(), timeout=30)))
        stub.ListModels(pb.ListModelsRequest(), timeout=10)
        for _ in range(100):  # connectivity callbacks come from a thread of their own
            if states[-1] == "READY":
                break
            time.sleep(0.02)
        return list(states), transcript, states.count("READY")
    finally:
        channel.close()


async def test_goaway_after_the_age_while_the_open_stream_finishes():
    async with running_server(FakeEngine(), max_connection_age_s=0.5) as server:
        states, transcript, connections = await asyncio.to_thread(stream_across, server.port, 2.0)
    assert transcript, "the stream open across the GOAWAY got its final"
    assert "IDLE" in states[states.index("READY"):], f"no GOAWAY: the channel never left the connection {states}"
    assert connections == 2, f"the call after the GOAWAY runs on a new connection: {states}"


async def test_no_goaway_without_an_age():
    async with running_server(FakeEngine(), max_connection_age_s=None) as server:
        states, transcript, connections = await asyncio.to_thread(stream_across, server.port, 2.0)
    assert transcript and connections == 1 and "IDLE" not in states[states.index("READY"):], states


async def test_age_grace_closes_the_connection_under_a_stream_that_outlives_it():
    async with running_server(FakeEngine(), max_connection_age_s=0.5, max_connection_age_grace_s=0.5) as server:
        with pytest.raises(grpc.RpcError) as err:
            await asyncio.to_thread(stream_across, server.port, 3.0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_connection_age_flags_and_defaults():
    settings = build_settings(parse_args([]))
    assert (settings.max_connection_age_s, settings.max_connection_age_grace_s) == (300.0, None)
    assert ("grpc.max_connection_age_ms", 300_000) in settings.connection_age_options()
    settings = build_settings(parse_args(["--max-connection-age-s", "0", "--max-connection-age-grace-s", "20"]))
    assert settings.connection_age_options() == [("grpc.max_connection_age_grace_ms", 20_000)]
    with pytest.raises(ValueError):
        ServerSettings(max_connection_age_s=-1.0)
