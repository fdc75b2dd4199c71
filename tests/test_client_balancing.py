"""Client-side balancing (client/balancing.py) against three real servers on loopback: streams
of one SDK client spread evenly over them, and a server that drains (health NOT_SERVING)
gets no new stream while its open one finishes; asr-client and asr-loadgen take the list.
The fleet of asr-server processes under load is tests/test_fleet.py."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from client.balancing import SERVICE_CONFIG, channel_target
from client.cli import main as client_main
from client.sdk import AsrClient
from tests.fake_engine import FakeEngine
from tests.server_harness import RATE, held_open_outcome, pcm16_audio, running_server, scrape, settle, stub_for

STREAMED = "asr_rpcs_total{code=OK,method=StreamingRecognize}"


def test_targets():
    assert channel_target("localhost:50051") == ("localhost:50051", [])
    target, options = channel_target("127.0.0.1:1, 127.0.0.2:2")
    assert target == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert options == [("grpc.service_config", SERVICE_CONFIG)]
    config = json.loads(SERVICE_CONFIG)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"]["serviceName"] == "nemostream.v1.SpeechRecognition"
    assert channel_target(["localhost:7"])[0] == "localhost:7"
    assert channel_target("asr.example:50051", balance=True)[0] == "dns:///asr.example:50051"
    assert channel_target("dns:///asr.example:50051", balance=True)[0] == "dns:///asr.example:50051"
    assert channel_target("localhost:9,127.0.0.3:9")[0].startswith("ipv4:127.0.0.1:9,")
    with pytest.raises(ValueError):
        channel_target("nohostport,127.0.0.1:1")
    with pytest.raises(ValueError):
        channel_target("")


@contextlib.asynccontextmanager
async def three_servers():
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_server(FakeEngine(), drain_grace_s=30.0)) for _ in range(3)]


def transcribe_all(servers: str, n: int) -> list[str]:
    clip = pcm16_audio(5, RATE // 2)
    with AsrClient(servers) as client:
        finals = []
        for _ in range(n):
            finals += [r.result.transcript for r in client.stream([clip], sample_rate=RATE) if r.is_final]
        return finals


async def streamed(server) -> float:
    await settle(server)
    return scrape(server.metrics_port).get(STREAMED, 0.0)


async def test_streams_spread_over_a_list_and_a_draining_server_gets_no_new_ones():
    async with three_servers() as servers:
        target = ",".join(f"127.0.0.1:{s.port}" for s in servers)
        finals = await asyncio.to_thread(transcribe_all, target, 30)
        assert len(finals) == 30 and all(finals)
        counts = [await streamed(s) for s in servers]
        # round_robin takes turns among the servers ready so far (they connect in parallel)
        assert sum(counts) == 30 and all(8 <= c <= 12 for c in counts), counts

        resume = asyncio.Event()
        async with stub_for(servers[0]) as stub:
            held = asyncio.create_task(held_open_outcome(stub, 2, resume))
            while servers[0].scheduler.active_streams < 1:
                await asyncio.sleep(0.01)
            drain = asyncio.create_task(servers[0].drain())  # NOT_SERVING; waits for the open stream
            await asyncio.sleep(0.3)  # the balancing channel's health watch hears it
            finals = await asyncio.to_thread(transcribe_all, target, 12)
            assert len(finals) == 12, "no new stream went to the draining server (it would refuse it)"
            after = [await streamed(s) for s in servers]
            assert after[0] == counts[0] and after[1] + after[2] == counts[1] + counts[2] + 12, (counts, after)
            assert after[1] - counts[1] >= 4 and after[2] - counts[2] >= 4, (counts, after)
            resume.set()
            assert (await held)[0] == "OK"
            assert await drain


async def test_asr_client_takes_a_list_of_servers(tmp_path, capsys):
    from tests.server_harness import wav_bytes

    paths = []
    for i in range(9):
        path = tmp_path / f"clip{i}.wav"
        path.write_bytes(wav_bytes(pcm16_audio(i, RATE // 2)))
        paths.append(str(path))
    async with three_servers() as servers:
        target = ",".join(f"127.0.0.1:{s.port}" for s in servers)
        code = await asyncio.to_thread(client_main, ["transcribe", "--server", target, "--concurrency", "1", *paths])
        assert code == 0
        counts = [await streamed(s) for s in servers]
        assert sum(counts) == 9 and all(counts), f"every server got streams: {counts}"
    assert capsys.readouterr().out.count(".wav: ") == 9
