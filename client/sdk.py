"""Client SDK: sync (AsrClient) and asyncio (AsyncAsrClient) streaming recognition.

Results are iterated while audio is still being sent: gRPC sends the request iterator from its
own thread (sync) or task (async).

    with AsrClient("localhost:50051") as client:
        for response in client.transcribe("speech.wav", interim=True):
            if response.result:
                print(response.result.transcript)

A stream is a sequence of utterances. Without endpointing it is one utterance with one final at
the end of the audio. With `StreamOptions(endpointing=Endpointing(stop_history_ms=320))` the
server ends an utterance when the speaker stops and sends its final at once (a response's
`finals`); a client with its own turn detector asks for the open utterance's final itself, with
END_UTTERANCE in the audio it streams or `end_utterance()` on a live stream:

    async with client.live(sample_rate=16000, encoding="PCM16", options=options) as call:
        await call.send(pcm_bytes)
        await call.end_utterance()
        async for response in call: ...

Several servers, each stream on the next healthy one (client.balancing):

    AsrClient("10.0.0.5:50051,10.0.0.6:50051")             # a fixed list
    AsrClient("asr-headless.asr.svc:50051", balance=True)   # every address of a name, re-resolved
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from client.audio_source import AudioFormat, apaced, encoding_of, file_chunks, paced, to_bytes
from client.balancing import channel_target
from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc

_ENCODINGS = {None: pb.AUDIO_ENCODING_UNSPECIFIED, "PCM16": pb.PCM16, "FLOAT32": pb.FLOAT32}


class AsrError(Exception):
    """The server ended a call with an error status."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> AsrError:
        return cls(exc.code().name, exc.details() or "")


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Result:
    transcript: str
    is_final: bool
    stability: float
    words: tuple[Word, ...] = ()
    utterance_index: int = 0    # 0, 1, ... within the stream
    start: float = 0.0          # the utterance's first and last speech, seconds from the stream's start
    end: float = 0.0            # (finals; interims carry the start once known)
    end_reason: str = ""        # finals: "endpoint", "client" (end_utterance) or "end_of_audio"


@dataclass(frozen=True)
class Response:
    """One server response: one per processed chunk. Without endpointing the last carries the
    stream's one final result; with it, any response may carry finals of utterances."""

    chunk_index: int
    audio_processed: float
    stream_id: str
    result: Result | None     # the first result; None: interim results are off and nothing is final
    received_at: float        # time.monotonic() when the client got it
    results: tuple[Result, ...] = ()   # every result: the finals this chunk closed, then the interim

    @property
    def is_final(self) -> bool:
        return self.result is not None and self.result.is_final

    @property
    def finals(self) -> tuple[Result, ...]:
        """The utterance finals this response carries, in order."""
        return tuple(r for r in self.results if r.is_final)


@dataclass(frozen=True)
class Endpointing:
    """Endpointing settings (Riva's EndpointingConfig semantics; 0: the server's default)."""

    start_history_ms: int = 0
    start_threshold: float = 0.0
    stop_history_ms: int = 0
    stop_threshold: float = 0.0
    stop_history_eou_ms: int = 0
    stop_threshold_eou: float = 0.0


@dataclass(frozen=True)
class StreamOptions:
    model: str = ""
    lookahead_ms: int = 0
    interim: bool = False
    language: str = ""
    label: str = ""
    endpointing: Endpointing | None = None   # None: the stream is one utterance


class _EndUtterance:
    def __repr__(self) -> str:
        return "END_UTTERANCE"


# Put this among the audio chunks a stream sends: the open utterance's final, now (the client's
# own turn detector decided the speaker stopped).
END_UTTERANCE = _EndUtterance()


def _result(r: pb.RecognitionResult) -> Result:
    return Result(r.transcript, r.is_final, r.stability,
                  tuple(Word(w.word, w.start_seconds, w.end_seconds) for w in r.words),
                  r.utterance_index, r.start_seconds, r.end_seconds, r.end_reason)


