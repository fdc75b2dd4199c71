"""Encode + decode time per message on the server's process links, the typed wire (server.runtime.wire,
msgspec) against the wire it replaced (marshal tuples between frontend and engine host; a
pickled step request and a marshalled reply between scheduler and engine worker), in one run.
The worker link's step cases also time the typed wire as it first was, with a message per row
(`rows`: a ChunkWork per row in the child, a Row and a StreamUpdate per row back), against the
columnar link (`new`: the plan's and the result's columns as numpy bytes).

Each case times what both ends do with a message, as the server does it: the sender builds the
message from its own objects and encodes the frame, the receiver decodes the frame and rebuilds
what its code uses (for a result: the ChunkResult; for a step: the child's StepPlan, from a
columnar plan as the scheduler builds it; for a step's reply: the parent's StepResult, from a
columnar result as the engine makes it). A step's audio is in the shared buffer on every wire
and is copied the same way. One more step case times where that audio goes next: the engine's
copy of steady rows into its waveform windows, from a view per row or from the flat buffer.

    python bench/wire_bench.py                 # a table, and --json FILE for the figures
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import marshal
import pickle
import platform
import sys
import time
from itertools import repeat
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import Union  # noqa: E402

import msgspec  # noqa: E402

from engines.api import (ChunkWork, EndpointingParams, ResultColumns, RowSamples, StepPlan,  # noqa: E402
                         StepResult, StepTimings, StreamUpdate, TokenEvent)
from server.runtime import wire as w  # noqa: E402
from server.runtime.engine_host import rows_message  # noqa: E402
from server.runtime.worker_link import ChildSlots, pack_step, step_reply, unpack_result, unpack_step  # noqa: E402
from server.scheduling.row_columns import RowColumns  # noqa: E402
from server.scheduling.stream_events import ChunkResult, ChunkRows, Utterance, UtteranceEnd  # noqa: E402
from server.scheduling.utterances import UtteranceBook, chunk_event  # noqa: E402


# -- the old wire, as it was (marshal tuples; the worker's request pickled) -------------------------
OLD_AUDIO, OLD_RESULT = 2, 21
_TIMING_FIELDS = tuple(f.name for f in dataclasses.fields(StepTimings))
_new_tuple = tuple.__new__


def old_encode_event(key: str, consumed: int, event: ChunkResult) -> tuple:
    finals = tuple((u.index, u.transcript, tuple(map(tuple, u.tokens)), u.start_seconds, u.end_seconds,
                    u.closed_by.value) for u in event.finals)
    return (OLD_RESULT, key, consumed, event.chunk_index, event.new_text, event.is_final, event.audio_seconds,
            event.audio_ready_at, event.utterance_index, finals)


def old_decode_result(message: tuple, transcript: str) -> ChunkResult:
    _, key, _, index, new_text, is_final, audio_seconds, ready_at, utterance_index, finals = message
    return ChunkResult(stream_id=key, chunk_index=index, transcript=transcript, new_text=new_text,
                       is_final=is_final, audio_seconds=audio_seconds, audio_ready_at=ready_at,
                       utterance_index=utterance_index,
                       finals=tuple(Utterance.of_tokens(u_index, text, tuple(TokenEvent._make(t) for t in tokens), start, end,
                                              UtteranceEnd(closed_by))
                                    for u_index, text, tokens, start, end, closed_by in finals))


def _endpointing_tuple(ep: EndpointingParams) -> tuple:  # main's EndpointingParams.as_tuple
    return (ep.start_history_ms, ep.start_threshold, ep.stop_history_ms, ep.stop_threshold, ep.stop_history_eou_ms,
            ep.stop_threshold_eou)


def old_pack_step(plan: StepPlan, index: int) -> tuple:
    chunks = plan.chunks
    return ("step_shared", index, [c.stream_id for c in chunks], [c.slot for c in chunks],
            [len(c.samples) for c in chunks], [c.first for c in chunks], [c.audio_ended for c in chunks],
            [_endpointing_tuple(c.endpointing) if c.endpointing is not None else None for c in chunks],
            [c.new_utterance for c in chunks])


def old_unpack_step(message: tuple, array: np.ndarray, to_child: dict[int, int]) -> StepPlan:
    _, index, ids, parent_slots, lengths, firsts, ends, endpointing, new_utterance = message
    chunks, at = [], 0
    for sid, slot, n, first, ended, ep, new in zip(ids, parent_slots, lengths, firsts, ends, endpointing, new_utterance):
        chunks.append(ChunkWork(sid, to_child[slot], array[at:at + n], first, ended,
                                EndpointingParams(*ep) if ep is not None else None, new))
        at += n
    return StepPlan(tuple(chunks))


def old_pack_result(result: StepResult, clocks: tuple) -> tuple:
    packed = (result.engine, tuple(getattr(result.timings, f) for f in _TIMING_FIELDS),
              [(u.stream_id, u.slot, u.text_delta, u.is_final, u.frames_decoded, u.audio_seconds,
                tuple(map(tuple, u.tokens)), u.starts, u.ends) for u in result.updates])
    return ("ok", packed + (clocks,), {"eager": 12}, "ready")


def old_unpack_result(reply: tuple, sent_at: float, replied_at: float) -> StepResult:
    _, packed, _, _ = reply
    engine, timings, rows, (got, started, ended, replied) = packed
    updates = []
    for sid, slot, text, final, frames, seconds, tokens, starts, ends in rows:
        updates.append(StreamUpdate(stream_id=sid, slot=slot, tokens=tuple(map(_new_tuple, repeat(TokenEvent), tokens)),
                                    text_delta=text, is_final=final, frames_decoded=frames, audio_seconds=seconds,
                                    starts=starts, ends=ends))
    timings = dict(zip(_TIMING_FIELDS, timings))
    timings.update(to_worker_ms=1e3 * (got - sent_at), worker_before_ms=1e3 * (started - got),
                   worker_after_ms=1e3 * (replied - ended), from_worker_ms=1e3 * (replied_at - replied),
                   unpack_ms=1e3 * (time.monotonic() - replied_at))
    return StepResult(updates=tuple(updates), engine=engine, timings=StepTimings(**timings))


# -- the typed wire with a message per row (main before the worker link carried columns) -----------
class RowsStep(msgspec.Struct, array_like=True, gc=False, tag=45):
    id: int
    buffer: int
    stream_ids: list[str]
    slots: list[int]
    lengths: list[int]
    firsts: list[bool]
    audio_ended: list[bool]
    endpointing: list[Union[EndpointingParams, None]]
    new_utterance: list[bool]
    audio: Union[bytes, None] = None


class RowsRow(msgspec.Struct, array_like=True, gc=False, tag=51):
    stream_id: str
    slot: int
    tokens: tuple[TokenEvent, ...]
    text_delta: str
    is_final: bool
    frames_decoded: int
    audio_seconds: float
    starts: tuple[int, ...]
    ends: tuple[int, ...]


class RowsStepDone(msgspec.Struct, array_like=True, gc=False, tag=52):
    id: int
    engine: str
    timings: StepTimings
    rows: list[RowsRow]
    clocks: tuple[float, float, float, float]
    executions: dict[str, int]
    state: Union[str, None]


def rows_pack_step(plan: StepPlan, buffer, index: int, request: int) -> RowsStep:
    chunks = plan.chunks
    lengths = [len(c.samples) for c in chunks]
    total = sum(lengths)
    np.concatenate([c.samples for c in chunks], out=buffer.array[:total])
    return RowsStep(request, index, [c.stream_id for c in chunks], [c.slot for c in chunks], lengths,
                    [c.first for c in chunks], [c.audio_ended for c in chunks], [c.endpointing for c in chunks],
                    [c.new_utterance for c in chunks], None)


def rows_unpack_step(step: RowsStep, samples: np.ndarray, to_child: dict[int, int]) -> StepPlan:
    n = len(step.stream_ids)
    columns = (step.slots, step.lengths, step.firsts, step.audio_ended, step.endpointing, step.new_utterance)
    if any(len(c) != n for c in columns) or sum(step.lengths) > len(samples):
        raise ValueError("a malformed step")
    child_slots = [to_child[s] for s in step.slots]
    chunks, at = [], 0
    for sid, slot, length, first, ended, ep, new in zip(step.stream_ids, child_slots, *columns[1:]):
        chunks.append(ChunkWork(sid, slot, samples[at:at + length], first, ended, ep, new))
        at += length
    return StepPlan(tuple(chunks))


def rows_reply(request: int, result: StepResult, to_parent: dict[int, int], clocks: tuple) -> RowsStepDone:
    for u in result.updates:  # the child's slots back to the parent's, in place (main's ChildSlots.result)
        parent = to_parent.get(u.slot, u.slot)
        if parent != u.slot:
            object.__setattr__(u, "slot", parent)
    rows = [RowsRow(u.stream_id, u.slot, u.tokens, u.text_delta, u.is_final, u.frames_decoded, u.audio_seconds,
                    u.starts, u.ends) for u in result.updates]
    return RowsStepDone(request, result.engine, result.timings, rows, clocks, {"eager": 12}, "ready")


def rows_unpack_result(done: RowsStepDone, sent_at: float, replied_at: float) -> StepResult:
    got, started, ended, replied = done.clocks
    updates = tuple(StreamUpdate(stream_id=r.stream_id, slot=r.slot, tokens=r.tokens, text_delta=r.text_delta,
                                 is_final=r.is_final, frames_decoded=r.frames_decoded, audio_seconds=r.audio_seconds,
                                 starts=r.starts, ends=r.ends) for r in done.rows)
    timings = dataclasses.replace(done.timings, to_worker_ms=1e3 * (got - sent_at),
                                  worker_before_ms=1e3 * (started - got), worker_after_ms=1e3 * (replied - ended),
                                  from_worker_ms=1e3 * (replied_at - replied),
                                  unpack_ms=1e3 * (time.monotonic() - replied_at))
    return StepResult(updates=updates, engine=done.engine, timings=timings)


def old_frames(messages: list, dumps=marshal.dumps, loads=marshal.loads) -> list:
    """Main's frame path: the body, the header joined to it (FrameWriter.flush), the bytes into
    the reader's buffer and the body loaded from a view of it (FrameReader._parse)."""
    body = dumps(messages)
    data = w.HEADER.pack(len(body)) + body
    buf = bytearray()
    buf += data
    with memoryview(buf) as view:
        out = loads(view[w.HEADER.size:])
    del buf[:]
    return out


