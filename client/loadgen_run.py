"""The load generator's runtime: one asyncio task per stream, a share of the streams per process.

Timing conventions (all time.monotonic() inside one process):
- a message's *send time* is when `call.write()` returned for it: its last byte was handed to
  gRPC's transport;
- a response *covers* a message when its `audio_processed` reaches the message's end; the
  message's chunk latency is the receipt of the first response covering it minus its send time
  (the final result covers every message);
- a response's *response latency* is its receipt minus the send time of the message that
  completed the audio its chunk needed: audio_processed plus the server's right context (the
  STFT of a chunk's last mel frame reads past the chunk's end; 6 ms for NeMo's 16 kHz models).
  Messages aligned to chunk boundaries then wait one message for that sliver of audio: chunk
  latency shows what a user waits, response latency what the server and transport add;
- in real-time mode message j is due when its audio has "played": stream start + end_j / rate.
  How late the sender woke up for it (event-loop lateness) is recorded apart from how long the
  write then took (transport back-pressure), so a busy load generator is told from a slow server.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from client.balancing import channel_target
from client.loadgen_audio import AudioItem, AudioSpec
from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc

_ENCODING = {"PCM16": pb.PCM16, "FLOAT32": pb.FLOAT32}
_COVER_EPS_S = 1e-4          # float slack when comparing audio_processed with a message's end
_STREAMS_PER_CHANNEL = 100    # HTTP/2 connections: one per this many streams (auto mode)
_LAG_PERIOD_S = 0.01


@dataclass(frozen=True)
class RunOptions:
    target: str                             # HOST:PORT, several comma-separated, or a gRPC target
    chunk_ms: float
    balance: bool = False                   # client-side balancing over every address (client.balancing)
    realtime: bool = True
    interim: bool = True
    model: str = ""
    lookahead_ms: int = 0
    stream_timeout_s: float | None = None   # gRPC deadline per stream; None: none
    right_context_ms: float = 6.0           # audio the server needs past a chunk's end (response latency)
    channels: int = 0                       # connections per worker; 0: one per 100 streams
    label: str = "loadgen"


@dataclass(frozen=True)
class LevelSpec:
    concurrency: int
    ramp_s: float
    start_wall: float       # time.time() at which stream 0 starts (shared by every worker)
    deadline_s: float       # from start_wall: streams still open then are cancelled


@dataclass
class StreamRecord:
    index: int
    audio: str
    audio_s: float
    code: str = "OK"                   # gRPC status name, or LOADGEN_* for the load generator's own
    detail: str = ""
    transcript: str | None = None      # the final transcript (None without a final)
    first_partial_ms: float | None = None   # first audio sent -> first response received
    first_text_ms: float | None = None      # first audio sent -> first non-empty transcript
    final_ms: float | None = None           # last audio sent -> final received
    wall_s: float | None = None             # first audio sent -> final received
    responses: int = 0
    uncovered: int = 0                      # messages sent that no response covered
    anomalies: list[str] = field(default_factory=list)


@dataclass
class ShareResult:
    """What one worker measured for its share of a level's streams."""

    worker: int
    streams: list[StreamRecord]
    chunk_latency_ms: list[float]
    response_latency_ms: list[float]
    response_latency_negative: int
    loop_lag_ms: list[float]
    wake_late_ms: list[float]      # real-time sends: wake-up time minus due time
    write_ms: list[float]          # time call.write() took (transport back-pressure)
    cpu_s: float
    wall_s: float
    first_start_wall: float
    last_end_wall: float
    pid: int = 0


class _Responses:
    """The responses of one stream, as compact parallel lists."""

    __slots__ = ("times", "indices", "processed", "final_text", "final_count", "first_text_t")

    def __init__(self):
        self.times: list[float] = []
        self.indices: list[int] = []
        self.processed: list[float] = []
        self.final_text: str | None = None
        self.final_count = 0
        self.first_text_t: float | None = None


async def _read_all(call, out: _Responses) -> None:
    while True:
        r = await call.read()
        if r is grpc.aio.EOF:
            return
        t = time.monotonic()
        out.times.append(t)
        out.indices.append(r.chunk_index)
        out.processed.append(r.audio_processed)
        if r.results:
            res = r.results[0]
            if res.is_final:
                out.final_count += 1
                out.final_text = res.transcript
            if out.first_text_t is None and res.transcript:
                out.first_text_t = t


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _config(item: AudioItem, opts: RunOptions, index: int) -> pb.StreamingRecognizeRequest:
    return pb.StreamingRecognizeRequest(config=pb.RecognitionConfig(
        model=opts.model, lookahead_ms=opts.lookahead_ms, sample_rate=item.sample_rate,
        encoding=_ENCODING[item.encoding], channels=item.channels, interim_results=opts.interim,
        client_label=f"{opts.label}-{index}"[:128]))


@dataclass
class _Prepared:
    item: AudioItem
    requests: list[pb.StreamingRecognizeRequest]
    ends_s: list[float]     # each message's end, in seconds of audio


