"""Property-based fuzzing of StreamingRecognize on a real server on loopback (hypothesis).

Each example runs one to three concurrent streams of random requests: configs (valid or with
random fields), audio of random sizes and contents (PCM16 noise, FLOAT32 with NaN and
infinities, raw random bytes, oversized messages), bytes that are no protobuf message at all,
empty requests, configs after audio, and endings by half-close or cancellation. Properties:

  - the server never crashes and never reports an error of its own (no INTERNAL, UNKNOWN or
    UNAVAILABLE): every stream ends OK with exactly one final result, last, or with
    INVALID_ARGUMENT and a message (or CANCELLED where the client cancelled);
  - where the outcome is known from the requests alone it is that outcome (no config, audio
    first, undecodable bytes, a config the validator refuses, a second config), and a
    well-formed stream is OK with the transcript of a fault-free run (fake engine);
  - afterwards no stream is open and no slot is in use, the engine broke no contract, and the
    server still serves.

The fake engine carries the volume; a few examples run against the real builtin:tiny engine.
Example counts are modest so CI stays fast; examples are derandomized (reproducible).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proto import asr_stream_pb2 as pb
from server.service.app import AsrServer
from server.transport.call_skeleton import TransportLimits
from server.scheduling.scheduler import SchedulerConfig
from server.transport.stream_config import ServedModel, validate_config
from server.scheduling.stream_events import StreamError
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.server_harness import RATE, server_settings

METHOD = "/nemostream.v1.SpeechRecognition/StreamingRecognize"
MAX_MESSAGE = 8192           # audio bytes per message the fuzzed server accepts


class ThreadServer:
    """An AsrServer on its own event loop thread, so hypothesis drives it from sync tests."""

    def __init__(self, engine, wire: bool = False):
        self.engine = engine
        self.wire = wire  # through a frontend and the engine host over a Unix socket (--frontends N)
        self.host = None
        self._tmp = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-server", daemon=True)
        self.thread.start()
        self.server: AsrServer = self.run(self._start())
        self.target = f"127.0.0.1:{self.server.port}"
        self.served = self.server.served

    async def _start(self) -> AsrServer:
        settings = server_settings(
            metrics_port=None, limits=TransportLimits(idle_timeout_s=30.0, max_audio_message_bytes=MAX_MESSAGE),
            scheduler=SchedulerConfig(batch_wait_s=0.002, stall_timeout_s=30.0))
        if not self.wire:
            server = AsrServer(self.engine, settings)
            await server.start()
            return server
        # What `asr-server --frontends N` runs: the engine host owns the scheduler; the gRPC
        # server is a frontend relaying every stream over the IPC wire.
        import dataclasses
        import os
        import tempfile

        from server.runtime.engine_host import EngineHost
        from server.runtime.remote_scheduler import RemoteMetrics, RemoteScheduler

        self._tmp = tempfile.TemporaryDirectory(prefix="asr-fuzz-ipc-")
        self.host = EngineHost(self.engine, settings.scheduler, os.path.join(self._tmp.name, "engine.sock"))
        await self.host.start(settings.metrics_host, 0)
        remote = RemoteScheduler(self.host.socket_path, name="frontend-fuzz")
        facts = await remote.connect()
        server = AsrServer(facts, dataclasses.replace(settings, metrics_port=None), scheduler=remote,
                           metrics=RemoteMetrics(remote, max_batch=facts.max_batch))
        await server.start()
        remote.announce_ready()
        return server

    @property
    def scheduler(self):
        """The scheduler that owns the streams: the server's, or the engine host's behind the wire."""
        return self.host.scheduler if self.host is not None else self.server.scheduler

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def settled(self, timeout_s: float = 60.0) -> tuple[int, int]:
        """(open streams, slots in use) once both reach zero, or when the bound runs out."""
        async def poll():
            deadline = time.monotonic() + timeout_s
            while True:
                sync = getattr(self.server.scheduler, "sync", None)
                if sync is not None:  # closes reach the engine host a moment after the client's status
                    await sync()
                state = (self.scheduler.active_streams, self.engine.slots_in_use())
                if state == (0, 0) or time.monotonic() > deadline:
                    return state
                await asyncio.sleep(0.005)

        return self.run(poll(), timeout_s + 10)

    def close(self) -> None:
        self.run(self.server.stop())
        if self.host is not None:
            self.run(self.host.stop())
            self._tmp.cleanup()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def fake_server():
    server = ThreadServer(FakeEngine(capacity=16, max_batch=8))
    yield server
    server.close()


@pytest.fixture(scope="module")
def wire_server():
    server = ThreadServer(FakeEngine(capacity=16, max_batch=8), wire=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def real_server(tiny_engine):
    server = ThreadServer(tiny_engine)
    yield server
    server.close()


# -- what a fuzzed stream sends ------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    kind: str          # config | audio | empty | garbage
    data: bytes        # the serialized request (raw bytes for garbage)
    config: pb.RecognitionConfig | None = None
    pcm16: np.ndarray | None = None  # well-formed PCM16 audio this message carries


def _config_req(cfg: pb.RecognitionConfig) -> Req:
    return Req("config", pb.StreamingRecognizeRequest(config=cfg).SerializeToString(), config=cfg)


def _audio_req(data: bytes, pcm16: np.ndarray | None = None) -> Req:
    return Req("audio", pb.StreamingRecognizeRequest(audio=data).SerializeToString(), pcm16=pcm16)


valid_configs = st.builds(
    lambda interim, label: pb.RecognitionConfig(sample_rate=RATE, encoding=pb.PCM16, interim_results=interim,
                                                client_label=label),
    st.booleans(), st.text(alphabet="abcxyz-_ 0123", max_size=20))

random_configs = st.builds(
    pb.RecognitionConfig,
    model=st.sampled_from(["", "fake:hash", "whisper", "x" * 300]),
    lookahead_ms=st.sampled_from([0, 160, 80, 560, 2**31]),
    sample_rate=st.one_of(st.sampled_from([0, 8000, 16000, 22050, 44100, 48000]), st.integers(0, 2**32 - 1)),
    encoding=st.integers(0, 5),
    channels=st.integers(0, 40),
    interim_results=st.booleans(),
    language=st.sampled_from(["", "en", "xx", "en-US"]),
    prompt=st.sampled_from(["", "hello"]),
    client_label=st.text(max_size=140),
)

# Sizes of every kind, but mostly large enough that streams run many chunks (hypothesis favours
# small integers).
pcm16_chunks = st.one_of(st.integers(0, MAX_MESSAGE // 2),
                         st.sampled_from([1, 159, 161, 2559, 2560, 4000, MAX_MESSAGE // 2 - 1, MAX_MESSAGE // 2]),
                         st.just(MAX_MESSAGE // 2)).flatmap(
    lambda n: st.integers(0, 2**32 - 1).map(
        lambda seed: (np.random.default_rng(seed).standard_normal(n) * 3000).astype("<i2")))

audio_messages = st.one_of(
    pcm16_chunks.map(lambda a: _audio_req(a.tobytes(), a)),                             # well-formed PCM16
    st.binary(max_size=3000).map(_audio_req),                                           # random bytes
    st.lists(st.sampled_from([0.0, 0.5, -1.0, 2.0, float("nan"), float("inf")]), max_size=400)
      .map(lambda v: _audio_req(np.asarray(v, "<f4").tobytes())),                       # FLOAT32 with NaN/inf
    st.just(_audio_req(b"RIFF" + bytes(40))),                                           # a broken WAV header
    st.just(_audio_req(bytes(MAX_MESSAGE + 2))),                                        # one byte pair too many
)

other_messages = st.one_of(
    st.just(Req("empty", pb.StreamingRecognizeRequest().SerializeToString())),
    # Field 1 with wire type 7, which does not exist: never a valid message, whatever follows.
    st.binary(max_size=64).map(lambda b: Req("garbage", b"\x0f" + b)),
    st.one_of(valid_configs, random_configs).map(_config_req),
)


@st.composite
def streams(draw):
    """(requests, how it ends): mostly config-first streams, sometimes anything at all."""
    shape = draw(st.sampled_from(["valid", "valid", "mixed", "chaos"]))
    if shape == "valid":
        requests = [_config_req(draw(valid_configs))]
        requests += draw(st.lists(pcm16_chunks.map(lambda a: _audio_req(a.tobytes(), a)), min_size=1, max_size=14))
    elif shape == "mixed":
        requests = [_config_req(draw(st.one_of(valid_configs, random_configs)))]
        requests += draw(st.lists(st.one_of(audio_messages, audio_messages, other_messages), max_size=8))
    else:
        requests = draw(st.lists(st.one_of(audio_messages, other_messages), max_size=6))
    ending = draw(st.sampled_from(["half-close", "half-close", "half-close", "cancel"]))
    cancel_after = draw(st.integers(0, len(requests))) if ending == "cancel" else None
    return requests, cancel_after


def expected_outcome(requests: list[Req], served: ServedModel) -> tuple[str | None, str | None]:
    """(code, a fragment of its message) where the requests decide the outcome alone; (None,
    None) where it depends on more (audio decoding, message order on the wire)."""
    if not requests:
        return "INVALID_ARGUMENT", "ended before a config"
    first = requests[0]
    if first.kind == "garbage":
        return "INVALID_ARGUMENT", "is not a valid"
    if first.kind != "config":
        return "INVALID_ARGUMENT", "first request must carry the config"
    try:
        validate_config(first.config, served)
    except StreamError as exc:
        return "INVALID_ARGUMENT", exc.message
    rest = requests[1:]
    if well_formed(requests):
        return "OK", None
    if any(r.kind in ("config", "garbage") for r in rest):
        return "INVALID_ARGUMENT", None
    return None, None


def well_formed(requests: list[Req]) -> bool:
    """A valid PCM16 stream whose transcript is predictable."""
    if not requests or requests[0].kind != "config" or requests[0].config.encoding != pb.PCM16:
        return False
    if requests[0].config.sample_rate != RATE or requests[0].config.model or requests[0].config.prompt:
        return False
    rest = requests[1:]
    return all(r.kind == "audio" and r.pcm16 is not None for r in rest) and (
        not rest or not b"".join(r.pcm16.tobytes() for r in rest).startswith(b"RIFF"))


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fuzz-client")


def send(target: str, requests: list[Req], cancel_after: int | None) -> tuple[str, str, list]:
    """Send raw requests through the sync API; (status code name, details, responses)."""
    reached = threading.Event()
    hold = threading.Event()

    def generate():
        for i, r in enumerate(requests):
            if i == cancel_after:
                reached.set()
                hold.wait(30)
                return
            yield r.data
        if cancel_after is not None:
            reached.set()
            hold.wait(30)

    with grpc.insecure_channel(target) as channel:
        method = channel.stream_stream(METHOD, request_serializer=None,
                                       response_deserializer=pb.StreamingRecognizeResponse.FromString)
        call = method(generate(), timeout=120)
        responses = []
        try:
            if cancel_after is not None:
                deadline = time.monotonic() + 30
                # The server may end the call first (a refused request): then there is nothing to cancel.
                while not reached.wait(0.005) and not call.done() and time.monotonic() < deadline:
                    pass
                call.cancel()
            for response in call:
                responses.append(response)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", responses
        finally:
            hold.set()
        return "OK", "", responses


def check_example(server: ThreadServer, batch, reference) -> None:
    outcomes = list(_POOL.map(lambda s: send(server.target, *s), batch))
    for (requests, cancel_after), (code, details, responses) in zip(batch, outcomes):
        event(f"outcome {code}" + (" (cancelling)" if cancel_after is not None else ""))
        event(f"responses {0 if not responses else 1 if len(responses) <= 5 else 6 if len(responses) <= 20 else 21}+")
        event(f"pcm seconds {round(sum(r.pcm16.size for r in requests if r.pcm16 is not None) / RATE)}")
        if cancel_after is not None and code == "CANCELLED":
            continue  # the client left; the server only has to clean up
        # Nothing here idles, stalls or runs long: the only refusal is of the input itself.
        assert code in ("OK", "INVALID_ARGUMENT"), (code, details)
        if code != "OK":
            assert details, f"{code} without a message"
        else:
            finals = [r for r in responses if r.results and r.results[0].is_final]
            assert len(finals) == 1 and responses[-1] is finals[0], "an OK stream ends with exactly one final"
        if cancel_after is not None:
            continue  # cut short: what it sent is not what the oracle sees
        want, fragment = expected_outcome(requests, server.served)
        if want is not None:
            assert code == want, (want, code, details)
            if fragment:
                assert fragment in details, (fragment, details)
        if want == "OK" and reference is not None:
            pcm = np.concatenate([r.pcm16 for r in requests[1:]] or [np.zeros(0, "<i2")])
            samples = pcm.astype(np.float32) / np.float32(32768.0)
            assert responses[-1].results[0].transcript == transcribe_alone(reference, samples)
    assert server.settled() == (0, 0), "a stream or slot was left behind"
    assert server.scheduler.dead_reason is None
    assert getattr(server.engine, "violations", []) == []


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])


@settings(max_examples=150, **FUZZ_SETTINGS)
@given(batch=st.lists(streams(), min_size=1, max_size=3))
def test_fuzzed_streams_fake_engine(fake_server, batch):
    check_example(fake_server, batch, FakeEngine())


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(batch=st.lists(streams(), min_size=1, max_size=3))
def test_fuzzed_streams_through_the_frontend_wire(wire_server, batch):
    """The same properties through a frontend and the engine host's IPC wire (--frontends N)."""
    check_example(wire_server, batch, FakeEngine())


