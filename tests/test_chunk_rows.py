"""A scheduler whose listener makes the chunk events (StreamListener.wants_rows: the engine host,
whose frontend processes keep the streams' text) hands every answered chunk over as ChunkRows
columns. Against the fake engine:

- the events made from those rows with the listener's own utterance books
  (server.scheduling.utterances.chunk_event) are the in-process scheduler's events, field for
  field, through endpoints, a client's finals (at once and after pending chunks) and the end of
  the audio;
- the scheduler keeps no text for such streams, and makes no event but failures;
- a stream whose rows are not acknowledged stops being scheduled at its response window, and
  goes on once they are.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from engines.api import EndpointingParams
from server.scheduling.scheduler import StreamListener
from server.scheduling.stream_events import ChunkResult, ChunkRows, StreamFailure
from server.scheduling.utterances import UtteranceBook, chunk_event
from tests import waiting
from tests.fake_engine import FakeEngine
from tests.test_scheduler import collect, feed, started
from tests.test_utterances import call_audio, speech

pytestmark = pytest.mark.asyncio
EP = EndpointingParams()


class RowsListener(StreamListener):
    """A frontend's part, in miniature: a book per stream, events made from the rows."""

    wants_rows = True

    def __init__(self, frame_seconds: float):
        self.frame_seconds = frame_seconds
        self.books: dict[str, UtteranceBook] = {}
        self.events: dict[str, list] = {}
        self.rows_seen = 0
        self.steps: list[ChunkRows] = []

    def chunk_rows(self, rows: ChunkRows) -> None:
        self.steps.append(rows)
        c = rows.columns
        a = 0
        for i, stream in enumerate(rows.streams):
            b = c.tok_end[i]
            book = self.books.setdefault(stream.stream_id, UtteranceBook(self.frame_seconds))
            self.events.setdefault(stream.stream_id, []).append(chunk_event(
                stream.stream_id, book, c.chunk[i], c.ready_at[i], c.audio_seconds[i], c.ids[a:b], c.pieces[a:b],
                c.frames[a:b], c.text[i], c.starts.get(i, ()), c.ends.get(i, ()), c.is_final[i], c.final_due[i]))
            a = b
        self.rows_seen += len(rows)


def _comparable(events: list) -> list:
    # The stream id and the ready time are each run's own; everything else must match.
    return [dataclasses.replace(e, stream_id="", audio_ready_at=0.0) if isinstance(e, ChunkResult) else e for e in events]


async def _in_process(audio: np.ndarray, script) -> list:
    engine = FakeEngine()
    sched = await started(engine)
    handle = sched.open_stream(endpointing=EP)
    events = await script(sched, handle, audio, lambda: handle.next_event())
    handle.close()
    await sched.stop()
    assert engine.slots_in_use() == 0
    return events


async def _through_rows(audio: np.ndarray, script) -> tuple[list, RowsListener]:
    engine = FakeEngine()
    sched = await started(engine)
    listener = RowsListener(engine.geometry.encoder_frame_seconds)
    sched.listener = listener
    handle = sched.open_stream(endpointing=EP)
    sid = handle.stream_id
    taken = 0

    async def next_event():
        nonlocal taken
        await waiting.wait_for(lambda: len(listener.events.get(sid, [])) > taken, "the next row", 20)
        taken += 1
        sched.acknowledge(handle.state, 1)
        return listener.events[sid][taken - 1]

    events = await script(sched, handle, audio, next_event)
    assert not handle.state.events, "the scheduler made events of its own"
    assert handle.state.utterances.transcript == "" and handle.state.utterances.index == 0, "it kept text"
    handle.close()
    await sched.stop()
    assert engine.slots_in_use() == 0
    return events, listener


async def _whole_call(sched, handle, audio, next_event) -> list:
    """Three utterances split by the endpointer, the end of audio closing the stream."""
    await feed(handle, audio, seed=3)
    events = []
    while not (events and events[-1].is_final):
        events.append(await next_event())
    return events


async def _client_finals(sched, handle, audio, next_event) -> list:
    """A client's final after four pending chunks, then one at once, then the end of audio."""
    g = sched.geometry
    events = []
    await handle.push_audio(audio[: g.samples_needed(3)])
    assert sched.end_utterance(handle.state)
    while not any(e.finals for e in events):
        events.append(await next_event())
    assert sched.end_utterance(handle.state)
    events.append(await next_event())
    await handle.push_audio(speech(6, 1, g))
    handle.end_audio()
    while not events[-1].is_final:
        events.append(await next_event())
    return events


@pytest.mark.parametrize("script", [_whole_call, _client_finals], ids=["endpoints", "client-finals"])
async def test_events_made_from_rows_are_the_in_process_events(script):
    g = FakeEngine().geometry
    audio = call_audio(g, 3)[0] if script is _whole_call else speech(5, 8, g)
    here = await _in_process(audio, script)
    there, listener = await _through_rows(audio, script)
    assert all(isinstance(e, ChunkResult) for e in here)
    finals = [u for e in here for u in e.finals]
    assert len(finals) >= 2 and any(u.transcript for u in finals)
    assert _comparable(there) == _comparable(here)
    assert listener.rows_seen == len(there)


async def test_unacknowledged_rows_stop_the_stream_at_its_window_until_taken():
    engine = FakeEngine()
    sched = await started(engine, response_buffer=4)
    listener = RowsListener(engine.geometry.encoder_frame_seconds)
    sched.listener = listener
    handle = sched.open_stream()
    g = engine.geometry
    await handle.push_audio(speech(7, 12, g)[: g.samples_needed(9)])  # ten chunks complete
    sid = handle.stream_id
    await waiting.wait_for(lambda: len(listener.events.get(sid, [])) >= 4, "a full window of rows", 20)
    await asyncio.sleep(0.2)
    assert len(listener.events[sid]) == 4, "scheduled past an unread window"
    assert not sched.end_utterance(handle.state), "a client's final taken past a full window"
    sched.acknowledge(handle.state, 4)
    await waiting.wait_for(lambda: len(listener.events.get(sid, [])) >= 8, "the next window", 20)
    await asyncio.sleep(0.2)
    assert len(listener.events[sid]) == 8
    sched.acknowledge(handle.state, 8)  # more than were unread: the count stops at zero
    await waiting.wait_for(lambda: len(listener.events[sid]) == 10, "the rest of the chunks", 20)
    assert [e.chunk_index for e in listener.events[sid]] == list(range(10))
    handle.close()
    await sched.stop()
    assert engine.slots_in_use() == 0


async def test_only_failures_are_events_of_such_a_scheduler():
    engine = FakeEngine()
    sched = await started(engine)
    sched.listener = RowsListener(engine.geometry.encoder_frame_seconds)
    handle = sched.open_stream()
    await feed(handle, speech(8, 3, engine.geometry), seed=4, end=False)
    await waiting.wait_for(lambda: sched.listener.rows_seen >= 2, "rows", 20)
    await sched.stop()  # fails the open stream
    events = await collect(handle)
    assert len(events) == 1 and isinstance(events[0], StreamFailure)
    handle.close()
    assert engine.slots_in_use() == 0