def new_frames(messages: list, decoder: w.Decoder) -> list:
    """The typed wire's: encode_frame, then FrameSplitter with the decoder reading in place."""
    (out,) = w.FrameSplitter().feed(w.encode_frame(messages), decoder.decode)
    return out


# -- workloads ---------------------------------------------------------------------------------------
def _keys(n: int) -> list[str]:
    return [f"{i:012x}" for i in range(n)]


def audio_case(n: int, samples: int):
    keys = _keys(n)
    chunks = [np.random.default_rng(i).standard_normal(samples).astype(np.float32) for i in range(n)]
    decoder = w.Decoder(w.FRONTEND_TO_ENGINE)

    def old():
        for m in old_frames([(OLD_AUDIO, k, c.tobytes()) for k, c in zip(keys, chunks)]):
            np.frombuffer(m[2], dtype=np.float32)

    def new():
        for m in new_frames([w.Audio(k, c.tobytes()) for k, c in zip(keys, chunks)], decoder):
            np.frombuffer(m.samples, dtype=np.float32)

    return old, new


def result_case(n: int, final_every: int):
    """A step's results for n streams. Old: the parent's ChunkResult per stream as a marshal
    tuple, the frontend's event rebuilt from it. New: the step's rows as one Rows message of
    columns (server.runtime.engine_host.rows_message), the frontend making each stream's event
    with its own utterance book (server.scheduling.utterances.chunk_event), as the server does."""
    keys = _keys(n)
    tokens = tuple(TokenEvent(100 + j, f"\u2581w{j}", 3 * j) for j in range(12))
    events = []
    for i, k in enumerate(keys):
        finals = (Utterance.of_tokens(1, "some words of a closed utterance here", tokens, 0.4, 3.2, UtteranceEnd.ENDPOINT),) \
            if final_every and i % final_every == 0 else ()
        # Values of their own per stream, as in a server: marshal writes an object it has seen
        # in the frame as a back-reference, which one shared text or float would favour.
        events.append(ChunkResult(stream_id=k, chunk_index=40 + i, transcript="", new_text=f" word{i}", is_final=False,
                                  audio_seconds=6.4 + i / 1000, audio_ready_at=12345.678 + i / 1000,
                                  utterance_index=2, finals=finals))
    # The same step as rows: one token per stream (its new word); a closing stream's row carries
    # the utterance's 12 tokens and the endpoint that closes it.
    cols: dict = {name: [] for name in RowColumns.__struct_fields__ if name not in ("starts", "ends")}
    ends: dict = {}
    streams = []
    for i, e in enumerate(events):
        toks = tokens if e.finals else (TokenEvent(7, f"\u2581word{i}", 2),)
        streams.append(_Keyed(e.stream_id))
        cols["consumed"].append(102400)
        cols["chunk"].append(e.chunk_index)
        cols["audio_seconds"].append(e.audio_seconds)
        cols["ready_at"].append(e.audio_ready_at)
        cols["is_final"].append(False)
        cols["final_due"].append(False)
        cols["ids"] += [t.token_id for t in toks]
        cols["pieces"] += [t.piece for t in toks]
        cols["frames"] += [t.frame for t in toks]
        cols["tok_end"].append(len(cols["ids"]))
        cols["text"].append(e.new_text)
        if e.finals:
            ends[i] = (40,)
    rows = ChunkRows(streams, RowColumns(**cols, starts={}, ends=ends))
    books = {k: UtteranceBook(0.08) for k in keys}
    decoder = w.Decoder(w.ENGINE_TO_FRONTEND)

    def old():
        for m in old_frames([old_encode_event(e.stream_id, 102400, e) for e in events]):
            old_decode_result(m, "text so far word")

    def new():
        for m in new_frames([rows_message(rows)], decoder):
            c, a = m.columns, 0
            for i, key in enumerate(m.keys):
                b = c.tok_end[i]
                chunk_event(key, books[key], c.chunk[i], c.ready_at[i], c.audio_seconds[i], c.ids[a:b], c.pieces[a:b],
                            c.frames[a:b], c.text[i], c.starts.get(i, ()), c.ends.get(i, ()), c.is_final[i],
                            c.final_due[i])
                a = b

    return old, new


