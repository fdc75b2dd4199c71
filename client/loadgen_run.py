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

Calls of several utterances (AudioSpec.utterances, with endpointing or client end-of-utterance
requests): the server sends one final per utterance. A final belongs to the utterance whose
window holds its end_seconds (an utterance's window runs from its speech start to the next
one's). The utterance's final is the first final of its window received after the message
holding its last speech sample was sent; others in the window are extra (finals before it split
the utterance, finals after it closed noise in the pause), and a window without such a final is
a missed utterance (its end went into the next utterance's final, or none came). An
utterance's *time to final* is its final's receipt minus the end of its speech (see below); with client end of utterance, the request is sent when the audio --client-eou-ms past
the speech's end has played (a turn detector's wait), and *EOU to final* is the final's receipt
minus that request's send time (finals closed by the endpointer first are counted apart).
Paced in real time, the time to final counts from the instant the last speech sample played (the
message's send time less the audio after that sample in it), the end of speech a caller makes.
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
# HTTP/2 connections: one per this many streams (auto mode), at most _MAX_AUTO_CHANNELS per worker.
# A server with --frontends spreads connections, not streams, over its frontend processes (the
# kernel's SO_REUSEPORT hash), so few connections load them unevenly: on the H200 with one
# per 100 streams (8 workers, 24 connections at 2,133 streams) one frontend's event loop ran at
# 0.96 of a core while another's ran at 0.25, and that frontend's streams timed out (run 26,
# bench/RESULTS.md). Callers behind a voice agent open one connection per call.
_STREAMS_PER_CHANNEL = 25
_MAX_AUTO_CHANNELS = 64
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
    channels: int = 0                       # connections per worker; 0: one per 25 streams
    label: str = "loadgen"
    # Endpointing settings (EndpointingConfig fields; 0: the server's default); None: off.
    endpointing: tuple[tuple[str, float], ...] | None = None
    client_eou_ms: float | None = None      # calls: end_utterance this long after each speech end


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
    # Calls of several utterances (see the module's docstring).
    utterances: int = 0                     # utterances in the audio sent
    finals: int = 0                         # final results received
    missed: int = 0                         # utterances without a final
    extra_finals: int = 0                   # finals beyond one in an utterance's window
    end_reasons: dict[str, int] = field(default_factory=dict)   # of the utterances' finals
    eou_preempted: int = 0                  # client EOU sent, but the final was closed otherwise


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
    time_to_final_ms: list[float] = field(default_factory=list)   # calls: per utterance
    eou_to_final_ms: list[float] = field(default_factory=list)    # calls with client EOU


class _Responses:
    """The responses of one stream, as compact parallel lists."""

    __slots__ = ("times", "indices", "processed", "final_text", "final_count", "first_text_t", "finals")

    def __init__(self):
        self.times: list[float] = []
        self.indices: list[int] = []
        self.processed: list[float] = []
        self.final_text: str | None = None
        self.final_count = 0
        self.first_text_t: float | None = None
        self.finals: list[Final] = []   # every final result (calls of several utterances)


@dataclass(frozen=True)
class Final:
    """One final result as received."""

    t: float                 # receipt, time.monotonic()
    start_s: float           # the utterance's start and end, seconds from the stream's start
    end_s: float
    index: int               # utterance_index
    end_reason: str
    transcript: str


async def _read_all(call, out: _Responses, utterances: bool = False) -> None:
    while True:
        r = await call.read()
        if r is grpc.aio.EOF:
            return
        t = time.monotonic()
        out.times.append(t)
        out.indices.append(r.chunk_index)
        out.processed.append(r.audio_processed)
        if not r.results:
            continue
        if utterances:  # finals of several utterances, in order, then the open one's interim
            for res in r.results:
                if res.is_final:
                    out.final_count += 1
                    out.finals.append(Final(t, res.start_seconds, res.end_seconds, res.utterance_index,
                                            res.end_reason, res.transcript))
                if out.first_text_t is None and res.transcript:
                    out.first_text_t = t
            if out.finals:
                out.final_text = " ".join(f.transcript for f in out.finals if f.transcript)
            continue
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
    config = pb.RecognitionConfig(
        model=opts.model, lookahead_ms=opts.lookahead_ms, sample_rate=item.sample_rate,
        encoding=_ENCODING[item.encoding], channels=item.channels, interim_results=opts.interim,
        client_label=f"{opts.label}-{index}"[:128])
    if opts.endpointing is not None:
        config.endpointing.CopyFrom(pb.EndpointingConfig(**dict(opts.endpointing)))
    return pb.StreamingRecognizeRequest(config=config)


_END_UTTERANCE = pb.StreamingRecognizeRequest(end_utterance=True)


@dataclass
class _Prepared:
    item: AudioItem
    requests: list[pb.StreamingRecognizeRequest]
    ends_s: list[float]     # each message's end, in seconds of audio
    # Calls: per utterance, its speech as seconds (start, end), the message holding its last
    # speech sample, and (client EOU) the audio time after which its end_utterance is sent and
    # the message it follows.
    speech_s: list[tuple[float, float]] = field(default_factory=list)
    speech_end_msg: list[int] = field(default_factory=list)
    eou_due_s: list[float] = field(default_factory=list)
    eou_after_msg: list[int] = field(default_factory=list)

    @property
    def utterances(self) -> bool:
        return bool(self.speech_s)


class _ShareStats:
    def __init__(self):
        self.chunk_latency_ms: list[float] = []
        self.response_latency_ms: list[float] = []
        self.response_latency_negative = 0
        self.wake_late_ms: list[float] = []
        self.write_ms: list[float] = []
        self.time_to_final_ms: list[float] = []
        self.eou_to_final_ms: list[float] = []
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
    eou_sent = [math.nan] * len(prep.eou_due_s)
    eou_next = 0
    responses = _Responses()
    call = stub.StreamingRecognize(timeout=opts.stream_timeout_s)
    reader = asyncio.get_running_loop().create_task(_read_all(call, responses, prep.utterances))
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
                # The client's turn detector: end_utterance once its wait past the speech has played.
                while eou_next < len(eou_sent) and prep.eou_after_msg[eou_next] == j:
                    if opts.realtime:
                        await _sleep_until(t_start + prep.eou_due_s[eou_next])
                    await call.write(_END_UTTERANCE)
                    eou_sent[eou_next] = time.monotonic()
                    eou_next += 1
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
    if prep.utterances:
        _account_utterances(rec, responses.finals, sent, eou_sent, prep, stats, realtime=opts.realtime)
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
        if responses.final_count != 1 and not responses.finals:
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


def utterance_windows(speech_s: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Each utterance's window for matching finals: from its speech start (-inf for the first)
    to the next utterance's speech start (+inf for the last)."""
    starts = [-math.inf] + [s for s, _ in speech_s[1:]] + [math.inf]
    return [(starts[k], starts[k + 1]) for k in range(len(speech_s))]


def match_finals(finals: list[Final], speech_s: list[tuple[float, float]]) -> list[list[Final]]:
    """The finals in each utterance's window (by the final's end_seconds), in order of receipt."""
    bounds = [hi for _, hi in utterance_windows(speech_s)]
    out: list[list[Final]] = [[] for _ in speech_s]
    for f in finals:
        k = next(k for k, hi in enumerate(bounds) if f.end_s < hi)
        out[k].append(f)
    return out


def _account_utterances(rec: StreamRecord, finals: list[Final], sent: list[float], eou_sent: list[float],
                        prep: _Prepared, stats: _ShareStats, realtime: bool = True) -> None:
    """Per utterance of a call: its final (the last in its window), time to final and, with
    client EOU, EOU to final (see the module's docstring)."""
    rec.utterances, rec.finals = len(prep.speech_s), len(finals)
    reasons: dict[str, int] = {}
    for k, mine in enumerate(match_finals(finals, prep.speech_s)):
        m = prep.speech_end_msg[k]
        t_speech = sent[m]
        if math.isnan(t_speech):  # never sent (the call failed first): not the server's miss
            continue
        if realtime:
            # Paced in real time, a message goes out when its last sample has played; the last
            # speech sample played earlier by the audio after it in the message. Measured from
            # there, time to final does not depend on the message size (a client sending 20 ms
            # frames and one sending 160 ms messages see the same end of speech).
            t_speech -= prep.ends_s[m] - prep.speech_s[k][1]
        after = [f for f in mine if f.t >= t_speech]
        rec.extra_finals += len(mine) - min(len(after), 1)
        if not after:
            rec.missed += 1
            continue
        final = after[0]
        reasons[final.end_reason] = reasons.get(final.end_reason, 0) + 1
        stats.time_to_final_ms.append(1e3 * (final.t - t_speech))
        if k < len(eou_sent) and not math.isnan(eou_sent[k]):
            if final.end_reason == "client":
                stats.eou_to_final_ms.append(1e3 * (final.t - eou_sent[k]))
            else:
                rec.eou_preempted += 1
    rec.end_reasons = dict(sorted(reasons.items()))


def prepare(items: list[AudioItem], chunk_ms: float, client_eou_ms: float | None = None) -> list[_Prepared]:
    out = []
    for item in items:
        pieces, ends = item.messages(chunk_ms)
        prep = _Prepared(item, [pb.StreamingRecognizeRequest(audio=p) for p in pieces],
                         [e / item.sample_rate for e in ends])
        rate = item.sample_rate
        for lo, hi in item.speech:
            prep.speech_s.append((lo / rate, hi / rate))
            prep.speech_end_msg.append(next(j for j, e in enumerate(ends) if e >= hi))
            if client_eou_ms is not None:
                due = hi / rate + client_eou_ms / 1e3
                prep.eou_due_s.append(due)
                # after the last message whose audio has played by then (it is sent at its end)
                played = max([j for j, e in enumerate(ends) if e / rate <= due + 1e-9], default=0)
                prep.eou_after_msg.append(max(played, prep.speech_end_msg[-1]))
        out.append(prep)
    return out


async def _lag_monitor(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(_LAG_PERIOD_S)
        samples.append(1e3 * max(time.monotonic() - t - _LAG_PERIOD_S, 0.0))


def auto_channels(streams: int) -> int:
    """A worker's connections for `streams` streams when --channels is not given."""
    return max(1, min(_MAX_AUTO_CHANNELS, math.ceil(streams / _STREAMS_PER_CHANNEL)))


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
    n_channels = opts.channels or auto_channels(len(indices))
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
        last_end_wall=time.time(), pid=os.getpid(), time_to_final_ms=stats.time_to_final_ms,
        eou_to_final_ms=stats.eou_to_final_ms)


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
        prepared = prepare(audio.load(), chunk_ms, opts.client_eou_ms)
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