def _response(r: pb.StreamingRecognizeResponse) -> Response:
    results = tuple(_result(x) for x in r.results)
    return Response(r.chunk_index, r.audio_processed, r.stream_id, results[0] if results else None,
                    time.monotonic(), results)


def joined(finals: list[Result]) -> Result:
    """A stream's utterance finals as one final (texts joined by spaces, words in order)."""
    if len(finals) == 1:
        return finals[0]
    if not finals:
        return Result("", True, 1.0)
    return Result(" ".join(f.transcript for f in finals if f.transcript), True, min(f.stability for f in finals),
                  tuple(w for f in finals for w in f.words), 0, finals[0].start, finals[-1].end,
                  finals[-1].end_reason)


def _config(fmt: AudioFormat, options: StreamOptions) -> pb.RecognitionConfig:
    config = pb.RecognitionConfig(
        model=options.model, lookahead_ms=options.lookahead_ms,
        sample_rate=0 if fmt.wav else fmt.sample_rate, encoding=_ENCODINGS[None if fmt.wav else fmt.encoding],
        channels=0 if fmt.wav else fmt.channels, interim_results=options.interim,
        language=options.language, client_label=options.label)
    if options.endpointing is not None:
        e = options.endpointing
        config.endpointing.CopyFrom(pb.EndpointingConfig(
            start_history_ms=e.start_history_ms, start_threshold=e.start_threshold,
            stop_history_ms=e.stop_history_ms, stop_threshold=e.stop_threshold,
            stop_history_eou_ms=e.stop_history_eou_ms, stop_threshold_eou=e.stop_threshold_eou))
    return config


def _request(chunk) -> pb.StreamingRecognizeRequest:
    if chunk is END_UTTERANCE:
        return pb.StreamingRecognizeRequest(end_utterance=True)
    return pb.StreamingRecognizeRequest(audio=to_bytes(chunk))