class _Keyed:
    def __init__(self, stream_id: str):
        self.stream_id = stream_id


class _Buffer:
    def __init__(self, samples: int):
        self.samples = samples
        self.array = np.zeros(samples, dtype=np.float32)


class _Slots:  # ChildSlots' engine: slots map onto themselves
    def __init__(self):
        self.next = 0

    def acquire_slot(self):
        self.next += 1
        return self.next - 1


def step_request_case(n: int, samples: int):
    """A columnar plan as the scheduler builds it (server.scheduling.step_batch), made afresh per call (a
    plan caches the ChunkWork rows the per-row wires make of it), through both ends of the link:
    the parent's message and the child's StepPlan. `samples` per row: a step's audio goes through
    the shared buffer on every wire, the same np.concatenate into it; with one sample a row the
    copy costs next to nothing and the case times the message."""
    keys = _keys(n)
    ep = EndpointingParams()
    rows = np.arange(n, dtype=np.int64)
    audio = [np.zeros(samples, dtype=np.float32) for _ in range(n)]
    first = rows % 50 == 0
    ended = np.zeros(n, dtype=bool)
    new_utterance = np.zeros(n, dtype=bool)
    endpointing = {i: ep for i in np.flatnonzero(first).tolist()}

    def plan() -> StepPlan:
        return StepPlan.from_columns(keys, rows, audio, first, ended, new_utterance, endpointing)

    slots = ChildSlots(_Slots())
    for i in range(n):
        slots.claim(i)
    to_child = {i: i for i in range(n)}
    buffer = _Buffer(n * samples)
    buffers = {0: buffer}
    decoder = w.Decoder(w.TO_WORKER)
    rows_decoder = w.Decoder(Union[RowsStep, w.Stop])

    def old():
        p = plan()
        np.concatenate([c.samples for c in p.chunks], out=buffer.array[:n * samples])
        # Connection.send pickled the request (its own 4-byte header), recv unpickled it.
        message = old_frames(old_pack_step(p, 0), lambda m: pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL),
                             pickle.loads)
        old_unpack_step(message, buffer.array, to_child)

    def per_row():
        (step,) = new_frames([rows_pack_step(plan(), buffer, 0, 7)], rows_decoder)
        rows_unpack_step(step, buffer.array, to_child)

    def new():
        (step,) = new_frames([pack_step(plan(), buffer, 0, 7)], decoder)
        unpack_step(step, buffers, slots)

    return old, per_row, new


