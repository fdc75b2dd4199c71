"""A fleet on one machine: four real `asr-server --model builtin:tiny` processes on loopback,
found through a DNS name (tests/dns_stub.py) as pods behind a headless Service are, balanced
two ways at once:

  - behind HAProxy with deploy/haproxy/haproxy.cfg (one client connection; the proxy places
    each stream on a server), and
  - by the SDK's client-side balancing (round_robin + gRPC health checks over the name).

Each way: asr-loadgen's streams spread within +-20% of even (counts from each server's
metrics); a SIGTERMed server drains (every stream open on it finishes, new streams go to the
others); a SIGKILLed server fails only its own streams; a server added to the name mid-run
receives new streams. Both clients run through one fleet: starting a server (loading the
model) is most of the test's time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import warnings

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


async def one_stream(client: AsyncAsrClient, seconds: float, realtime: bool, seed: int) -> str:
    """A stream of `seconds` of audio: "OK" with exactly one final, else the status name."""
    clip = pcm16_audio(seed, int(RATE * seconds))
    chunks = [clip[i:i + CHUNK] for i in range(0, len(clip), CHUNK)]
    try:
        finals = [r async for r in client.stream(chunks, sample_rate=RATE, realtime=realtime) if r.is_final]
    except AsrError as exc:
        DETAILS.append(f"{exc.code}: {exc.details}")
        if (exc.code, exc.details) == ("INTERNAL", AIO_WRITE_FAILED):
            return WRITE_FAILED
        return exc.code
    return "OK" if len(finals) == 1 else f"{len(finals)} finals"


DETAILS: list[str] = []  # every failed stream's status and details, for the assertion messages

# grpc.aio's status when a client write fails as the call ends (grpc/grpc#36066, the SDK's
# AsyncAsrClient says so): the failed write replaces the status that arrived with this one. A
# killed server's stream can meet a write in flight, whether the proxy resets it
# (RST_STREAM(CANCEL)) or the connection itself breaks. Reproduced with a SIGKILLed grpc.aio
# server and streams writing every 1 ms: behind HAProxy 2.6 one stream in four; on a direct
# connection none on an idle machine, about one in five with both cores busy. At this test's
# 100 ms pace it is rare, and shows under load (a full suite run).
AIO_WRITE_FAILED = "Internal error from Core"
WRITE_FAILED = "INTERNAL (a write failed as the call ended)"


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
    # the status codes and, for each, what one such stream was told (to tell a proxy's reset
    # from a server's refusal when this fails)
    assert level["streams_completed"] == SPREAD_STREAMS and not level["errors"], \
        (level["errors"], level.get("error_examples"))
    counts = [s.streamed() - b for s, b in zip(servers, before)]
    even = SPREAD_STREAMS / len(servers)
    assert sum(counts) == SPREAD_STREAMS, counts
    assert all(0.8 * even <= c <= 1.2 * even for c in counts), f"streams per server {counts}, even is {even:g}"


def count(servers) -> float:
    return sum(s.streamed() for s in servers)


async def batch(client, n: int, seconds: float, realtime: bool, seed: int) -> list[str]:
    return await asyncio.gather(*(one_stream(client, seconds, realtime, seed + i) for i in range(n)))


# Through HAProxy a stream can fail on a server that stays up, when that server ages the proxy's
# connection (--max-connection-age-s, 2 s here): HAProxy 2.6 may open a stream on a connection
# while the server is telling it to go away, and the server's close of an aged connection can take
# the last stream's status with it. HAProxy logs such a stream "SD" (the server side aborted in
# the data phase); the client sees CANCELLED (RST_STREAM(CANCEL), before the server answered) or
# UNKNOWN ("Data frame with END_STREAM flag received": the stream ended with no grpc-status).
# Seen in about one full suite run in five on the loaded 2-core machine, and once in about 2,400
# streams of a repro with a 0.5 s age and the cores busy (deploy/README.md, "HAProxy and the
# servers' connection age"). A fleet reached only through the proxy needs no connection age (the
# proxy places every stream and finds servers through DNS); this fleet also serves client-side
# balancing, which does. So a proxied stream that fails so passes here, no more of them than
# HAProxy logged aborts in the same span; any other failure, or one more, fails the test.
AGE_LOSS = {"CANCELLED", "UNKNOWN"}
AGE_LOSSES: list[str] = []  # what passed so, for the report
EXCUSED: set[int] = set()  # HAProxy's log lines of aborts that excused a failure: each excuses one


def expect_ok(results: list[str], client, via_proxy, proxy, mark: int, what: str) -> int:
    """Every stream "OK", but for HAProxy's connection-age aborts (above): returns how many."""
    failed = [r for r in results if r != "OK"]
    if failed and client is via_proxy and proxy is not None and all(r in AGE_LOSS for r in failed):
        unused = [i for i in proxy.aborts_since(mark) if i not in EXCUSED]
        if len(failed) <= len(unused):
            EXCUSED.update(unused[:len(failed)])
            AGE_LOSSES.append(f"{what}: {failed}")
            return len(failed)
    assert not failed, f"{what}: {results}\n{story(proxy, client, via_proxy)}"
    return 0