def _peek_format(chunks: Iterable, sample_rate: int, encoding: str | None) -> tuple[AudioFormat, Iterator]:
    """Infer the encoding from the first chunk's dtype when not given (int16 PCM16, float FLOAT32)."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        return AudioFormat(sample_rate, encoding or "PCM16"), iter(())
    encoding = encoding or encoding_of(first) or "PCM16"
    return AudioFormat(sample_rate, encoding), itertools.chain([first], it)


def _requests(fmt: AudioFormat, options: StreamOptions, chunks: Iterable) -> Iterator[pb.StreamingRecognizeRequest]:
    yield pb.StreamingRecognizeRequest(config=_config(fmt, options))
    for chunk in chunks:
        yield _request(chunk)


@dataclass(frozen=True)
class Credentials:
    """How to reach a secured server. `tls` with no CA trusts the system's roots; `tls_ca`
    (a PEM file) pins the server's CA; `tls_cert` + `tls_key` present a client certificate
    (mutual TLS); `tls_server_name` overrides the name checked against the server's
    certificate; `token` is sent as `authorization: Bearer <token>` on every call."""

    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a client certificate needs its key (tls_cert and tls_key)")
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca), private_key=read(self.tls_key),
                                            certificate_chain=read(self.tls_cert))

    def options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20)]


def open_channel(target: str | Sequence[str], credentials: Credentials = Credentials(), aio: bool = False,
                 balance: bool = False, own_connection: int | None = None):
    """A sync (or grpc.aio) channel to `target`, over TLS when the credentials ask for it.
    Several servers ("a:1,b:2" or a list), or `balance` with one name, give a channel that
    places each call on the next healthy server (client.balancing). `own_connection` (a
    number) gives the channel TCP connections of its own, not shared with other channels."""
    module = grpc.aio if aio else grpc
    target, balancing = channel_target(target, balance)
    options = _CHANNEL_OPTIONS + balancing + credentials.options()
    if own_connection is not None:
        options = options + [("grpc.use_local_subchannel_pool", 1), ("nemostream.connection", own_connection)]
    if credentials.secure:
        return module.secure_channel(target, credentials.channel_credentials(), options=options)
    return module.insecure_channel(target, options=options)


class _Connections:
    """A client's channels and stubs: one, or `count` with TCP connections of their own, each
    call on the next (round robin). A server with several frontend processes spreads
    connections over them, not calls, so a client carrying many streams at once opens several
    connections (`connections=`) to load them evenly."""

    def __init__(self, target, credentials: Credentials, aio: bool, balance: bool, count: int, channel):
        if count < 1:
            raise ValueError(f"connections must be >= 1, got {count}")
        if channel is not None and count != 1:
            raise ValueError("give either a channel or a number of connections")
        if channel is not None:
            self.channels = [channel]
        elif count == 1:
            self.channels = [open_channel(target, credentials, aio=aio, balance=balance)]
        else:
            self.channels = [open_channel(target, credentials, aio=aio, balance=balance, own_connection=i)
                             for i in range(count)]
        self.stubs = [pb_grpc.SpeechRecognitionStub(c) for c in self.channels]
        self._turn = itertools.cycle(range(len(self.stubs)))

    def stub(self) -> pb_grpc.SpeechRecognitionStub:
        return self.stubs[next(self._turn)]


class AsrClient:
    def __init__(self, target: str | Sequence[str], *, channel: grpc.Channel | None = None, timeout: float | None = None,
                 credentials: Credentials = Credentials(), balance: bool = False, connections: int = 1):
        self._connections = _Connections(target, credentials, False, balance, connections, channel)
        self._metadata = credentials.metadata()
        self.timeout = timeout

    @property
    def _stub(self) -> pb_grpc.SpeechRecognitionStub:
        return self._connections.stub()

    def __enter__(self) -> AsrClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._connections.channels:
            channel.close()

    def stream(self, chunks: Iterable[bytes | np.ndarray], *, sample_rate: int = 0, encoding: str | None = None,
               options: StreamOptions = StreamOptions(), realtime: bool = False,
               fmt: AudioFormat | None = None) -> Iterator[Response]:
        """Stream any iterable of audio chunks (bytes, int16 or float arrays) and iterate the
        responses while it is sent. `realtime` paces sending to the audio's duration."""
        if fmt is None:
            fmt, chunks = _peek_format(chunks, sample_rate, encoding)
        data: Iterable = (c if c is END_UTTERANCE else to_bytes(c) for c in chunks)
        if realtime:
            if not fmt.bytes_per_second:
                raise ValueError("realtime pacing needs the sample rate")
            data = paced(data, fmt.bytes_per_second)
        call = self._stub.StreamingRecognize(_requests(fmt, options, data), timeout=self.timeout, metadata=self._metadata)
        try:
            for response in call:
                yield _response(response)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None
        finally:
            call.cancel()  # no-op once finished; stops the upload if the caller stops iterating

    def transcribe(self, path: str | Path, *, options: StreamOptions = StreamOptions(), realtime: bool = False,
                   chunk_ms: float = 100.0, raw_format: AudioFormat | None = None) -> Iterator[Response]:
        fmt, chunks = file_chunks(path, chunk_ms, raw_format)
        pace = AudioFormat(fmt.sample_rate, fmt.encoding, fmt.channels)
        data = paced(chunks, pace.bytes_per_second) if realtime else chunks
        return self.stream(data, options=options, fmt=fmt)

    def transcribe_file(self, path: str | Path, **kwargs) -> Result:
        """The file's final (with endpointing: its utterances' finals joined)."""
        return joined(self.transcribe_utterances(path, **kwargs))

    def transcribe_utterances(self, path: str | Path, **kwargs) -> list[Result]:
        """Every utterance's final, in order (one without endpointing)."""
        finals = [f for response in self.transcribe(path, **kwargs) for f in response.finals]
        assert finals, "the stream ended without a final result"
        return finals

    def live(self, *, sample_rate: int, encoding: str = "PCM16", channels: int = 1,
             options: StreamOptions = StreamOptions()) -> LiveStream:
        """A stream the caller feeds as audio comes (send, end_utterance, close) while it
        iterates the responses, e.g. from another thread."""
        return LiveStream(self._stub, AudioFormat(sample_rate, encoding, channels), options, self.timeout,
                          self._metadata)

    def recognize(self, audio: bytes | str | Path, *, sample_rate: int = 0, encoding: str | None = None,
                  options: StreamOptions = StreamOptions()) -> Result:
        """Unary recognition of a whole file (a path, or its bytes)."""
        data = Path(audio).read_bytes() if isinstance(audio, (str, Path)) else audio
        fmt = AudioFormat(sample_rate, encoding or "PCM16", wav=data[:4] == b"RIFF")
        try:
            response = self._stub.Recognize(pb.RecognizeRequest(config=_config(fmt, options), audio=data),
                                            timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None
        return _result(response.result)

    def list_models(self) -> list[pb.ModelInfo]:
        try:
            return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata).models)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None


