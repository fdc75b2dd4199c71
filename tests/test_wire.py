"""server.runtime.wire, the one typed wire between the server's processes: every message type round-trips,
frames batch many messages, and a frame that cannot be read (malformed, unknown tag, wrong
direction, truncated, oversized length) is a WireError that closes its link with a logged
reason, never a hang. Real links too: an engine host's socket, a frontend's reader and a real
engine worker process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import tempfile

import msgspec
import numpy as np
import pytest

from engines.api import (BadChunkError, EndpointingParams, EngineError, ModelInfo, StepPlan, StepResult, StepTimings,
                         StreamUpdate, TokenEvent)
from engines.config import EngineConfig
from engines.geometry import ChunkGeometry
from engines.sample_ring import RingSamples, SampleRing
from server.runtime import wire as w
from server.runtime.engine_host import EngineFacts, EngineHost, event_message, rows_message
from server.runtime.engine_worker import ChildOptions, EngineWorker, _Pending
from server.runtime.worker_link import RING, ChildSlots, Link, pack_step, step_reply, unpack_result, unpack_step
from server.runtime.remote_scheduler import RemoteScheduler
from server.scheduling.row_columns import RowColumns
from server.scheduling.scheduler import SchedulerConfig
from server.scheduling.stream_events import ChunkRows, ErrorKind, StreamFailure, UtteranceEnd
from server.scheduling.utterances import UtteranceBook, chunk_event
from tests.fake_engine import FakeEngine

TIMEOUT_S = 10.0  # every read here is bounded: a reader that hangs fails the test instead

GEOMETRY = ChunkGeometry(16000, 160, 512, 256, 16, 9, 2, 8, 160, 96)
MODEL = ModelInfo("m", 160, (80, 160), 16000, 129, True, "a model", ("hi",), "\u2581", "<eou>")
TOKENS = (TokenEvent(4, "\u2581hello", 1), TokenEvent(7, "\u2581there", 3))
ENDPOINTING = EndpointingParams(start_history_ms=100, stop_threshold=0.9)

# One message of every type, with values other than the defaults (a field that did not travel
# would show as a default on the other side).
EXAMPLES = [
    w.Hello(w.PROTOCOL_VERSION, w.ROLE_ENGINE_HOST, MODEL, GEOMETRY, 64, 32, "eager",
            {"batch_wait_s": 0.002, "pipeline_depth": 3}, {"engine": "eager", "details": {"a": [1, 2]}},
            {"eager": 5}, [w.RingInfo("/proc/1/fd/9", 64, 32000)]),
    w.Error(7, "BadChunkError", "invalid chunks", ("s1", "s2"), 4, {"eager": 1}, "dead"),
    w.Open("k1", "label", False, ENDPOINTING, "client-a", True),
    w.Audio("k1", np.arange(8, dtype=np.float32).tobytes()),
    w.End("k1"),
    w.Fail("k1", ErrorKind.INVALID_ARGUMENT.value, "bad audio"),
    w.Close("k1"),
    w.Ack("k1", 16),
    w.Ready("frontend-2"),
    w.Rpc("/nemostream.v1.Asr/StreamingRecognize", "OK"),
    w.Refused("draining"),
    w.AudioSeconds(1.25),
    w.Gc("2", 0.003),
    w.Sync(9),
    w.EndUtterance("k1"),
    w.UtteranceFinal(UtteranceEnd.CLIENT.value, 0.25),
    w.ChunksWritten(w.as_column([0, 3, 1] + [0] * 11, w.I64), 0.41),
    w.Written(0, w.as_column([3, 7], w.I64), w.as_column([5120, 2560], w.I64)),
    w.Stopped("k1"),
    w.Opened("k1", 0, 3),
    w.Rows(["k1", "k2"], RowColumns([4096, 512], [3, 0], [1.5, 0.08], [123.5, 124.0], [True, False], [False, True],
                                    [2, 2], [4, 7], ["\u2581hello", "\u2581there"], [1, 3], [" hello there", ""],
                                    {0: (1,)}, {0: (3,)})),
    w.Failed("k1", 512, ErrorKind.RESOURCE_EXHAUSTED.value, "all 4 stream slots are in use"),
    w.Cut("k1", "max_stream_seconds"),
    w.State("eager", {"eager": 3}, 16, 5, 4, "it died", True),
    w.Synced(9),
    w.Configure("tests.fake_engine:build_fake_engine", EngineConfig(model="fake", max_streams=8, max_batch=4),
                "DEBUG", "json", False, (700, 10, 10)),
    w.Attach(1, 0, "/dev/shm/x", 4096),
    w.AttachRing(2, "/proc/1/fd/9", 8, 32000),
    w.Claim(3),
    w.Release(3),
    w.Warmup(2),
    w.Step(5, 1, ["a", "b"], w.as_column([0, 3], w.I64), w.as_column([0, 2560, 5216], w.I64),
           w.as_column([w.FIRST, w.AUDIO_ENDED | w.NEW_UTTERANCE], w.U8), {0: ENDPOINTING}, None),
    w.Step(6, -1, ["a"], w.as_column([0], w.I64), w.as_column([0, 4], w.I64), w.as_column([w.FIRST], w.U8), {},
           np.ones(4, dtype=np.float32).tobytes()),
    w.Step(7, -1, ["a", "b"], w.as_column([0, 3], w.I64), b"", w.as_column([0, w.FIRST], w.U8), {}, None,
           w.as_column([2560, 5120, 0, 2656], w.I64)),
    w.Stop(),
    w.Done(2, "eager", {"eager": 1}, "ready"),
    w.StepDone(5, "eager", StepTimings(encoder_ms=1.5, synced=True), (1.0, 2.0, 3.0, 4.0), {"eager": 2}, None,
               w.as_column([1, 0], w.U8), w.as_column([12, 7], w.I64), w.as_column([0.96, 0.56], w.F64),
               [" hello", ""], w.as_column([0, 1, 1], w.I64), w.as_column([TOKENS[0].token_id], w.I64),
               [TOKENS[0].piece], w.as_column([TOKENS[0].frame], w.I64), {0: (2,)}, {0: (9,)}),
    w.StepDone(6, "eager", StepTimings(), (1.0, 2.0, 3.0, 4.0), {"eager": 3}, "ready",
               w.as_column([0], w.U8), w.as_column([7], w.I64), w.as_column([0.56], w.F64), [""],
               w.as_column([0, 0], w.I64), b"", [], b"", {}, {}, ["b"], w.as_column([4], w.I64)),
]
DIRECTIONS = (w.FRONTEND_TO_ENGINE, w.ENGINE_TO_FRONTEND, w.TO_WORKER, w.FROM_WORKER)


def _direction_of(message) -> object:
    for kinds in DIRECTIONS:
        if type(message) in kinds.__args__:
            return kinds
    return None


def _decode_one(data: bytes, kinds) -> list:
    splitter = w.FrameSplitter()
    bodies = splitter.feed(data, bytes)
    assert len(bodies) == 1 and splitter.pending == 0
    return w.Decoder(kinds).decode(bodies[0])


def test_every_message_type_round_trips():
    every = {cls for cls in _all_subclasses(w.Message)}
    assert every == {type(m) for m in EXAMPLES}, "a message type without an example here"
    for message in EXAMPLES:
        kinds = _direction_of(message)
        assert kinds is not None, type(message).__name__
        assert _decode_one(w.encode_frame([message]), kinds) == [message], type(message).__name__
    # Typed fields come back as their types, not as plain lists and dicts.
    hello = _decode_one(w.encode_frame([_example(w.Hello)]), w.ENGINE_TO_FRONTEND)[0]
    assert type(hello.geometry) is ChunkGeometry and hello.geometry.chunk_samples == GEOMETRY.chunk_samples
    assert type(hello.model_info) is ModelInfo
    step = _decode_one(w.encode_frame([_example(w.Step)]), w.TO_WORKER)[0]
    assert type(step.endpointing[0]) is EndpointingParams
    assert w.column(step.offsets, w.I64, 3, "offsets").tolist() == [0, 2560, 5216]
    rows = _decode_one(w.encode_frame([_example(w.Rows)]), w.ENGINE_TO_FRONTEND)[0]
    assert type(rows.columns) is RowColumns and rows.columns.ends == {0: (3,)} and type(rows.columns.is_final[0]) is bool


def _example(cls):
    return next(m for m in EXAMPLES if type(m) is cls)


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_tag_is_distinct_and_every_direction_decodes_only_its_own():
    tags = [cls.__struct_config__.tag for cls in _all_subclasses(w.Message)]
    assert len(tags) == len(set(tags))
    audio = w.encode_frame([w.Audio("k", b"\0" * 8)])
    with pytest.raises(w.WireError, match="malformed frame"):
        _decode_one(audio, w.ENGINE_TO_FRONTEND)  # a frontend's message where the engine speaks


def test_the_handshake_is_checked():
    hello = EngineFacts(MODEL, GEOMETRY, 64, 32, "eager", SchedulerConfig(response_buffer=8)).hello()
    back = EngineFacts.from_hello(_decode_one(w.encode_frame([hello]), w.ENGINE_TO_FRONTEND)[0])
    assert back.scheduler == SchedulerConfig(response_buffer=8) and back.geometry == GEOMETRY
    with pytest.raises(w.WireError, match="protocol version 99"):
        EngineFacts.from_hello(msgspec.structs.replace(hello, version=99))
    with pytest.raises(w.WireError, match="role is 'engine-worker', expected 'engine-host'"):
        EngineFacts.from_hello(msgspec.structs.replace(hello, role=w.ROLE_ENGINE_WORKER))
    with pytest.raises(w.WireError, match="not the Hello handshake"):
        EngineFacts.from_hello(w.State("x", {}, 1, 0, 0, None, False))
    with pytest.raises(w.WireError, match="scheduler settings"):
        EngineFacts.from_hello(msgspec.structs.replace(hello, scheduler={"no_such_setting": 1}))


def test_a_start_up_report_with_odd_values_still_travels():
    from pathlib import Path

    report = {"engine": "onnx", "self_check": {"max_rel_error": np.float32(0.5), "steps": np.int64(3)},
              "details": {"onnx": Path("/cache/encoder.onnx"), "providers": ("CPUExecutionProvider",)},
              "sizing": None}
    hello = msgspec.structs.replace(_example(w.Hello), startup_report=w.plain_report(report))
    back = _decode_one(w.encode_frame([hello]), w.FROM_WORKER)[0].startup_report
    assert back == {"engine": "onnx", "self_check": {"max_rel_error": 0.5, "steps": 3},
                    "details": {"onnx": "/cache/encoder.onnx", "providers": ["CPUExecutionProvider"]}, "sizing": None}
    assert w.plain_report(None) is None


def _rows_of(streams):
    """Three streams' rows: tokens closing an utterance at an endpoint, progress only, and the
    end of the audio with the client's final due."""
    return ChunkRows(streams, RowColumns([4096, 512, 9000], [3, 0, 8], [1.25, 0.08, 0.64], [123.5, 124.0, 124.5],
                                         [False, False, True], [False, True, False], [3, 3, 4], [4, 7, 9, 11],
                                         ["\u2581hello", "\u2581there", "\u2581again", "\u2581bye"], [1, 3, 6, 7],
                                         [" hello there again", "", " bye"], {0: (1,)}, {0: (4,)}))