def story(proxy, client, via_proxy) -> str:
    """What a failed assertion prints: each failed stream's status and details, which client
    sent it, and (through the proxy) HAProxy's log lines of streams that did not end 200 with
    no termination flags, whose two-letter state says which side ended them and when."""
    lines = [f"client: {'HAProxy' if client is via_proxy else 'client-side balancing'}", f"statuses: {DETAILS}"]
    if proxy is not None:
        log = (proxy.workdir / "haproxy.log").read_text().splitlines()
        lines += [line for line in log if " 200 " not in line or " ---- " not in line][-40:]
    return "\n".join(lines)


async def test_fleet_behind_haproxy_and_with_client_side_balancing(tmp_path):
    fleet, dns = Fleet(), DnsStub()
    a, b, c, d = (fleet.start() for _ in range(4))
    name = "fleet.test"

    def members(servers):
        dns.set(name, [s.address for s in servers])

    members([a, b, c])
    sdk_target = f"dns://127.0.0.1:{dns.port}/{name}:{fleet.port}"
    proxy = HAProxy(tmp_path, dns.port, name, fleet.port, fleet.metrics_port) if haproxy_binary() else None
    try:
        for server in (a, b, c, d):
            await asyncio.to_thread(server.wait_ready)
        if proxy:
            await asyncio.to_thread(proxy.wait_up, {a.address, b.address, c.address})
            await spread(proxy.target, False, [a, b, c], tmp_path)
        await spread(sdk_target, True, [a, b, c], tmp_path)

        resolved, options = channel_target(sdk_target, balance=True)
        # gRPC resolves the name again when a connection ends (the servers' connection age is
        # 2 s), at most this often (its default is 30 s)
        sdk_channel = grpc.aio.insecure_channel(
            resolved, options=[*options, ("grpc.dns_min_time_between_resolutions_ms", 500)])
        sdk = AsyncAsrClient(sdk_target, channel=sdk_channel)
        # one connection to the proxy: it places each stream
        via_proxy = AsyncAsrClient(proxy.target) if proxy else None
        clients = [cl for cl in (via_proxy, sdk) if cl is not None]
        # round_robin places calls among the connections ready so far: let all three connect
        for _ in range(10):
            await sdk.list_models()
            await asyncio.sleep(0.05)

        def mark() -> int:
            return proxy.log_mark() if proxy else 0

        # SIGTERM: a drains; its open streams finish, new ones go to b and c
        held_mark = mark()
        held = [(cl, asyncio.create_task(one_stream(cl, 6.0, True, 100 + 10 * k + i)))
                for k, cl in enumerate(clients) for i in range(6)]
        await wait_for(lambda: a.active() >= len(clients) and b.active() >= 1 and c.active() >= 1
                       and a.active() + b.active() + c.active() == len(held), what="streams on every server")
        before = count([b, c])
        held_elsewhere = int(b.active() + c.active())  # held streams on b and c may end meanwhile
        a.proc.send_signal(signal.SIGTERM)
        if proxy:
            await asyncio.to_thread(proxy.wait_up, {b.address, c.address})
        await asyncio.sleep(0.3)  # the SDK's channel watches health: NOT_SERVING arrives at once
        lost = 0
        for k, cl in enumerate(clients):
            since = mark()
            lost += expect_ok(await batch(cl, 6, 1.0, False, 200 + 10 * k), cl, via_proxy, proxy, since, "drain")
        assert 6 * len(clients) - lost <= count([b, c]) - before <= 6 * len(clients) + held_elsewhere, \
            "every new stream went to a server not draining"
        for cl in clients:
            expect_ok(await asyncio.gather(*(t for c_, t in held if c_ is cl)), cl, via_proxy, proxy, held_mark,
                      "the streams open on the draining server finished")
        assert await asyncio.to_thread(a.proc.wait, 60) == 0
        members([b, c])

        # SIGKILL: b's streams fail, c's go on. Through HAProxy a stream whose backend vanished
        # ends CANCELLED once the server had answered (the proxy resets it with
        # RST_STREAM(CANCEL)) and UNAVAILABLE before (the proxy answers 502); with client-side
        # balancing the connection itself breaks: UNAVAILABLE.
        # Either way a write in flight can turn the status into grpc.aio's INTERNAL
        # (AIO_WRITE_FAILED above); a status of the server's own never matches that.
        expected = {id(via_proxy): {"CANCELLED", "UNAVAILABLE", WRITE_FAILED}, id(sdk): {"UNAVAILABLE", WRITE_FAILED}}
        held = [(cl, asyncio.create_task(one_stream(cl, 6.0, True, 300 + 10 * k + i)))
                for k, cl in enumerate(clients) for i in range(6)]
        await wait_for(lambda: b.active() >= len(clients) and c.active() >= 1
                       and b.active() + c.active() == len(held), what="streams on both servers")
        on_b = int(b.active())
        b.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(b.proc.wait, 30)
        done, _ = await asyncio.wait([t for _, t in held], timeout=3.0)
        failed = [(expected[id(cl)], t.result()) for cl, t in held if t in done]
        assert len(failed) == on_b and all(got in want for want, got in failed), \
            f"{on_b} on the killed server: {failed} {DETAILS}"
        survivors = [(cl, t) for cl, t in held if t not in done]
        survivors_mark = mark()  # a survivor's own abort comes after the kill's
        members([c])
        if proxy:
            await asyncio.to_thread(proxy.wait_up, {c.address})

        # d joins the name while c's streams run: new streams reach it, from each client
        members([c, d])
        for k, cl in enumerate(clients):
            before = d.streamed()
            deadline = time.monotonic() + 30.0
            while await asyncio.to_thread(d.streamed) == before:
                assert time.monotonic() < deadline, "the added server got no new stream"
                since = mark()
                expect_ok(await batch(cl, 4, 0.5, False, 400 + 10 * k), cl, via_proxy, proxy, since, "until d serves")
            before = count([c, d])
            running = sum(not t.done() for _, t in survivors)  # c's held streams may end meanwhile
            since = mark()
            lost = expect_ok(await batch(cl, 8, 0.5, False, 500 + 10 * k), cl, via_proxy, proxy, since, "c and d")
            assert 8 - lost <= count([c, d]) - before <= 8 + running
        for cl in clients:
            expect_ok(await asyncio.gather(*(t for c_, t in survivors if c_ is cl)), cl, via_proxy, proxy,
                      survivors_mark, "c's streams went on")
        for cl in clients:
            await cl.close()
        if AGE_LOSSES:  # passed, but said: the warnings summary of the run shows it
            warnings.warn(f"HAProxy's connection-age aborts (AGE_LOSS above): {AGE_LOSSES}; {DETAILS}", stacklevel=1)
    finally:
        if proxy:
            proxy.stop()
        fleet.close()
        dns.close()
    if proxy is None:
        pytest.skip("client-side balancing passed; the proxy half did not run: haproxy is not installed (.ci/run "
                    "installs the Debian package as root; elsewhere: apt-get install haproxy)")