class AsyncAsrClient:
    """asyncio twin of AsrClient.

    Known grpc.aio limitation (grpc/grpc#36066): when the server refuses a stream while this
    client is still writing audio, grpc.aio may report INTERNAL "Internal error from Core"
    instead of the server's status. The sync AsrClient reports the real status.
    """

    def __init__(self, target: str | Sequence[str], *, channel: grpc.aio.Channel | None = None, timeout: float | None = None,
                 credentials: Credentials = Credentials(), balance: bool = False, connections: int = 1):
        self._connections = _Connections(target, credentials, True, balance, connections, channel)
        self._metadata = credentials.metadata()
        self.timeout = timeout

    @property
    def _stub(self) -> pb_grpc.SpeechRecognitionStub:
        return self._connections.stub()

    async def __aenter__(self) -> AsyncAsrClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._connections.channels:
            await channel.close()

    async def stream(self, chunks: Iterable[bytes | np.ndarray] | AsyncIterable[bytes | np.ndarray], *,
                     sample_rate: int = 0, encoding: str | None = None, options: StreamOptions = StreamOptions(),
                     realtime: bool = False, fmt: AudioFormat | None = None) -> AsyncIterator[Response]:
        """Stream chunks (a sync or async iterable) and iterate responses as they come."""
        if fmt is None:
            if isinstance(chunks, AsyncIterable):
                if not encoding:
                    raise ValueError("give the encoding for an async source")
                fmt = AudioFormat(sample_rate, encoding)
            else:
                fmt, chunks = _peek_format(chunks, sample_rate, encoding)

        async def requests():
            yield pb.StreamingRecognizeRequest(config=_config(fmt, options))
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    yield _request(chunk)
            elif realtime:
                async for chunk in apaced((c if c is END_UTTERANCE else to_bytes(c) for c in chunks),
                                          fmt.bytes_per_second):
                    yield _request(chunk)
            else:
                for chunk in chunks:
                    yield _request(chunk)

        if realtime and not fmt.bytes_per_second:
            raise ValueError("realtime pacing needs the sample rate")
        call = self._stub.StreamingRecognize(requests(), timeout=self.timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield _response(response)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None
        finally:
            call.cancel()

    async def transcribe(self, path: str | Path, *, options: StreamOptions = StreamOptions(), realtime: bool = False,
                         chunk_ms: float = 100.0, raw_format: AudioFormat | None = None) -> AsyncIterator[Response]:
        fmt, chunks = file_chunks(path, chunk_ms, raw_format)
        if realtime:
            pace = AudioFormat(fmt.sample_rate, fmt.encoding, fmt.channels)
            source = apaced(chunks, pace.bytes_per_second)
        else:
            source = chunks
        async for response in self.stream(source, options=options, fmt=fmt):
            yield response

    async def transcribe_file(self, path: str | Path, **kwargs) -> Result:
        """The file's final (with endpointing: its utterances' finals joined)."""
        return joined(await self.transcribe_utterances(path, **kwargs))

    async def transcribe_utterances(self, path: str | Path, **kwargs) -> list[Result]:
        """Every utterance's final, in order (one without endpointing)."""
        finals = [f async for response in self.transcribe(path, **kwargs) for f in response.finals]
        assert finals, "the stream ended without a final result"
        return finals

    def live(self, *, sample_rate: int, encoding: str = "PCM16", channels: int = 1,
             options: StreamOptions = StreamOptions()) -> AsyncLiveStream:
        """A stream the caller feeds as audio comes (send, end_utterance, close) while it
        iterates the responses in another task; use with `async with`."""
        return AsyncLiveStream(self._stub, AudioFormat(sample_rate, encoding, channels), options, self.timeout,
                               self._metadata)

    async def recognize(self, audio: bytes | str | Path, *, sample_rate: int = 0, encoding: str | None = None,
                        options: StreamOptions = StreamOptions()) -> Result:
        data = Path(audio).read_bytes() if isinstance(audio, (str, Path)) else audio
        fmt = AudioFormat(sample_rate, encoding or "PCM16", wav=data[:4] == b"RIFF")
        try:
            response = await self._stub.Recognize(pb.RecognizeRequest(config=_config(fmt, options), audio=data),
                                                  timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None
        return _result(response.result)

    async def list_models(self) -> list[pb.ModelInfo]:
        try:
            return list((await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata)).models)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None


class LiveStream:
    """A streaming call fed by the caller: `send(audio)`, `end_utterance()` (the open
    utterance's final, now: the caller's turn detector decided), `close()` (end of audio);
    iterate it for the responses (another thread may feed it meanwhile)."""

    def __init__(self, stub, fmt: AudioFormat, options: StreamOptions, timeout: float | None, metadata):
        self._queue: queue.Queue = queue.Queue()
        self._queue.put(pb.StreamingRecognizeRequest(config=_config(fmt, options)))
        self._closed = threading.Event()
        self._call = stub.StreamingRecognize(self._requests(), timeout=timeout, metadata=metadata)

    def _requests(self) -> Iterator[pb.StreamingRecognizeRequest]:
        while (request := self._queue.get()) is not None:
            yield request

    def send(self, chunk: bytes | np.ndarray) -> None:
        if self._closed.is_set():
            raise ValueError("the stream's audio is closed")
        self._queue.put(pb.StreamingRecognizeRequest(audio=to_bytes(chunk)))

    def end_utterance(self) -> None:
        if self._closed.is_set():
            raise ValueError("the stream's audio is closed")
        self._queue.put(pb.StreamingRecognizeRequest(end_utterance=True))

    def close(self) -> None:
        """End of audio: the server finishes the last utterance and ends the stream."""
        if not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)

    def __iter__(self) -> Iterator[Response]:
        try:
            for response in self._call:
                yield _response(response)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None

    def cancel(self) -> None:
        self.close()
        self._call.cancel()

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncLiveStream:
    """asyncio twin of LiveStream: `await send(audio)`, `await end_utterance()`, `await close()`;
    `async for response in stream` in another task."""

    def __init__(self, stub, fmt: AudioFormat, options: StreamOptions, timeout: float | None, metadata):
        self._config = pb.StreamingRecognizeRequest(config=_config(fmt, options))
        self._call = stub.StreamingRecognize(timeout=timeout, metadata=metadata)
        self._started = False

    async def _write(self, request: pb.StreamingRecognizeRequest | None) -> None:
        try:
            if not self._started:
                self._started = True
                await self._call.write(self._config)
            if request is None:
                await self._call.done_writing()
            else:
                await self._call.write(request)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None

    async def send(self, chunk: bytes | np.ndarray) -> None:
        await self._write(pb.StreamingRecognizeRequest(audio=to_bytes(chunk)))

    async def end_utterance(self) -> None:
        await self._write(pb.StreamingRecognizeRequest(end_utterance=True))

    async def close(self) -> None:
        """End of audio: the server finishes the last utterance and ends the stream."""
        await self._write(None)

    async def __aiter__(self) -> AsyncIterator[Response]:
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                yield _response(response)
        except grpc.RpcError as exc:
            raise AsrError.from_rpc(exc) from None

    async def __aenter__(self) -> AsyncLiveStream:
        if not self._started:
            self._started = True
            await self._call.write(self._config)
        return self

    async def __aexit__(self, *exc) -> None:
        self._call.cancel()