def test_rows_cross_the_wire_and_make_the_same_events_on_either_side():
    """The engine process hands a step's rows over as columns; the frontend makes each stream's
    events from them with its own books, exactly as an in-process scheduler does with its own."""
    class _Stream:
        def __init__(self, stream_id):
            self.stream_id = stream_id

    rows = _rows_of([_Stream("k1"), _Stream("k2"), _Stream("k3")])
    failure = StreamFailure("k4", ErrorKind.RESOURCE_EXHAUSTED, "all 4 stream slots are in use")
    frame = w.encode_frame([rows_message(rows), event_message("k4", 77, failure)])
    got, got_failure = _decode_one(frame, w.ENGINE_TO_FRONTEND)
    assert got.keys == ["k1", "k2", "k3"] and got.columns.consumed == [4096, 512, 9000]
    assert got_failure.consumed == 77
    assert StreamFailure(got_failure.key, ErrorKind(got_failure.kind), got_failure.message) == failure
    here = [UtteranceBook(0.08) for _ in range(3)]
    there = [UtteranceBook(0.08) for _ in range(3)]
    for book in here + there:  # each stream has some text open already
        book.add_columns([2], ["\u2581so"], [0], "so")
    a = 0
    events = []
    for i, key in enumerate(got.keys):
        b = got.columns.tok_end[i]
        mine = chunk_event(key, here[i], rows.columns.chunk[i], rows.columns.ready_at[i], rows.columns.audio_seconds[i], rows.columns.ids[a:b],
                           rows.columns.pieces[a:b], rows.columns.frames[a:b], rows.columns.text[i], rows.columns.starts.get(i, ()),
                           rows.columns.ends.get(i, ()), rows.columns.is_final[i], rows.columns.final_due[i])
        theirs = chunk_event(key, there[i], got.columns.chunk[i], got.columns.ready_at[i], got.columns.audio_seconds[i], got.columns.ids[a:b],
                             got.columns.pieces[a:b], got.columns.frames[a:b], got.columns.text[i], got.columns.starts.get(i, ()),
                             got.columns.ends.get(i, ()), got.columns.is_final[i], got.columns.final_due[i])
        assert mine == theirs
        events.append(theirs)
        a = b
    # The first stream's endpoint closed "so hello there" at frame 4; "again" opens the next utterance.
    assert [u.transcript for u in events[0].finals] == ["so hello there"]
    assert events[0].transcript == "again" and events[0].utterance_index == 1
    assert events[1].finals[0].closed_by is UtteranceEnd.CLIENT and events[1].finals[0].transcript == "so"
    assert events[2].is_final and events[2].transcript == "so bye" and events[2].finals[0].transcript == "so bye"
    with pytest.raises(TypeError, match="chunk event reached"):
        event_message("k1", 0, events[0])