class _ShareStats:
    def __init__(self):
        self.chunk_latency_ms: list[float] = []
        self.response_latency_ms: list[float] = []
        self.response_latency_negative = 0
        self.wake_late_ms: list[float] = []
        self.write_ms: list[float] = []
        self.done = 0
        self.errors = 0


async def run_stream(stub, index: int, prep: _Prepared, t_start: float, opts: RunOptions,
                     stats: _ShareStats) -> StreamRecord:
    """One stream: config, then the audio messages (paced or not), then half-close; reads the
    responses meanwhile. Never raises for an RPC error: the record carries the status."""
    item = prep.item
    rec = StreamRecord(index=index, audio=item.name, audio_s=item.seconds)
    await _sleep_until(t_start)
    n = len(prep.requests)
    sent = [math.nan] * n
    responses = _Responses()
    call = stub.StreamingRecognize(timeout=opts.stream_timeout_s)
    reader = asyncio.get_running_loop().create_task(_read_all(call, responses))
    t_done = None
    try:
        try:
            await call.write(_config(item, opts, index))
            for j, request in enumerate(prep.requests):
                if opts.realtime:
                    due = t_start + prep.ends_s[j]
                    await _sleep_until(due)
                    stats.wake_late_ms.append(1e3 * (time.monotonic() - due))
                if reader.done():
                    break  # the call ended (an error status); stop sending
                t0 = time.monotonic()
                await call.write(request)
                sent[j] = time.monotonic()
                stats.write_ms.append(1e3 * (sent[j] - t0))
            else:
                await call.done_writing()
                t_done = time.monotonic()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass  # the reader gets the status
        try:
            await reader
        except grpc.aio.AioRpcError:
            pass
        code = await call.code()
        rec.code = code.name
        if code != grpc.StatusCode.OK:
            rec.detail = (await call.details() or "")[:300]
    except asyncio.CancelledError:
        call.cancel()
        reader.cancel()
        raise
    finally:
        if not reader.done():
            reader.cancel()
    _account(rec, responses, sent, prep.ends_s, t_done, stats, opts.right_context_ms / 1e3)
    return rec


def _account(rec: StreamRecord, responses: _Responses, sent: list[float], ends_s: list[float],
             t_done: float | None, stats: _ShareStats, right_context_s: float = 0.0) -> None:
    times, processed, indices = responses.times, responses.processed, responses.indices
    rec.responses = len(times)
    rec.transcript = responses.final_text
    first_sent = sent[0] if sent and not math.isnan(sent[0]) else None
    # Chunk latency: each sent message against the first response whose audio covers it.
    r = 0
    for j, t_sent in enumerate(sent):
        if math.isnan(t_sent):
            continue
        while r < len(times) and processed[r] < ends_s[j] - _COVER_EPS_S:
            r += 1
        if r < len(times):
            stats.chunk_latency_ms.append(1e3 * (times[r] - t_sent))
        elif responses.final_count and rec.code == "OK":
            # The final covers everything even when it reports less (a resampled tail).
            stats.chunk_latency_ms.append(1e3 * (times[-1] - t_sent))
        else:
            rec.uncovered += 1
    # Response latency: each interim response against the message that completed the audio its
    # chunk needed (its audio_processed plus the server's right context).
    n_interim = len(times) - (1 if responses.final_count else 0)
    j = 0
    for r in range(n_interim):
        need = processed[r] + right_context_s - _COVER_EPS_S
        while j < len(ends_s) and ends_s[j] < need:
            j += 1
        if j >= len(ends_s) or math.isnan(sent[j]):
            continue  # made ready by the end of the audio, or never sent
        latency = times[r] - sent[j]
        if latency < 0:
            stats.response_latency_negative += 1  # the right-context setting is too large
        else:
            stats.response_latency_ms.append(1e3 * latency)
    if first_sent is not None and times:
        rec.first_partial_ms = 1e3 * (times[0] - first_sent)
    if first_sent is not None and responses.first_text_t is not None:
        rec.first_text_ms = 1e3 * (responses.first_text_t - first_sent)
    if rec.code == "OK":
        if responses.final_count != 1:
            rec.anomalies.append(f"{responses.final_count} final results")
        if times and t_done is not None:
            rec.final_ms = 1e3 * (times[-1] - t_done)
            if first_sent is not None:
                rec.wall_s = times[-1] - first_sent
    if any(b < a for a, b in zip(indices, indices[1:])):
        rec.anomalies.append("chunk_index went backwards")
    if any(b < a - _COVER_EPS_S for a, b in zip(processed, processed[1:])):
        rec.anomalies.append("audio_processed went backwards")
    stats.done += 1
    if rec.code != "OK":
        stats.errors += 1


def prepare(items: list[AudioItem], chunk_ms: float) -> list[_Prepared]:
    out = []
    for item in items:
        pieces, ends = item.messages(chunk_ms)
        out.append(_Prepared(item, [pb.StreamingRecognizeRequest(audio=p) for p in pieces],
                             [e / item.sample_rate for e in ends]))
    return out


