"""Security on a real server on loopback, with real certificates generated in the test: TLS,
mutual TLS, bearer tokens (UNAUTHENTICATED before any slot is taken), health and reflection
exemptions, streams per client identity; and the asr-server / asr-client flags end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.sdk import AsrClient, AsrError, AsyncAsrClient, Credentials, open_channel
from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.transport.security import SecuritySettings, load_tokens
from tests.engine_alone import transcribe_alone
from tests.server_harness import (
    FAKE, RATE, as_float, audio, config, make_engine, pcm16_audio, running_server, scrape, spawn_server,
    wav_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "alice-0123456789abcdef", "bob-fedcba9876543210"
CLIP = pcm16_audio(31, RATE + 777)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography", reason="the TLS tests generate certificates with the cryptography package")
    from tests.certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def expected():
    return transcribe_alone(make_engine(FAKE), as_float(CLIP))


def counting(engine):
    """Counts slot acquisitions: a refused call must not take one."""
    engine.acquired = 0
    acquire = engine.acquire_slot

    def acquire_slot():
        engine.acquired += 1
        return acquire()

    engine.acquire_slot = acquire_slot
    return engine


def sync_call(target: str, credentials: Credentials, what: str = "stream"):
    """(code name, details, final transcript or None) of one call through the sync client."""
    try:
        with AsrClient(target, credentials=credentials, timeout=30) as client:
            if what == "stream":
                responses = list(client.stream([CLIP.tobytes()], sample_rate=RATE))
                return "OK", "", responses[-1].result.transcript
            if what == "recognize":
                return "OK", "", client.recognize(CLIP.tobytes(), sample_rate=RATE).transcript
            client.list_models()
            return "OK", "", None
    except AsrError as exc:
        return exc.code, exc.details, None


async def call(target: str, credentials: Credentials, what: str = "stream"):
    return await asyncio.to_thread(sync_call, target, credentials, what)


async def health(target: str, credentials: Credentials) -> str:
    async with open_channel(target, credentials, aio=True) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30,
                                                                       metadata=credentials.metadata())
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def reflection_lists(target: str, credentials: Credentials) -> str:
    async with open_channel(target, credentials, aio=True) as channel:
        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        try:
            responses = [r async for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                ask(), timeout=30, metadata=credentials.metadata())]
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return ",".join(s.name for s in responses[0].list_services_response.service)


class HeldStreams:
    """Streams opened and kept open (config and a little audio, no end) until released."""

    def __init__(self, server, target: str):
        self.server, self.target = server, target
        self.release = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.channels = []

    async def open(self, credentials: Credentials) -> None:
        before = self.server.scheduler.active_streams
        channel = open_channel(self.target, credentials, aio=True)
        self.channels.append(channel)

        async def requests():
            yield config()
            yield audio(CLIP.tobytes()[:3200])
            await self.release.wait()

        async def run():
            return [r async for r in pb_grpc.SpeechRecognitionStub(channel).StreamingRecognize(
                requests(), metadata=credentials.metadata())]

        self.tasks.append(asyncio.create_task(run()))
        for _ in range(6000):
            if self.server.scheduler.active_streams > before:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("held stream did not open")

    async def close(self) -> None:
        self.release.set()
        await asyncio.gather(*self.tasks)
        for channel in self.channels:
            await channel.close()


async def test_tls_serves_verified_clients_and_refuses_plaintext_and_untrusted(pki, expected):
    engine = make_engine(FAKE)
    security = SecuritySettings(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    async with running_server(engine, security=security) as server:
        for host in ("localhost", "127.0.0.1"):  # both names are in the certificate
            target = f"{host}:{server.port}"
            assert await call(target, Credentials(tls_ca=str(pki.server_ca.cert))) == ("OK", "", expected)
        target = f"localhost:{server.port}"
        async with AsyncAsrClient(target, credentials=Credentials(tls_ca=str(pki.server_ca.cert))) as client:
            assert (await client.recognize(CLIP.tobytes(), sample_rate=RATE)).transcript == expected
        # Plaintext, or a CA that did not sign the server: no connection at all.
        for credentials in (Credentials(), Credentials(tls_ca=str(pki.other_ca.cert))):
            code, _, _ = await call(target, credentials)
            assert code == "UNAVAILABLE"
        # The name checked can be overridden (a server reached by an address not in its certificate).
        code, _, transcript = await call(f"127.0.0.1:{server.port}",
                                         Credentials(tls_ca=str(pki.server_ca.cert), tls_server_name="localhost"))
        assert (code, transcript) == ("OK", expected)
    assert engine.slots_in_use() == 0


async def test_mutual_tls_requires_a_client_certificate_and_limits_streams_by_its_name(pki, expected):
    engine = make_engine(FAKE)
    security = SecuritySettings(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                                tls_client_ca=str(pki.client_ca.cert), max_streams_per_client=1)
    ca = str(pki.server_ca.cert)

    def as_(pem) -> Credentials:
        return Credentials(tls_ca=ca, tls_cert=str(pem.cert), tls_key=str(pem.key))

    async with running_server(engine, security=security) as server:
        counting(engine)  # after the warm-up's slot
        target = f"localhost:{server.port}"
        for credentials in (Credentials(tls_ca=ca), as_(pki.stranger)):  # no certificate, or an unknown CA's
            code, _, _ = await call(target, credentials)
            assert code == "UNAVAILABLE"
        assert engine.acquired == 0
        assert await call(target, as_(pki.alice)) == ("OK", "", expected)
        held = HeldStreams(server, target)
        await held.open(as_(pki.alice))
        acquired = engine.acquired
        code, details, _ = await call(target, as_(pki.alice))
        assert code == "RESOURCE_EXHAUSTED" and "client 'cert:alice' already has 1 streams open" in details
        assert engine.acquired == acquired  # refused before any slot was taken
        assert await call(target, as_(pki.bob)) == ("OK", "", expected)
        await held.close()
        assert await call(target, as_(pki.alice)) == ("OK", "", expected)
        metrics = scrape(server.metrics_port)
    assert metrics["asr_refused_total{reason=client_stream_limit}"] == 1
    assert engine.slots_in_use() == 0


async def test_tokens_from_file_and_environment_unauthenticated_before_any_slot(tmp_path, monkeypatch, expected):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# clients\nalice {ALICE}\n\n")
    monkeypatch.setenv("TEST_ASR_TOKENS", f"bob {BOB}")
    tokens = load_tokens(str(tokens_file), "TEST_ASR_TOKENS")
    assert sorted(tokens.values()) == ["alice", "bob"] and ALICE not in tokens  # kept as digests only
    engine = make_engine(FAKE)
    async with running_server(engine, security=SecuritySettings(tokens=tokens)) as server:
        counting(engine)  # after the warm-up's slot
        target = f"127.0.0.1:{server.port}"
        refused = 0
        for token in (None, "wrong-token-0123456789", ALICE[:-1], ALICE + "x"):
            for what in ("stream", "recognize", "models"):
                code, details, _ = await call(target, Credentials(token=token), what)
                assert code == "UNAUTHENTICATED", (token, what, code)
                assert "authorization: Bearer <token>" in details
                refused += 1
        # A token without the Bearer scheme is refused too.
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.SpeechRecognitionStub(channel).ListModels(pb.ListModelsRequest(),
                                                                         metadata=(("authorization", ALICE),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            refused += 1
        # The asyncio client sees the real status as well (the server reads nothing first).
        async with AsyncAsrClient(target) as client:
            with pytest.raises(AsrError) as err:
                async for _ in client.stream([CLIP.tobytes()], sample_rate=RATE):
                    pass
            assert err.value.code == "UNAUTHENTICATED"
            refused += 1
        assert engine.acquired == 0 and server.scheduler.active_streams == 0
        # Health and reflection are not exempt unless configured so.
        assert await health(target, Credentials()) == "UNAUTHENTICATED"
        assert await reflection_lists(target, Credentials()) == "UNAUTHENTICATED"
        refused += 2
        for token in (ALICE, BOB):
            assert await call(target, Credentials(token=token)) == ("OK", "", expected)
            assert await call(target, Credentials(token=token), "recognize") == ("OK", "", expected)
            assert await health(target, Credentials(token=token)) == "SERVING"
        assert engine.acquired == 4
        metrics = scrape(server.metrics_port)
    assert metrics["asr_refused_total{reason=unauthenticated}"] == refused
    assert engine.slots_in_use() == 0


async def test_health_and_reflection_can_be_exempt_from_tokens(expected):
    engine = make_engine(FAKE)
    security = SecuritySettings(tokens=load_tokens_text(f"alice {ALICE}"), exempt_health=True, exempt_reflection=True)
    async with running_server(engine, security=security) as server:
        target = f"127.0.0.1:{server.port}"
        assert await health(target, Credentials()) == "SERVING"
        assert "nemostream.v1.SpeechRecognition" in await reflection_lists(target, Credentials())
        code, _, _ = await call(target, Credentials())
        assert code == "UNAUTHENTICATED"
        assert await call(target, Credentials(token=ALICE)) == ("OK", "", expected)


async def test_streams_per_client_limit_by_token_and_by_peer(expected):
    engine = make_engine(FAKE)
    security = SecuritySettings(tokens=load_tokens_text(f"alice {ALICE}\nbob {BOB}"), max_streams_per_client=2)
    async with running_server(engine, security=security) as server:
        counting(engine)  # after the warm-up's slot
        target = f"127.0.0.1:{server.port}"
        held = HeldStreams(server, target)
        for _ in range(2):
            await held.open(Credentials(token=ALICE))
        acquired = engine.acquired
        for what in ("stream", "recognize"):
            code, details, _ = await call(target, Credentials(token=ALICE), what)
            assert code == "RESOURCE_EXHAUSTED" and "client 'token:alice' already has 2 streams open" in details
        assert engine.acquired == acquired
        assert (await call(target, Credentials(token=ALICE), "models"))[0] == "OK"  # holds no stream: not counted
        assert await call(target, Credentials(token=BOB)) == ("OK", "", expected)
        await held.close()
        assert await call(target, Credentials(token=ALICE)) == ("OK", "", expected)
    async with running_server(engine, security=SecuritySettings(max_streams_per_client=1)) as server:
        target = f"127.0.0.1:{server.port}"
        held = HeldStreams(server, target)
        await held.open(Credentials())
        code, details, _ = await call(target, Credentials())
        assert code == "RESOURCE_EXHAUSTED" and "client 'peer:127.0.0.1'" in details
        await held.close()
        assert await call(target, Credentials()) == ("OK", "", expected)
    assert engine.slots_in_use() == 0


def load_tokens_text(text: str) -> dict[str, str]:
    from server.transport.security import parse_tokens

    return parse_tokens(text, "test")


def test_bad_security_settings_are_refused(tmp_path, monkeypatch):
    from server.transport.security import parse_tokens

    with pytest.raises(ValueError, match="both a certificate and a key"):
        SecuritySettings(tls_cert="a.pem")
    with pytest.raises(ValueError, match="needs the server's own certificate"):
        SecuritySettings(tls_client_ca="ca.pem")
    with pytest.raises(ValueError, match="only make sense with tokens"):
        SecuritySettings(exempt_health=True)
    with pytest.raises(ValueError, match="at least 16 characters"):
        parse_tokens("alice short", "t")
    monkeypatch.delenv("TEST_NO_TOKENS", raising=False)
    with pytest.raises(ValueError, match="TEST_NO_TOKENS is unset"):
        load_tokens(env="TEST_NO_TOKENS")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_tokens(file=str(empty))


# -- the command lines ------------------------------------------------------------------------
async def start_server(*extra: str, env: dict | None = None) -> tuple[asyncio.subprocess.Process, int]:
    proc, match, _ = await spawn_server(
        "--engine-factory", "tests.fake_engine:build_fake_engine", "--host", "127.0.0.1", "--port", "0", "--no-metrics",
        *extra, env=env)
    return proc, int(match.group(1))


def run_client(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))


@pytest.mark.parametrize("frontends", ["1", "2"])  # 2: TLS and tokens in every frontend process
async def test_asr_server_and_asr_client_flags_tls_and_token_end_to_end(pki, tmp_path, expected, frontends):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\n")
    token_file = tmp_path / "alice.token"
    token_file.write_text(ALICE + "\n")
    wav = tmp_path / "clip.wav"
    wav.write_bytes(wav_bytes(CLIP))
    proc, port = await start_server("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                                    "--auth-tokens-file", str(tokens), "--auth-exempt-health", "--auth-exempt-reflection",
                                    "--max-streams-per-client", "4", "--frontends", frontends)
    try:
        server = f"localhost:{port}"
        tls = ["--server", server, "--tls-ca", str(pki.server_ca.cert)]
        done = await asyncio.to_thread(run_client, "transcribe", *tls, "--token-file", str(token_file), str(wav))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{wav}: {expected}"
        done = await asyncio.to_thread(run_client, "models", *tls, env={"ASR_TOKEN": ALICE})
        assert done.returncode == 0 and "fake:hash" in done.stdout, done.stderr
        done = await asyncio.to_thread(run_client, "transcribe", *tls, "--token", "not-the-token-0123456", str(wav))
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
        done = await asyncio.to_thread(run_client, "models", "--server", server, "--token", ALICE)  # plaintext
        assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
        grpcurl = Path(sys.executable).parent / "grpcurl"
        if grpcurl.exists():  # a probe with no token, over TLS (grpcurl needs reflection for the descriptor)
            probe = await asyncio.to_thread(subprocess.run, [str(grpcurl), "-cacert", str(pki.server_ca.cert), server,
                                                              "grpc.health.v1.Health/Check"],
                                            capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0 and json.loads(probe.stdout)["status"] == "SERVING", probe.stderr
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_asr_server_refuses_to_start_with_a_bad_security_setup(pki):
    for extra, env, message in (
            (["--auth-tokens-env", "TEST_UNSET_TOKENS"], {}, "TEST_UNSET_TOKENS is unset"),
            (["--tls-cert", str(pki.server.cert)], {}, "both a certificate and a key"),
            (["--tls-cert", "/nonexistent.pem", "--tls-key", str(pki.server.key)], {}, "does not exist")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.service.cli", "--engine-factory", "tests.fake_engine:build_fake_engine", *extra,
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 2 and message in stderr.decode(), stderr.decode()