def test_a_frontends_share_of_the_rows_keeps_each_rows_tokens_and_events():
    rows = _rows_of(["s1", "s2", "s3"])
    share = rows.take([2, 0])
    c = share.columns
    assert share.streams == ["s3", "s1"] and c.chunk == [8, 3] and c.is_final == [True, False]
    assert c.consumed == [9000, 4096] and c.final_due == [False, False]
    assert c.tok_end == [1, 4] and c.pieces == ["\u2581bye", "\u2581hello", "\u2581there", "\u2581again"]
    assert c.frames == [7, 1, 3, 6] and c.text == [" bye", " hello there again"]
    assert c.starts == {1: (1,)} and c.ends == {1: (4,)}
    assert rows.take([]).streams == [] and rows.take([1]).columns.tok_end == [0]


class _OwnSlots:  # an engine whose slots the child maps the parent's onto: 10, 11, ...
    def __init__(self):
        self.next = 10

    def acquire_slot(self):
        self.next += 1
        return self.next - 1

    def executions(self):
        return {"eager": 1}


def _worker_slots(parent_slots) -> ChildSlots:
    slots = ChildSlots(_OwnSlots())
    for s in parent_slots:
        slots.claim(s)
    return slots


class _SharedBuffer:  # worker_link.SampleBuffer's face, in memory
    def __init__(self, samples: int):
        self.samples = samples
        self.array = np.zeros(samples, dtype=np.float32)


