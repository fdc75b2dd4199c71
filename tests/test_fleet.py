"""A fleet on one machine: real `asr-server --model builtin:tiny` processes on loopback, found
through a DNS name (tests/dns_stub.py) as pods behind a headless Service are, balanced two ways:

  - behind HAProxy with deploy/haproxy/haproxy.cfg (one client connection, each stream placed
    on a server by the proxy), and
  - by the SDK's client-side balancing (round_robin + gRPC health checks over the name).

Each way: asr-loadgen's streams spread within +-20% of even (counts from each server's
metrics); a SIGTERMed server drains (its streams finish, new streams go to the others); a
SIGKILLed server fails only its own streams; a server added to the name mid-run receives new
streams. The servers start together at the beginning (loading the model is most of the time).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from client.balancing import channel_target
from client.sdk import AsrError, AsyncAsrClient
from tests.dns_stub import DnsStub
from tests.fleet_harness import ROOT, Fleet, HAProxy, haproxy_binary
from tests.server_harness import RATE, pcm16_audio

pytestmark = pytest.mark.slow

SPREAD_STREAMS = 30
CHUNK = RATE // 10  # 100 ms messages


@pytest.fixture(scope="module")
def fleet():
    """Six servers, starting at once: the proxy run takes four (two survive it), the SDK run
    those two and two more."""
    f = Fleet()
    for _ in range(6):
        f.start()
    yield f
    f.close()


@pytest.fixture(scope="module")
def dns():
    d = DnsStub()
    yield d
    d.close()


def live(fleet: Fleet, n: int, used: set) -> list:
    """The next n servers not yet used, waiting for them to be ready."""
    picked = [s for s in fleet.servers if s not in used][:n]
    used.update(picked)
    return [s.wait_ready() for s in picked]


_USED: set = set()


async def one_stream(client: AsyncAsrClient, seconds: float, realtime: bool, seed: int) -> str:
    """A stream of `seconds` of audio: "OK" with exactly one final, else the status name."""
    clip = pcm16_audio(seed, int(RATE * seconds))
    chunks = [clip[i:i + CHUNK] for i in range(0, len(clip), CHUNK)]
    try:
        finals = [r async for r in client.stream(chunks, sample_rate=RATE, realtime=realtime) if r.is_final]
    except AsrError as exc:
        return exc.code
    return "OK" if len(finals) == 1 else f"{len(finals)} finals"


async def wait_for(condition, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def run_loadgen(target: str, balance: bool, tmp_path) -> dict:
    out = tmp_path / "loadgen.json"
    cmd = [sys.executable, "-m", "client.loadgen", "--server", target, "--concurrency", str(SPREAD_STREAMS),
           "--synthetic-clips", "3", "--synthetic-seconds", "2", "--ramp-s", "1.5", "--no-interim", "--quiet",
           "--json", str(out), *(["--balance"] if balance else [])]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text())


async def spread(target: str, balance: bool, servers: list, tmp_path) -> None:
    before = [s.streamed() for s in servers]
    report = await asyncio.to_thread(run_loadgen, target, balance, tmp_path)
    level = report["levels"][0]
    assert level["streams_completed"] == SPREAD_STREAMS and not level["errors"], level["errors"]
    counts = [s.streamed() - b for s, b in zip(servers, before)]
    even = SPREAD_STREAMS / len(servers)
    assert sum(counts) == SPREAD_STREAMS, counts
    assert all(0.8 * even <= c <= 1.2 * even for c in counts), f"streams per server {counts}, even is {even:g}"


async def drain(client: AsyncAsrClient, victim, others: list, noticed) -> None:
    """SIGTERM to `victim` while streams are open on every server: they all finish; new streams
    go to the others only."""
    held = [asyncio.create_task(one_stream(client, 6.0, True, 100 + i)) for i in range(6)]
    await wait_for(lambda: all(s.active() >= 1 for s in (victim, *others)), what="streams on every server")
    before = sum(s.streamed() for s in others)
    victim.proc.send_signal(signal.SIGTERM)
    await noticed()
    fresh = await asyncio.gather(*(one_stream(client, 1.0, False, 200 + i) for i in range(6)))
    assert fresh == ["OK"] * 6, fresh
    assert sum(s.streamed() for s in others) - before == 6, "every new stream went to a server not draining"
    assert await asyncio.gather(*held) == ["OK"] * 6, "the streams open on the draining server finished too"
    assert await asyncio.to_thread(victim.proc.wait, 60) == 0


async def kill(client: AsyncAsrClient, victim, survivor, killed_code: str) -> list[asyncio.Task]:
    """SIGKILL to `victim`: its streams fail with `killed_code`, the survivor's go on. Returns
    the survivor's streams, still open (6 s of real time)."""
    held = [asyncio.create_task(one_stream(client, 6.0, True, 300 + i)) for i in range(6)]
    await wait_for(lambda: victim.active() + survivor.active() == 6 and victim.active() >= 1 and survivor.active() >= 1,
                   what="streams on both servers")
    on_victim = int(victim.active())
    victim.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(victim.proc.wait, 30)
    done, _ = await asyncio.wait(held, timeout=3.0)
    failed = [t.result() for t in done]
    assert failed == [killed_code] * on_victim, f"{on_victim} streams on the killed server: {failed}"
    return [t for t in held if t not in done]