@settings(max_examples=12, **FUZZ_SETTINGS)
@given(batch=st.lists(streams(), min_size=1, max_size=2))
def test_fuzzed_streams_real_engine(real_server, batch):
    check_example(real_server, batch, None)


# -- the long randomized mode: outside CI --------------------------------------------------------
LONG = os.environ.get("NEMO_STREAM_FUZZ_LONG")


@pytest.mark.skipif(not LONG, reason="the long randomized fuzz runs outside CI: NEMO_STREAM_FUZZ_LONG=EXAMPLES "
                                     "[NEMO_STREAM_FUZZ_SEED=N] pytest tests/test_fuzz.py -k long -s")
@pytest.mark.parametrize("which", ["fake", "wire", "real"])
def test_fuzz_long_randomized(which, request):
    """Random (not derandomized) examples, as many as NEMO_STREAM_FUZZ_LONG says, from a seed that
    is printed first (NEMO_STREAM_FUZZ_SEED reproduces a run); over the in-process server, the
    frontend wire and the real engine."""
    import random

    from hypothesis import seed as hypothesis_seed

    run_seed = int(os.environ.get("NEMO_STREAM_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    examples = int(LONG)
    print(f"\nfuzz long mode ({which}): seed {run_seed}, {examples} examples "
          f"(reproduce: NEMO_STREAM_FUZZ_LONG={examples} NEMO_STREAM_FUZZ_SEED={run_seed})", flush=True)
    server = request.getfixturevalue({"fake": "fake_server", "wire": "wire_server", "real": "real_server"}[which])
    reference = None if which == "real" else FakeEngine()

    @hypothesis_seed(run_seed)
    @settings(max_examples=examples, deadline=None, derandomize=False, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(streams(), min_size=1, max_size=3 if which != "real" else 2))
    def run(batch):
        check_example(server, batch, reference)

    run()


def test_the_fuzzed_servers_still_serve(fake_server):
    """After everything the fuzzers sent: a plain stream is exact."""
    pcm = (np.random.default_rng(5).standard_normal(RATE) * 3000).astype("<i2")
    requests = [_config_req(pb.RecognitionConfig(sample_rate=RATE, encoding=pb.PCM16)),
                *(_audio_req(pcm[i:i + 4000].tobytes(), pcm[i:i + 4000]) for i in range(0, pcm.size, 4000))]
    code, _, responses = send(fake_server.target, requests, None)
    assert code == "OK"
    assert responses[-1].results[0].transcript == transcribe_alone(FakeEngine(), pcm.astype(np.float32) / 32768.0)