def _columnar_plan() -> StepPlan:
    audio = [np.arange(n, dtype=np.float32) + n for n in (4, 0, 7)]
    return StepPlan.from_columns(["a", "b", "c"], np.array([5, 0, 9]), audio, np.array([True, False, False]),
                                 np.array([False, True, False]), np.array([False, False, True]), {0: ENDPOINTING})


def test_a_step_crosses_the_worker_link_as_columns():
    plan = _columnar_plan()
    slots = _worker_slots([0, 5, 9])  # child slots: 0 -> 10, 5 -> 11, 9 -> 12
    buffer = _SharedBuffer(16)
    for shared in (buffer, None):  # through the shared buffer, then inline
        step = _decode_one(w.encode_frame([pack_step(plan, shared, 0, 3)]), w.TO_WORKER)[0]
        assert (step.buffer, step.audio is None) == ((0, True) if shared else (-1, False))
        got = unpack_step(step, {0: buffer}, slots)
        assert got._chunks is None  # built from columns: no ChunkWork per row
        assert got.slots.tolist() == [11, 10, 12] and got.stream_ids == ["a", "b", "c"]
        assert (got.first.tolist(), got.audio_ended.tolist(), got.new_utterance.tolist()) == \
            ([True, False, False], [False, True, False], [False, False, True])
        assert got.endpointing == {0: ENDPOINTING}
        for x, y in zip(got.samples, plan.samples):
            assert x.dtype == np.float32 and x.tolist() == y.tolist()


def _ring_plan():
    """A plan whose audio lies in a sample ring of 10 rows of 16 samples: row 5 holds stream
    samples 20..35 (one span wraps), row 9 samples 0..6."""
    ring = SampleRing.local(10, 16)
    ring.write(5, 20, np.arange(20, 36, dtype=np.float32))
    ring.write(9, 0, np.arange(100, 107, dtype=np.float32))
    samples = RingSamples(ring, np.array([5, 9, 5]), np.array([30, 0, 20]), np.array([36, 7, 20]))
    plan = StepPlan.from_columns(["a", "c", "b"], np.array([5, 9, 5]), samples, np.array([False, True, False]),
                                 np.array([False, False, True]), np.array([False, False, False]))
    return ring, plan


def test_a_step_whose_audio_is_in_the_sample_ring_sends_spans_only():
    ring, plan = _ring_plan()
    slots = _worker_slots([0, 5, 9])
    step = _decode_one(w.encode_frame([pack_step(plan, _SharedBuffer(64), 0, 3, ring)]), w.TO_WORKER)[0]
    assert step.audio is None and step.offsets == b"" and step.spans is not None  # no audio crossed
    got = unpack_step(step, {RING: ring}, slots)
    assert [x.tolist() for x in got.samples] == [list(range(30, 36)), list(range(100, 107)), []]
    assert got.slots.tolist() == [11, 12, 11]
    # Another ring than the worker's (or none): the audio goes the old way, and arrives the same.
    step = _decode_one(w.encode_frame([pack_step(plan, None, 0, 4, SampleRing.local(10, 16))]), w.TO_WORKER)[0]
    assert step.spans is None and step.audio is not None
    assert [x.tolist() for x in unpack_step(step, {}, slots).samples] == \
        [list(range(30, 36)), list(range(100, 107)), []]