async def _lag_monitor(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(_LAG_PERIOD_S)
        samples.append(1e3 * max(time.monotonic() - t - _LAG_PERIOD_S, 0.0))


def make_channels(target: str, count: int, balance: bool = False) -> list[grpc.aio.Channel]:
    # A local subchannel pool and a distinct argument per channel: separate TCP connections.
    # Several servers (or `balance`): each channel balances its streams over all of them.
    target, balancing = channel_target(target, balance)
    return [grpc.aio.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1), ("loadgen.channel", i),
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20), *balancing])
        for i in range(count)]


async def run_share(level: LevelSpec, worker: int, workers: int, prepared: list[_Prepared], opts: RunOptions,
                    progress: Callable[[int, int], None] | None = None) -> ShareResult:
    """Run streams worker, worker + workers, ... of the level; stream i plays audio item
    i % len(items) and starts at start + ramp * i / concurrency."""
    indices = list(range(worker, level.concurrency, workers))
    if not indices:  # more workers than streams: nothing to measure here
        return ShareResult(worker=worker, streams=[], chunk_latency_ms=[], response_latency_ms=[],
                           response_latency_negative=0, loop_lag_ms=[], wake_late_ms=[], write_ms=[], cpu_s=0.0,
                           wall_s=0.0, first_start_wall=level.start_wall, last_end_wall=level.start_wall, pid=os.getpid())
    n_channels = opts.channels or max(1, min(16, math.ceil(len(indices) / _STREAMS_PER_CHANNEL)))
    channels = make_channels(opts.target, n_channels, opts.balance)
    stubs = [pb_grpc.SpeechRecognitionStub(c) for c in channels]
    stats = _ShareStats()
    lag: list[float] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = time.monotonic() + (level.start_wall - time.time())
    c = max(level.concurrency, 1)
    cpu0, wall0 = time.process_time(), time.monotonic()
    monitor = loop.create_task(_lag_monitor(lag, stop))
    tasks = {loop.create_task(run_stream(stubs[k % n_channels], i, prepared[i % len(prepared)],
                                         t0 + level.ramp_s * i / c, opts, stats)): i
             for k, i in enumerate(indices)}
    records: list[StreamRecord] = []
    pending = set(tasks)
    deadline = t0 + level.deadline_s
    try:
        while pending:
            timeout = min(0.5, max(deadline - time.monotonic(), 0.0))
            done, pending = await asyncio.wait(pending, timeout=timeout)
            for task in done:
                records.append(_record_of(task, tasks[task], prepared))
            if progress is not None:
                progress(stats.done, stats.errors)
            if pending and time.monotonic() >= deadline:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                for task in pending:
                    i = tasks[task]
                    item = prepared[i % len(prepared)].item
                    records.append(StreamRecord(i, item.name, item.seconds, code="LOADGEN_TIMEOUT",
                                                detail=f"still open {level.deadline_s:g} s after the level began"))
                pending = set()
    finally:
        stop.set()
        await monitor
        for ch in channels:
            await ch.close()
    if progress is not None:
        progress(len(records), sum(1 for r in records if r.code != "OK"))
    records.sort(key=lambda r: r.index)
    return ShareResult(
        worker=worker, streams=records, chunk_latency_ms=stats.chunk_latency_ms,
        response_latency_ms=stats.response_latency_ms, response_latency_negative=stats.response_latency_negative,
        loop_lag_ms=lag,
        wake_late_ms=stats.wake_late_ms, write_ms=stats.write_ms, cpu_s=time.process_time() - cpu0,
        wall_s=time.monotonic() - wall0, first_start_wall=level.start_wall,
        last_end_wall=time.time(), pid=os.getpid())


def _record_of(task: asyncio.Task, index: int, prepared: list[_Prepared]) -> StreamRecord:
    exc = task.exception() if not task.cancelled() else None
    if exc is None and not task.cancelled():
        return task.result()
    item = prepared[index % len(prepared)].item
    return StreamRecord(index, item.name, item.seconds, code="LOADGEN_ERROR",
                        detail=f"{type(exc).__name__}: {exc}"[:300] if exc else "cancelled")


# -- worker processes ------------------------------------------------------------------------
def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


def worker_main(worker: int, workers: int, audio: AudioSpec, chunk_ms: float, opts: RunOptions,
                use_uvloop: bool, conn, progress_queue) -> None:
    """A worker process: builds its audio, then runs one level per LevelSpec received on
    `conn` and sends back its ShareResult, until it receives None."""
    loop = new_event_loop(use_uvloop)
    asyncio.set_event_loop(loop)
    try:
        prepared = prepare(audio.load(), chunk_ms)
        conn.send(("ready", worker))
        last = [0.0]

        def progress(done: int, errors: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.25:
                last[0] = now
                progress_queue.put((worker, done, errors))

        while True:
            level = conn.recv()
            if level is None:
                break
            result = loop.run_until_complete(run_share(level, worker, workers, prepared, opts, progress))
            progress_queue.put((worker, len(result.streams), sum(1 for r in result.streams if r.code != "OK")))
            conn.send(("result", result))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails loudly
        try:
            conn.send(("error", f"worker {worker}: {type(exc).__name__}: {exc}"))
        except Exception:
            pass
    finally:
        loop.close()
