"""Utterances in the scheduler (server.scheduling.utterances, Scheduler.end_utterance), against the fake
engine, whose endpointing is as deterministic as its text: a chunk of exact zeros after speech
ends an utterance at the chunk's last frame.

- Each utterance gets one final with the tokens of its own frames, its start and end; the next
  one starts with empty text; interim transcripts carry only the open utterance.
- A client's request for the final: at once when nothing is pending, else right after the
  chunks whose audio was complete at the request; the next chunk starts a new utterance.
- The end of the audio ends the last utterance; a stream without endpointing is one utterance.
- Only the open utterance is kept: a long call's books do not grow, and the open utterance's
  tokens are not objects the garbage collector walks.
"""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from engines.api import EndpointingParams, TokenEvent
from server.scheduling.stream_events import ChunkResult, UtteranceEnd
from server.scheduling.utterances import UtteranceBook
from tests.engine_alone import transcribe_alone
from tests.fake_engine import FakeEngine
from tests.test_scheduler import collect, feed, started

pytestmark = pytest.mark.asyncio
EP = EndpointingParams()


def speech(seed: int, chunks: int, g) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(chunks * g.chunk_samples) * 0.1 + 0.01).astype(np.float32)


def call_audio(g, utterances: int, speech_chunks: int = 6, pause_chunks: int = 3) -> tuple[np.ndarray, int]:
    """Utterances of speech-like noise separated by chunk-aligned pauses of exact zeros; the
    first chunk's span decides the alignment, so every later chunk holds chunk_samples."""
    first = np.full(g.samples_needed(0), 0.02, np.float32)
    parts = [first]
    for i in range(utterances):
        parts += [speech(10 + i, speech_chunks, g), np.zeros(pause_chunks * g.chunk_samples, np.float32)]
    return np.concatenate(parts), utterances


def finals_of(events) -> list:
    return [u for e in events if isinstance(e, ChunkResult) for u in e.finals]


async def test_each_utterance_gets_one_final_and_the_next_starts_empty():
    engine = FakeEngine()
    sched = await started(engine)
    g = engine.geometry
    audio, n = call_audio(g, 3)
    handle = sched.open_stream(endpointing=EP)
    events, _ = await asyncio.gather(collect(handle), feed(handle, audio, seed=1))
    handle.close()
    await sched.stop()
    finals = finals_of(events)
    assert [u.index for u in finals] == list(range(len(finals)))
    assert [u.closed_by for u in finals[:n]] == [UtteranceEnd.ENDPOINT] * n
    # Joined, the utterances are the stream's text; each final's tokens are its own frames.
    # (The fake's pieces may split a word across a boundary, so compare without spaces.)
    whole = transcribe_alone(engine, audio)
    assert "".join(u.transcript for u in finals).replace(" ", "") == whole.replace(" ", "")
    assert all(u.transcript for u in finals[:n]), [u.transcript for u in finals]
    for earlier, later in zip(finals, finals[1:]):
        if earlier.tokens and later.tokens:
            assert earlier.tokens[-1].frame < later.tokens[0].frame
            assert earlier.end_seconds <= later.start_seconds
    # Interims: only the open utterance, restarting after each final.
    for e in events:
        if e.finals and not e.is_final:
            assert not e.transcript or not any(e.transcript.startswith(u.transcript) for u in e.finals if u.transcript)
    assert events[-1].is_final and sum(1 for e in events if e.is_final) == 1
    assert engine.slots_in_use() == 0


async def test_without_endpointing_the_stream_is_one_utterance():
    engine = FakeEngine()
    sched = await started(engine)
    audio, _ = call_audio(engine.geometry, 3)
    handle = sched.open_stream()
    events, _ = await asyncio.gather(collect(handle), feed(handle, audio, seed=2))
    handle.close()
    await sched.stop()
    finals = finals_of(events)
    assert len(finals) == 1 and finals[0].closed_by is UtteranceEnd.END_OF_AUDIO
    assert finals[0].transcript == transcribe_alone(engine, audio) == events[-1].transcript