@pytest.mark.parametrize("spans, match", [
    ([0, 6, 0, 7], "ring row 42"),                 # slot past the ring's rows (below)
    ([6, 0, 0, 7], r"spans \[6, 0\)"),             # an end before its start
    ([0, 17, 0, 7], "the ring has 10 rows of 16"),  # longer than the ring
    ([0, 6], "spans"),                             # short of a row
])
def test_a_step_with_bad_ring_spans_is_an_error(spans, match):
    ring, plan = _ring_plan()
    slots = _worker_slots([0, 5, 9, 42])
    rows = [42, 9] if "42" in match else [5, 9]
    step = w.Step(1, -1, ["a", "c"], w.as_column(rows, w.I64), b"", w.as_column([0, 0], w.U8), {}, None,
                  w.as_column(spans, w.I64))
    with pytest.raises(EngineError, match=match):
        unpack_step(step, {RING: ring}, slots)
    with pytest.raises(EngineError, match="before it was attached"):
        unpack_step(msgspec.structs.replace(step, spans=w.as_column([0, 6, 0, 7], w.I64)), {}, slots)


def test_a_step_reply_crosses_the_worker_link_as_columns():
    plan = _columnar_plan()
    slots = _worker_slots([0, 5, 9])
    child_plan = unpack_step(pack_step(plan, None, 0, 3), {}, slots)
    updates = (StreamUpdate("a", 11, TOKENS, " hello there", False, 4, 0.32, (1,), ()),
               StreamUpdate("b", 10, (), "", True, 9, 0.72),
               StreamUpdate("c", 12, TOKENS[1:], " there", False, 2, 0.16, (), (3,)))
    for result in (StepResult(updates, "eager", StepTimings(encoder_ms=2.0)),  # an engine of rows
                   StepResult.from_columns(StepResult(updates).columns, "eager", StepTimings(encoder_ms=2.0))):
        done = _decode_one(w.encode_frame([step_reply(8, child_plan, result, slots, (1.0, 2.0, 3.0), slots.engine)]),
                           w.FROM_WORKER)[0]
        assert done.stream_ids is None and done.slots is None  # the plan's rows: the parent has them
        got = unpack_result(done, plan, 0.5, 4.5)
        assert got.columnar and got._updates is None  # no StreamUpdate per row
        assert got.columns.slots is plan.slots and got.engine == "eager" and got.timings.encoder_ms == 2.0
        assert got.updates == tuple(dataclasses.replace(u, slot=s) for u, s in zip(updates, (5, 0, 9)))
    # An engine that answers in another order: the rows name themselves, on the parent's slots.
    swapped = StepResult((updates[2], updates[0], updates[1]), "eager")
    done = _decode_one(w.encode_frame([step_reply(9, child_plan, swapped, slots, (1.0, 2.0, 3.0), slots.engine)]),
                       w.FROM_WORKER)[0]
    got = unpack_result(done, plan, 0.5, 4.5)
    assert [(u.stream_id, u.slot, u.tokens) for u in got.updates] == [("c", 9, TOKENS[1:]), ("a", 5, TOKENS),
                                                                      ("b", 0, ())]


def test_a_column_of_the_wrong_length_is_an_error_on_both_sides_of_the_worker_link():
    with pytest.raises(w.WireError, match="column slots has 12 bytes, not 2 entries"):
        w.column(b"\0" * 12, w.I64, 2, "slots")
    plan = _columnar_plan()
    slots = _worker_slots([0, 5, 9])
    step = pack_step(plan, None, 0, 3)
    bad_steps = {
        "slots": (msgspec.structs.replace(step, slots=step.slots[:-8]), "column slots has 16 bytes"),
        "truncated offsets": (msgspec.structs.replace(step, offsets=step.offsets[:-1]), "column offsets"),
        "offsets past the audio": (msgspec.structs.replace(step, offsets=w.as_column([0, 4, 4, 99], w.I64)),
                                   "past the 11 samples"),
        "decreasing offsets": (msgspec.structs.replace(step, offsets=w.as_column([0, 4, 2, 11], w.I64)),
                               "not increasing"),
        "unknown flags": (msgspec.structs.replace(step, flags=w.as_column([1, 8, 0], w.U8)), "unknown row flags"),
        "endpointing of no row": (msgspec.structs.replace(step, endpointing={3: ENDPOINTING}), "endpointing for rows"),
    }
    for name, (bad, match) in bad_steps.items():
        with pytest.raises(EngineError, match=match):
            unpack_step(_decode_one(w.encode_frame([bad]), w.TO_WORKER)[0], {}, slots)
    with pytest.raises(BadChunkError, match="not acquired through the engine worker") as err:
        unpack_step(step, {}, _worker_slots([0, 5]))
    assert err.value.stream_ids == ("c",)
    child_plan = unpack_step(step, {}, slots)
    result = StepResult((StreamUpdate("a", 11, TOKENS, " hello there", False, 4, 0.32),
                         StreamUpdate("b", 10, (), "", True, 9, 0.72), StreamUpdate("c", 12, (), "", False, 2, 0.16)))
    done = step_reply(8, child_plan, result, slots, (1.0, 2.0, 3.0), slots.engine)
    bad_replies = {
        "short is_final": (msgspec.structs.replace(done, is_final=done.is_final[:2]), "column is_final"),
        "token ids short of the offsets": (msgspec.structs.replace(done, token_ids=done.token_ids[:8]),
                                           "column token_ids"),
        "offsets past the pieces": (msgspec.structs.replace(done, token_pieces=done.token_pieces[:1]),
                                    "do not fit 1 tokens"),
        "texts short of the rows": (msgspec.structs.replace(done, text_delta=done.text_delta[:2]), "2 texts for 3 rows"),
        "events of no row": (msgspec.structs.replace(done, ends={7: (1,)}), "endpoint events for rows"),
        "renamed rows without their slots": (msgspec.structs.replace(done, stream_ids=["a", "b"]), "together or not"),
        "renamed rows, short of slots": (msgspec.structs.replace(done, stream_ids=["a", "b"], slots=done.is_final),
                                         "column slots"),
    }
    for name, (bad, match) in bad_replies.items():
        with pytest.raises(EngineError, match=f"malformed step reply.*{match}"):
            unpack_result(_decode_one(w.encode_frame([bad]), w.FROM_WORKER)[0], plan, 0.5, 4.5)