def step_reply_case(n: int, token_rows: int, tokens_per_row: int):
    """A columnar result as engines.streaming_engine makes it, made afresh per call (a result
    caches the StreamUpdate rows the per-row wires make of it), through both ends of the link:
    the child's message and the parent's StepResult. `token_rows` in every 8 rows bring
    `tokens_per_row` tokens each; the rest carry only progress."""
    keys = _keys(n)
    # Pieces come from the model's vocabulary (one string object per piece, as a tokenizer's
    # table holds them); each row's text and figures are its own.
    vocabulary = [f"\u2581w{j}" for j in range(1024)]
    slots = np.arange(n, dtype=np.int64)
    with_tokens = (slots % 8) < token_rows
    counts = np.where(with_tokens, tokens_per_row, 0)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    token_rows_list = np.flatnonzero(counts).tolist()
    ids = [100 + (7 * i + j) % 1024 for i in token_rows_list for j in range(tokens_per_row)]
    token_frames = [40 + i + j for i in token_rows_list for j in range(tokens_per_row)]
    text = [""] * n
    for i in token_rows_list:
        text[i] = f" w{i}"
    frames = 80 + slots
    seconds = 6.4 + slots / 1000
    final = np.zeros(n, dtype=bool)
    timings = StepTimings(features_ms=1.0, encoder_ms=5.0, decode_ms=2.0, total_ms=9.0)

    def result() -> StepResult:
        return StepResult.from_columns(ResultColumns(
            stream_ids=keys, slots=slots.copy(), is_final=final, frames_decoded=frames.copy(),
            audio_seconds=seconds.copy(), text_delta=text, token_offsets=offsets,
            token_ids=np.asarray(ids, dtype=np.int64), token_pieces=[vocabulary[i - 100] for i in ids],
            token_frames=np.asarray(token_frames, dtype=np.int64)), "eager", timings)

    plan = StepPlan.from_columns(keys, slots, [np.zeros(1, np.float32)] * n, final, final, final)
    child = ChildSlots(_Slots())
    for i in range(n):
        child.claim(i)
    to_parent = {i: i for i in range(n)}
    clocks = (1.0, 2.0, 3.0, 4.0)
    decoder = w.Decoder(w.FROM_WORKER)
    rows_decoder = w.Decoder(Union[RowsStepDone, w.Done])

    def old():
        old_unpack_result(old_frames(old_pack_result(result(), clocks)), 0.5, 4.5)

    def per_row():
        (done,) = new_frames([rows_reply(7, result(), to_parent, clocks)], rows_decoder)
        rows_unpack_result(done, 0.5, 4.5)

    def new():
        (done,) = new_frames([step_reply(7, plan, result(), child, clocks[:3], _Executions())], decoder)
        unpack_result(done, plan, 0.5, 4.5)

    return old, per_row, new