async def add(client: AsyncAsrClient, old, new, set_members, open_streams: list[asyncio.Task]) -> None:
    """`new` joins the name while `open_streams` run on `old`: new streams reach it."""
    before = new.streamed()
    set_members([old, new])
    deadline = time.monotonic() + 30.0
    while await asyncio.to_thread(new.streamed) == before:
        assert time.monotonic() < deadline, "the added server got no stream"
        assert await asyncio.gather(*(one_stream(client, 0.5, False, 400 + i) for i in range(4))) == ["OK"] * 4
    results = await asyncio.gather(*(one_stream(client, 0.5, False, 500 + i) for i in range(8)))
    assert results == ["OK"] * 8
    assert await asyncio.gather(*open_streams) == ["OK"] * len(open_streams), "the old server's streams went on"


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed (.ci/run installs the Debian package "
                    "as root; elsewhere: apt-get install haproxy)")
async def test_fleet_behind_haproxy(fleet, dns, tmp_path):
    a, b, c, d = live(fleet, 4, _USED)
    name = "proxy.fleet.test"

    def members(servers):
        dns.set(name, [s.address for s in servers])

    members([a, b, c])
    proxy = HAProxy(tmp_path, dns.port, name, fleet.port, fleet.metrics_port)
    try:
        await asyncio.to_thread(proxy.wait_up, {a.address, b.address, c.address})
        await spread(proxy.target, False, [a, b, c], tmp_path)
        async with AsyncAsrClient(proxy.target) as client:  # one connection: the proxy places each stream
            await drain(client, a, [b, c], lambda: asyncio.to_thread(proxy.wait_up, {b.address, c.address}))
            members([b, c])
            # HAProxy resets a stream whose backend vanished with RST_STREAM(CANCEL): gRPC reports CANCELLED
            survivors = await kill(client, b, c, "CANCELLED")
            members([c])
            await asyncio.to_thread(proxy.wait_up, {c.address})
            await add(client, c, d, members, survivors)
    finally:
        proxy.stop()


async def test_fleet_with_client_side_balancing(fleet, dns, tmp_path):
    # the proxy run's survivors (if it ran) and fresh servers
    survivors = [s for s in _USED if s.alive]
    a, b, c, d = (survivors + live(fleet, 4 - len(survivors), _USED))[:4]
    name = "sdk.fleet.test"

    def members(servers):
        dns.set(name, [s.address for s in servers])

    members([a, b, c])
    target = f"dns://127.0.0.1:{dns.port}/{name}:{fleet.port}"
    await spread(target, True, [a, b, c], tmp_path)
    resolved, options = channel_target(target, balance=True)
    # gRPC resolves the name again when a connection ends (the servers' connection age is 2 s),
    # at most this often (its default is 30 s)
    channel = grpc.aio.insecure_channel(resolved, options=[*options, ("grpc.dns_min_time_between_resolutions_ms", 500)])
    async with AsyncAsrClient(target, channel=channel) as client:
        # round_robin places calls among the connections ready so far: let all three connect
        for _ in range(10):
            await client.list_models()
            await asyncio.sleep(0.05)

        async def noticed():
            await asyncio.sleep(0.3)  # the channel watches each server's health: NOT_SERVING arrives at once

        await drain(client, a, [b, c], noticed)
        members([b, c])
        survivors = await kill(client, b, c, "UNAVAILABLE")
        members([c])
        await add(client, c, d, members, survivors)