class _Sink:
    """A transport that hands what is written straight to a FrameReader."""

    def __init__(self, reader: w.FrameReader):
        self.reader = reader

    def write(self, data):
        self.reader.feed(bytes(data))

    def is_closing(self):
        return False

    def close(self):
        pass


def _fed(data: bytes, eof: bool = False) -> w.FrameReader:
    reader = w.FrameReader(w.FRONTEND_TO_ENGINE)
    reader.feed(data)
    if eof:
        reader.feed_eof()
    return reader


@pytest.mark.asyncio
async def test_frames_batch_the_messages_of_one_loop_iteration():
    frames = w.FrameReader(w.FRONTEND_TO_ENGINE)
    out = w.FrameWriter(_Sink(frames))
    for i in range(5):
        out.send(w.Audio(f"k{i}", b"\0" * 8))
    await asyncio.sleep(0)  # the flush runs once, on the next loop iteration
    out.send(w.End("k9"))
    await asyncio.sleep(0)
    batch = await asyncio.wait_for(frames.read_frames(), TIMEOUT_S)  # both frames waited: one read
    assert [[m.key for m in f] for f in batch] == [[f"k{i}" for i in range(5)], ["k9"]]
    frames.feed(w.HEADER.pack(20) + b"x" * 5)
    pending = asyncio.ensure_future(frames.read_frames())
    await asyncio.sleep(0.01)
    assert not pending.done()  # a frame split across reads waits for its rest
    pending.cancel()
    assert await asyncio.wait_for(_fed(b"", eof=True).read_frames(), TIMEOUT_S) is None