def step_windows_case(n: int, samples: int):
    """Where the step's audio goes next in the child: the engine copies steady rows (whole
    chunks mid-stream) into its waveform windows (engines.features.StreamingFeaturizer.assemble).
    old: a view per row of the shared buffer, stacked (the per-row plan); new: the plan's
    RowSamples, whose consecutive rows are one slice of the buffer."""
    flat = np.random.default_rng(0).standard_normal(n * samples).astype(np.float32)
    offsets = np.arange(n + 1, dtype=np.int64) * samples
    windows = np.empty((n, samples + 1000), dtype=np.float32)
    rows = np.arange(n)

    def old():
        bounds = offsets.tolist()
        windows[:, 1000:] = np.stack([flat[a:b] for a, b in zip(bounds, bounds[1:])])

    def new():
        windows[:, 1000:] = RowSamples(flat, offsets).stack(rows, samples)

    return old, new


class _Executions:  # _reply's engine: its counters
    def executions(self):
        return {"eager": 12}


def _loops(fn) -> int:
    """Calls per timed run: enough for about 20 ms."""
    fn()
    loops = 1
    while True:
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        if time.perf_counter() - t > 0.02:
            return loops
        loops *= 2


def best_us(fns, per: int, seconds: float) -> list[float]:
    """The best run of each wire, in microseconds per message. The wires' runs alternate, so a
    neighbour's load on a shared machine slows them alike rather than one of them."""
    loops = [_loops(fn) for fn in fns]
    best = [float("inf")] * len(fns)
    deadline = time.perf_counter() + len(fns) * seconds
    while time.perf_counter() < deadline:
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            for _ in range(loops[i]):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t) / loops[i])
    return [1e6 * b / per for b in best]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per case and wire (alternating runs; the best counts)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cases = [
        ("AUDIO, frame of 64, 160 ms chunks (10 KB)", 64, audio_case(64, 2560)),
        ("AUDIO, frame of 64, 20 ms chunks (1.3 KB)", 64, audio_case(64, 320)),
        ("RESULT (new: Rows), frame of 256, no finals", 256, result_case(256, 0)),
        ("RESULT, frame of 256, 1 in 10 closes an utterance (12 tokens)", 256, result_case(256, 10)),
    ]
    for n in (256, 1024):
        cases += [
            (f"step request, {n} rows", n, step_request_case(n, 1)),
            (f"step reply, {n} rows, no tokens", n, step_reply_case(n, 0, 0)),
            (f"step reply, {n} rows, 1 in 8 with 2 tokens", n, step_reply_case(n, 1, 2)),
            (f"step reply, {n} rows, 1 token each", n, step_reply_case(n, 8, 1)),
            (f"step audio into the engine's windows, {n} rows of 160 ms", n, step_windows_case(n, 2560)),
        ]
    cases.append(("step audio into the engine's windows, 1024 rows of 560 ms", 1024, step_windows_case(1024, 8960)))
    rows = []
    print("µs per message (step cases: per row); rows = the typed wire with a message per row")
    print(f"{'message':62} {'old us':>8} {'rows us':>8} {'new us':>8} {'new/old':>8} {'new/rows':>8}")
    for name, per, fns in cases:
        times = best_us(fns, per, args.seconds)
        o, n = times[0], times[-1]
        r = times[1] if len(times) == 3 else None
        rows.append({"message": name, "old_us": round(o, 3), "rows_us": None if r is None else round(r, 3),
                     "new_us": round(n, 3), "ratio": round(n / o, 3),
                     "ratio_rows": None if r is None else round(n / r, 3)})
        print(f"{name:62} {o:8.3f} {'' if r is None else f'{r:8.3f}':>8} {n:8.3f} {n / o:8.2f} "
              f"{'' if r is None else f'{n / r:8.2f}':>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"python": platform.python_version(), "msgspec": msgspec.__version__,
                                               "machine": platform.processor() or platform.machine(),
                                               "cases": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