async def test_client_end_of_utterance_at_once_and_after_pending_chunks():
    engine = FakeEngine()
    sched = await started(engine)
    g = engine.geometry
    handle = sched.open_stream(endpointing=EP)
    first = speech(5, 8, g)[: g.samples_needed(3)]
    await handle.push_audio(first)  # four whole chunks: all complete now
    assert handle.end_utterance()
    events = []
    while not any(e.finals for e in events):
        events.append(await handle.next_event())
    final = events[-1].finals[0]
    assert final.closed_by is UtteranceEnd.CLIENT and final.index == 0
    # The final came right after the fourth chunk, with the text of all four.
    assert events[-1].chunk_index == 3
    assert final.transcript and final.transcript == transcribe_alone(engine, first)
    # Nothing pending now: a second request is answered at once, with an empty final.
    assert handle.end_utterance()
    event = await handle.next_event()
    assert event.finals and event.finals[0].index == 1 and event.finals[0].transcript == ""
    # The chunk after a client's final starts a new utterance (the engine resets there).
    engine_seen = []
    real_step = engine.step
    engine.step = lambda plan: engine_seen.extend(c.new_utterance for c in plan.chunks) or real_step(plan)
    await handle.push_audio(speech(6, 1, g))
    handle.end_audio()
    rest = [e async for e in handle]
    handle.close()
    await sched.stop()
    assert engine_seen and engine_seen[0] is True
    assert rest[-1].is_final
    # The last utterance has a final only if it holds text (earlier utterances had finals).
    last = [u for e in rest for u in e.finals]
    assert all(u.index == 2 and u.transcript for u in last)
    assert engine.slots_in_use() == 0


async def test_a_long_call_keeps_only_the_open_utterance():
    engine = FakeEngine()
    sched = await started(engine, max_pending_seconds=5.0)
    g = engine.geometry
    audio, n = call_audio(g, 40, speech_chunks=4, pause_chunks=2)
    handle = sched.open_stream(endpointing=EP)
    book: UtteranceBook = handle.state.utterances
    peak_tokens = 0

    async def drain():
        nonlocal peak_tokens
        count = 0
        async for event in handle:
            peak_tokens = max(peak_tokens, book.open_tokens)
            count += len(event.finals)
        return count

    finals, _ = await asyncio.gather(drain(), feed(handle, audio, seed=3))
    handle.close()
    await sched.stop()
    assert finals >= n
    per_utterance = 4 * g.encoder_frames * 2  # at most 2 tokens per frame of one utterance's chunks (fake: <= 2 a chunk)
    assert peak_tokens <= per_utterance, peak_tokens


def _tracked_reachable(root: object) -> int:
    """Objects the garbage collector tracks, reachable from `root` (root included)."""
    seen, todo = {id(root)}, [root]
    count = 0
    while todo:
        obj = todo.pop()
        count += gc.is_tracked(obj)
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, type):
                seen.add(id(ref))
                todo.append(ref)
    return count


async def test_a_long_open_utterance_holds_no_more_tracked_objects_than_a_short_one():
    # A call without endpointing keeps one utterance open for its whole length: its tokens must
    # not each be an object the garbage collector walks (run 29: a full collection of the
    # scheduler's heap at 2,400 such streams stalled every stream for about a second).
    def book_with(n: int) -> UtteranceBook:
        book = UtteranceBook(0.08)
        for i in range(n):
            book.add((TokenEvent(i % 500, f"\u2581w{i % 97}", i),), f" w{i % 97}")
        return book

    short, long = book_with(3), book_with(5_000)
    assert long.open_tokens == 5_000
    assert _tracked_reachable(long) == _tracked_reachable(short)
    closed = long.close(UtteranceEnd.END_OF_AUDIO)
    assert closed is not None and len(closed.tokens) == 5_000
    assert closed.tokens[4_999] == TokenEvent(4_999 % 500, f"\u2581w{4_999 % 97}", 4_999)
    assert closed.start_seconds == 0.0 and closed.end_seconds == 5_000 * 0.08
    assert long.open_tokens == 0