@pytest.mark.asyncio
async def test_the_reader_takes_frames_larger_than_its_buffer_and_split_anywhere():
    """Frames arrive in pieces of every size, some larger than the reader's starting buffer:
    every message comes out whole and in order, and the buffer is reused, not grown, once the
    frames fit."""
    rng = np.random.default_rng(5)
    messages = [w.Audio(f"k{i}", rng.bytes(int(n))) for i, n in enumerate(rng.integers(0, 300_000, 40))]
    data = b"".join(bytes(w.encode_frame([m])) for m in messages)
    frames = w.FrameReader(w.FRONTEND_TO_ENGINE, size=1 << 16)
    got, pos = [], 0
    while pos < len(data):
        step = int(rng.integers(1, 200_000))
        frames.feed(data[pos:pos + step])
        pos += step
        if frames._ready:
            got += [m for f in await frames.read_frames() for m in f]
    assert got == messages
    size = frames.buffer_size
    small = [m for m in messages if len(m.samples) < size // 2][:5]
    assert len(small) == 5
    frames.feed(b"".join(bytes(w.encode_frame([m])) for m in small))
    assert [m for f in await frames.read_frames() for m in f] == small
    assert frames.buffer_size == size  # frames that fit reuse the buffer
    frames.feed_eof()
    assert await asyncio.wait_for(frames.read_frames(), TIMEOUT_S) is None


@pytest.mark.asyncio
async def test_the_reader_pauses_its_transport_while_frames_wait_and_resumes_when_read():
    class Transport:
        paused = 0

        def pause_reading(self):
            self.paused += 1

        def resume_reading(self):
            self.paused -= 1

    frames = w.FrameReader(w.FRONTEND_TO_ENGINE)
    frames.connection_made(transport := Transport())
    one = bytes(w.encode_frame([w.End("k")]))
    frames.feed(one * (w.FrameReader.READY_FRAMES_MAX + 1))
    assert transport.paused == 1
    batch = await asyncio.wait_for(frames.read_frames(), TIMEOUT_S)
    assert len(batch) == w.FrameReader.READY_FRAMES_MAX + 1 and transport.paused == 0


def _frame(body: bytes) -> bytes:
    return w.HEADER.pack(len(body)) + body


BAD_FRAMES = {
    "not msgpack": (_frame(b"\xc1\xc1\xc1"), "malformed frame"),
    "not a list of messages": (_frame(msgspec.msgpack.encode({"a": 1})), "malformed frame"),
    "an unknown tag": (_frame(msgspec.msgpack.encode([[99, "k"]])), r"malformed frame.*Invalid value 99"),
    "a field of the wrong type": (_frame(msgspec.msgpack.encode([[2, "k", 5]])), "malformed frame.*Expected `bytes`"),
    "a message short of fields": (_frame(msgspec.msgpack.encode([[6, "k"]])), "malformed frame"),
    "a value its type refuses": (_frame(msgspec.msgpack.encode([[1, "k", "", False, {"start_history_ms": 99999}, None]])),
                                 "start_history_ms 99999 is outside"),
    "a body cut short": (_frame(w.encode_frame([w.Audio("k", b"\0" * 64)])[w.HEADER.size:-10]), "truncated"),
    "an oversized length": (w.HEADER.pack(w.MAX_FRAME + 1) + b"\0" * 16, "exceeds the limit"),
    "a length of 2**32-1": (b"\xff\xff\xff\xff", "exceeds the limit"),
    "the end inside a frame": (w.HEADER.pack(10) + b"abc", "inside a frame"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_a_frame_that_cannot_be_read_is_an_error_not_a_hang(case):
    data, match = BAD_FRAMES[case]
    frames = _fed(data, eof=True)
    with pytest.raises(w.WireError, match=match):
        await asyncio.wait_for(frames.read_frames(), TIMEOUT_S)
    assert issubclass(w.WireError, ConnectionError)  # readers treat it as a broken link


def test_the_worker_links_blocking_reader_has_the_same_checks():
    for case, (data, match) in BAD_FRAMES.items():
        a, b = socket.socketpair()
        try:
            b.settimeout(TIMEOUT_S)  # a reader that waited for bytes that never come would fail here
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            with pytest.raises(w.WireError, match=match):
                Link(b, w.FRONTEND_TO_ENGINE).read()
        finally:
            a.close()
            b.close()


def test_an_encoder_refuses_a_frame_over_the_limit(monkeypatch):
    monkeypatch.setattr(w, "MAX_FRAME", 100)
    with pytest.raises(w.WireError, match="exceeds the limit"):
        w.encode_frame([w.Audio("k", b"\0" * 200)])


# -- real links ----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_the_engine_host_closes_a_link_that_sends_a_bad_frame_and_says_why(caplog):
    with tempfile.TemporaryDirectory(prefix="asr-wire-") as tmp:
        host = EngineHost(FakeEngine(capacity=4, max_batch=2), SchedulerConfig(), os.path.join(tmp, "engine.sock"))
        await host.start()
        try:
            # A well-behaved frontend on the same host, whose link must outlive the bad one.
            good = RemoteScheduler(host.socket_path, name="good")
            await asyncio.wait_for(good.connect(), TIMEOUT_S)
            frames = await w.open_link(host.socket_path, w.ENGINE_TO_FRONTEND)
            writer = frames.transport
            first = await asyncio.wait_for(frames.read_frames(), TIMEOUT_S)
            assert isinstance(first[0][0], w.Hello)
            with caplog.at_level(logging.ERROR, logger="nemostream.engine_host"):
                writer.write(_frame(msgspec.msgpack.encode([[99, "k"]])))
                got = []
                while (batch := await asyncio.wait_for(frames.read_frames(), TIMEOUT_S)) is not None:
                    got += [m for f in batch for m in f]
            errors = [m for m in got if isinstance(m, w.Error)]
            assert errors and "Invalid value 99" in errors[0].message  # told why, then the link closed
            assert any("bad frame" in r.getMessage() for r in caplog.records)
            writer.close()
            await asyncio.wait_for(good.sync(), TIMEOUT_S)  # the other frontend's link still answers
            assert good.dead_reason is None
            await good.stop()
        finally:
            await host.stop()


@pytest.mark.asyncio
async def test_a_frontend_marks_the_engine_dead_on_a_bad_frame_with_the_reason():
    hello = EngineFacts(MODEL, GEOMETRY, 4, 2, "eager", SchedulerConfig()).hello()

    async def serve(reader, writer):
        writer.write(w.encode_frame([hello]))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(_frame(b"\x93\x15\xa1k"))  # a whole frame whose Result is cut short
        await writer.drain()
        await asyncio.sleep(TIMEOUT_S)  # the connection stays open: only the frame is bad

    with tempfile.TemporaryDirectory(prefix="asr-wire-") as tmp:
        path = os.path.join(tmp, "engine.sock")
        server = await asyncio.start_unix_server(serve, path=path)
        remote = RemoteScheduler(path)
        try:
            facts = await asyncio.wait_for(remote.connect(), TIMEOUT_S)
            assert facts.geometry == GEOMETRY
            await asyncio.wait_for(remote.disconnected.wait(), TIMEOUT_S)
            assert "malformed frame" in remote.dead_reason
        finally:
            await remote.stop()
            server.close()


def test_a_worker_that_gets_a_bad_frame_closes_its_link_and_the_scheduler_hears_it():
    worker = EngineWorker.start("tests.fake_engine:build_fake_engine",
                                EngineConfig(model="fake", max_streams=8, max_batch=4, lookahead_ms=160),
                                ChildOptions(log_level="WARNING", gc_freeze=False))
    try:
        assert worker.warmup()
        worker._sock.sendall(_frame(msgspec.msgpack.encode([[45, "not an id"]])))
        worker._process.join(TIMEOUT_S)
        assert worker._process.exitcode == 0  # it returned: the link closed, not a crash or a hang
        with pytest.raises(EngineError, match="exited"):
            worker.warmup()
    finally:
        worker.close()


@pytest.mark.asyncio
async def test_worker_replies_are_matched_by_request_id_not_by_order():
    worker = EngineWorker.start("tests.fake_engine:build_fake_engine",
                                EngineConfig(model="fake", max_streams=8, max_batch=4, lookahead_ms=160),
                                ChildOptions(log_level="WARNING", gc_freeze=False))
    try:
        worker.warmup()
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        worker._waiting.update({101: _Pending(first), 102: _Pending(second)})
        timings = StepTimings()
        done = [w.StepDone(i, "fake", timings, (0.0, 0.0, 0.0, 0.0), {}, None, b"", b"", b"", [],
                           w.as_column([0], w.I64), b"", [], b"", {}, {}) for i in (102, 101)]
        worker._deliver(bytes(w.encode_frame(done))[w.HEADER.size:], 1.0)  # answered in reverse order
        assert (await first)[0].id == 101 and (await second)[0].id == 102
    finally:
        worker.close()


@pytest.mark.asyncio
async def test_a_spaced_writer_sends_an_idle_links_message_at_once_and_a_busy_ones_together():
    """FrameWriter(min_interval_s): the first message after a quiet spell goes on the next loop
    iteration; messages of the following iterations within the interval wait and share a frame;
    close() writes what waits."""
    frames = w.FrameReader(w.FRONTEND_TO_ENGINE)
    sink = _Sink(frames)
    out = w.FrameWriter(sink, min_interval_s=0.2)
    out.send(w.Audio("a", b"\0" * 8))
    await asyncio.sleep(0)
    assert out.frames == 1  # idle: at once
    for i in range(3):  # three more loop iterations, well inside the interval
        out.send(w.Audio(f"b{i}", b"\0" * 8))
        await asyncio.sleep(0)
    assert out.frames == 1  # they wait for the interval
    await asyncio.sleep(0.3)
    assert out.frames == 2  # and go as one frame
    out.send(w.End("c"))
    out.close()  # close does not wait for the interval
    assert out.frames == 3
    batch = await asyncio.wait_for(frames.read_frames(), TIMEOUT_S)
    assert [[m.key for m in f] for f in batch] == [["a"], ["b0", "b1", "b2"], ["c"]]


@pytest.mark.asyncio
async def test_the_frames_before_a_bad_one_are_read_first_then_the_error():
    good = [w.Audio("a", b"\0" * 8), w.End("a")]
    frames = _fed(b"".join(bytes(w.encode_frame([m])) for m in good) + _frame(b"\xc1"), eof=False)
    assert [m for f in await asyncio.wait_for(frames.read_frames(), TIMEOUT_S) for m in f] == good
    with pytest.raises(w.WireError, match="malformed frame"):
        await asyncio.wait_for(frames.read_frames(), TIMEOUT_S)


@pytest.mark.parametrize("change, why", [
    ({"consumed": [1]}, "different lengths"),
    ({"tok_end": [2, 3]}, "token columns"),
    ({"pieces": ["\u2581a"]}, "token columns"),
    ({"ends": {5: (3,)}}, "not there"),
    ({"keys": ["k1"]}, "1 keys for 2 rows"),
], ids=["a short column", "tokens past the columns", "a short token column", "an event of no row", "a key short"])
def test_a_rows_message_whose_columns_disagree_is_a_wire_error(change, why):
    good = _example(w.Rows)
    assert _decode_one(w.encode_frame([good]), w.ENGINE_TO_FRONTEND) == [good]
    columns = {f: getattr(good.columns, f) for f in good.columns.__struct_fields__}
    keys = good.keys
    if "keys" in change:
        keys = change.pop("keys")
    columns.update(change)
    raw = msgspec.msgpack.encode([[21, keys, list(columns.values())]])  # as a peer would send it, unchecked
    frame = w.HEADER.pack(len(raw)) + raw
    with pytest.raises(w.WireError, match=why):
        _decode_one(frame, w.ENGINE_TO_FRONTEND)
