"""What a step's results do to its streams, the scheduler's half that applies them
(server.scheduling.scheduler.Scheduler is a StepResults): the books move on as arrays, and per
row only what its stream gets.

Two ways out, by the scheduler's listener:
  - by default each answered chunk becomes its stream's event (ChunkResult), the stream's
    utterance book moved on with it (server.scheduling.utterances.chunk_event);
  - a listener that `wants_rows` (server.runtime.engine_host, whose frontend processes keep
    the streams' text) gets the step's rows as columns (ChunkRows), and this process makes no
    object per row; each row handed over counts against the stream's response window until the
    listener acknowledges it.

The scheduler provides what this class uses: `_books` (SlotBooks), `observer`, `listener`,
`_emit`, `_fail`. Pure Python and numpy; no gRPC, no torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from engines.api import StepResult
from server.scheduling.row_columns import RowColumns
from server.scheduling.step_batch import StepBatch, StepOutcome
from server.scheduling.stream_events import ChunkRows, ErrorKind, Utterance
from server.scheduling.stream_state import StreamState, StreamStatus
from server.scheduling.utterances import chunk_event, final_latency, token_columns

log = logging.getLogger("nemostream.scheduler")


class StepResults:
    """The scheduler's methods that apply a step's results (see the module doc)."""

    def _answer_without_step(self, stream: StreamState, audio_s: float, ready: float, is_final: bool,
                             final_due: bool) -> None:
        """A stream's event that needs no step (its final at the end of audio, or the client's
        final with no chunk pending): in the stream's own book, or to a listener that makes
        the events, as one row."""
        k = stream.next_chunk - 1
        if self.listener.wants_rows:
            self._books.unread[stream.slot] += 1
            self.listener.chunk_rows(ChunkRows([stream], RowColumns(
                [stream.received - len(stream.audio)], [k], [audio_s], [ready], [is_final], [final_due], [0], [], [],
                [], [""], {}, {})))
            return
        event = chunk_event(stream.stream_id, stream.utterances, k, ready, audio_s, [], [], [], "", (), (),
                            is_final, final_due)
        self._observe_finals(stream, event.finals, time.monotonic(), ready)
        self._emit(stream, event)

    def _observe_finals(self, stream: StreamState, finals: tuple[Utterance, ...], now: float, ready: float) -> None:
        for u in finals:
            self.observer.utterance_final(u.closed_by, final_latency(u, stream.final_requested_at, ready, now))

    def _scatter(self, batch: StepBatch, ran: np.ndarray, result: StepResult, outcome: StepOutcome,
                 queue_waits: Sequence[float]) -> None:
        """The result's rows back to their streams. The books advance as arrays; per row only
        what the stream gets: its event, and its utterance book where the row brought tokens,
        endpoints or its final. A columnar result (engines.streaming_engine) is read from its
        columns, so token objects are made only for rows that have tokens; so is an engine
        worker's (server.runtime.engine_worker rebuilds it from the reply's columns). A result of
        StreamUpdate rows (the fake engine) is read row by row."""
        at = ran.tolist()
        streams = [batch.streams[p] for p in at]
        expected = [batch.stream_ids[p] for p in at]
        columnar = result.columnar
        got = result.columns.stream_ids if columnar else [u.stream_id for u in result.updates]
        order = None  # result row of each planned row, when the engine answered in another order
        if got != expected:
            if len(got) != len(expected) or set(got) != set(expected):
                # The books cannot be trusted for any stream of this step.
                message = f"engine returned {len(got)} updates for a plan of {len(expected)} chunks"
                log.error(message)
                for stream in streams:
                    self._fail(stream, ErrorKind.INTERNAL, message)
                return
            where = {sid: i for i, sid in enumerate(got)}
            order = [where[sid] for sid in expected]
        self.observer.step_done(len(expected), outcome.step_seconds / max(1, len(outcome.done)), queue_waits,
                                result.engine, outcome.executions, result.timings)
        books, rows = self._books, batch.rows[ran]
        index = books.next_chunk[rows].tolist()
        books.advance(rows)
        due = books.final_due[rows]
        final_due = ((due >= 0) & (books.next_chunk[rows] >= due)).tolist()
        if self.listener.wants_rows:
            self._hand_rows(streams, index, batch.ready_at[ran].tolist(), batch.consumed[ran].tolist(), final_due,
                            result, order)
            return
        if columnar:
            cols = result.columns
            # Rows with something beyond progress: tokens, endpoint events, the final.
            busy = (np.diff(cols.token_offsets) > 0) | cols.is_final
            if cols.starts or cols.ends:
                busy[list(cols.starts.keys() | cols.ends.keys())] = True
            seconds = cols.audio_seconds
            # The token columns as lists, sliced per row below: no token object per token.
            offs = cols.token_offsets.tolist()
            ids, pieces, frames = cols.token_ids.tolist(), cols.token_pieces, cols.token_frames.tolist()
            if order is not None:
                busy, seconds = busy[order], seconds[order]
            busy, seconds = busy.tolist(), seconds.tolist()
        else:
            updates = result.updates if order is None else [result.updates[i] for i in order]
            busy = [bool(u.tokens or u.starts or u.ends or u.is_final) for u in updates]
            seconds = [u.audio_seconds for u in updates]
        now = time.monotonic()
        ready_at = batch.ready_at[ran].tolist()
        emit = self._emit
        answered: list[float] = []  # the latency of each chunk answered here
        for j, (stream, k, ready, audio_s, heavy, due_now) in enumerate(
                zip(streams, index, ready_at, seconds, busy, final_due)):
            stream.audio_seconds = audio_s
            if stream.status.terminal:
                continue  # cancelled or failed while the step ran: results go nowhere
            if not (heavy or due_now):  # progress only (most rows of a step): the open utterance as it was
                emit(stream, chunk_event(stream.stream_id, stream.utterances, k, ready, audio_s, (), (), (), "", (),
                                         (), False, False))
                answered.append(now - ready)
                continue
            if columnar:
                r = j if order is None else order[j]
                a, b = offs[r], offs[r + 1]
                done = self._deliver(stream, k, ready, now, ids[a:b], pieces[a:b], frames[a:b], cols.text_delta[r],
                                     cols.starts.get(r, ()), cols.ends.get(r, ()), bool(cols.is_final[r]), audio_s,
                                     due_now)
            else:
                u = updates[j]
                done = self._deliver(stream, k, ready, now, *token_columns(u.tokens), u.text_delta, u.starts, u.ends,
                                     u.is_final, audio_s, due_now)
            if done:
                answered.append(now - ready)
        if answered:
            self.observer.chunks_answered(answered)

    def _row_control(self, stream: StreamState, ends: bool, is_final: bool, final_due: bool) -> bool:
        """What a row that closes utterances or the stream changes in the books (whoever keeps its
        text). False when the row fails the stream instead."""
        if is_final and stream.status is not StreamStatus.FLUSHING:
            self._fail(stream, ErrorKind.INTERNAL, "engine reported a final before the end of audio")
            return False
        if ends:
            stream.new_utterance_next = True  # the engine resets its endpointer at the next chunk
        if final_due and not is_final:
            stream.final_due_after = None
            stream.new_utterance_next = True
        return True

    def _deliver(self, stream: StreamState, k: int, ready: float, now: float, ids: list[int], pieces: list[str],
                 frames: list[int], text: str, starts: tuple[int, ...], ends: tuple[int, ...], is_final: bool,
                 audio_s: float, final_due: bool) -> bool:
        """One row that brought tokens, endpoint events or the final (or whose client's final
        is due): its utterance book, then its event. False when the row failed the stream instead."""
        if not self._row_control(stream, bool(ends), is_final, final_due):
            return False
        event = chunk_event(stream.stream_id, stream.utterances, k, ready, audio_s, ids, pieces, frames, text, starts,
                            ends, is_final, final_due)
        if event.finals:
            self._observe_finals(stream, event.finals, now, ready)
        self._emit(stream, event)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("chunk done", extra={"stream_id": stream.stream_id, "chunk": k, "final": is_final})
        if is_final:
            stream.set_status(StreamStatus.FINISHED)
        return True

    def _hand_rows(self, streams: list[StreamState], index: list[int], ready_at: list[float], consumed: list[int],
                   final_due: list[bool], result: StepResult, order: list[int] | None) -> None:
        """The step's rows to a listener that makes the events (`wants_rows`), as columns. Per row
        only what the books need: the rows that end the stream or an utterance (few), and rows of
        streams that ended while the step ran (dropped)."""
        if order is not None:  # the planned rows' columns follow the result's order (which does not matter)
            planned = {r: j for j, r in enumerate(order)}
            perm = [planned[r] for r in range(len(order))]
            streams, index, ready_at, consumed, final_due = (
                [x[j] for j in perm] for x in (streams, index, ready_at, consumed, final_due))
        rows = ChunkRows(streams, row_columns(result, consumed, index, ready_at, final_due))
        cols = rows.columns
        is_final = cols.is_final
        for stream, seconds in zip(streams, cols.audio_seconds):
            stream.audio_seconds = seconds
        special = set(np.flatnonzero(np.asarray(is_final, dtype=bool) | np.asarray(final_due, dtype=bool)).tolist())
        special.update(cols.ends)
        dropped = {j for j, stream in enumerate(streams) if stream.status.terminal}  # cancelled or failed meanwhile
        for j in sorted(special - dropped):
            if not self._row_control(streams[j], j in cols.ends, is_final[j], final_due[j]):
                dropped.add(j)
        if dropped:
            rows = rows.take([j for j in range(len(streams)) if j not in dropped])
            if not rows.streams:
                return
            cols = rows.columns
        slots = np.fromiter((s.slot for s in rows.streams), dtype=np.int64, count=len(rows.streams))
        self._books.unread[slots] += 1
        now = time.monotonic()
        self.observer.chunks_answered([now - t for t in cols.ready_at])
        self.listener.chunk_rows(rows)
        if log.isEnabledFor(logging.DEBUG):
            for stream, k, final in zip(rows.streams, cols.chunk, cols.is_final):
                log.debug("chunk done", extra={"stream_id": stream.stream_id, "chunk": k, "final": final})
        for j in np.flatnonzero(cols.is_final).tolist():
            rows.streams[j].set_status(StreamStatus.FINISHED)


def row_columns(result: StepResult, consumed: list[int], chunk: list[int], ready_at: list[float],
                final_due: list[bool]) -> RowColumns:
    """A step result's rows as RowColumns, with the columns the plan knows (given in the
    result's order). A result of StreamUpdate rows (an in-process fake engine) is read through
    StepResult.columns, which turns them into columns."""
    cols = result.columns
    return RowColumns(consumed, chunk, cols.audio_seconds.tolist(), ready_at, cols.is_final.tolist(), final_due,
                      cols.token_offsets[1:].tolist(), cols.token_ids.tolist(), cols.token_pieces,
                      cols.token_frames.tolist(), cols.text_delta, cols.starts, cols.ends)
