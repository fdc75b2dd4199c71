"""A step's batch: formed from the slot books (server.scheduling.slot_books) as columns, and run on the
engine with what fails isolated (retries, splits, a lowered maximum batch). The scheduler
(server.scheduling.scheduler) submits batches and applies their outcomes to its streams.

Pure Python and numpy; no gRPC, no torch.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from engines.api import (BadChunkError, EndpointingParams, EngineOverloadedError, StepPlan, StepResult,
                         StreamStateLostError)
from engines.sample_ring import RingSamples, SampleRing
from server.scheduling.slot_books import SlotBooks
from server.scheduling.stream_state import StreamState


@dataclass(slots=True)
class StepBatch:
    """A submitted step's rows, as columns (position i: the i-th row, oldest first), with what
    the books need when it returns. A retry or a split runs a subset of positions."""

    rows: np.ndarray                 # the rows' slots
    streams: list[StreamState]
    stream_ids: list[str]
    samples: RingSamples             # the rows' chunks: spans of the slots' sample ring
    first: np.ndarray
    audio_ended: np.ndarray
    new_utterance: np.ndarray
    endpointing: dict[int, EndpointingParams]  # position -> the stream's endpointing (first chunks)
    ready_at: np.ndarray             # when each row's audio was complete (per-chunk latency starts here)
    consumed: np.ndarray             # each stream's samples consumed once this row's chunk has run (its end)

    def __len__(self) -> int:
        return len(self.stream_ids)

    def plan(self, pos: np.ndarray) -> StepPlan:
        if pos.size == len(self.stream_ids):  # the whole batch, in order (positions only shrink)
            return StepPlan.from_columns(self.stream_ids, self.rows, self.samples, self.first, self.audio_ended,
                                         self.new_utterance, self.endpointing)
        at = pos.tolist()
        where = {p: i for i, p in enumerate(at)}
        return StepPlan.from_columns([self.stream_ids[p] for p in at], self.rows[pos], self.samples.take(pos),
                                     self.first[pos], self.audio_ended[pos], self.new_utterance[pos],
                                     {where[p]: e for p, e in self.endpointing.items() if p in where})


@dataclass
class StepOutcome:
    """What one submitted batch came to, after retries and splits on the engine thread."""

    done: list[tuple[np.ndarray, StepResult]] = field(default_factory=list)  # successful steps: their positions
    rejected: dict[str, str] = field(default_factory=dict)  # stream id -> BadChunkError message
    failed: dict[str, str] = field(default_factory=dict)    # stream id -> why its chunk could not run
    lost: dict[str, str] = field(default_factory=dict)      # stream id -> StreamStateLostError message
    faults: list[str] = field(default_factory=list)         # SchedulerObserver.step_fault kinds, in order
    errors: list[str] = field(default_factory=list)         # the exceptions of failed attempts, for the log
    max_batch: int | None = None                            # lowered to this after running out of memory
    step_seconds: float = 0.0   # the engine's time on the attempts that ran
    executions: dict[str, int] = field(default_factory=dict)


def form_batch(books: SlotBooks, ring: SampleRing, max_batch: int) -> tuple[StepBatch | None, np.ndarray | list]:
    """The next batch: its rows chosen and their chunk spans computed over the slot books'
    arrays; the audio stays in the ring (the plan names its spans); per row only its ready time
    is looked up. Also each row's seconds in the queue (an array, for the metrics)."""
    g = books.geometry
    rows = books.choose(max_batch)
    if rows.size == 0:
        return None, []
    now = time.monotonic()
    k = books.next_chunk[rows]
    received = books.received[rows]
    flushing = books.flushing[rows]
    queued_at = books.queued_at[rows]
    need = g.samples_needed(k)
    start = np.where(k == 0, 0, need - g.chunk_samples)      # consumed_after(k - 1)
    # Mid-stream a chunk ends where it is complete; after the end of audio, at most there.
    end = np.where(flushing, np.minimum(need, received), need)
    start = np.minimum(start, end)
    ended_here = flushing & (end == received)
    first = k == 0
    new_utterance = books.new_utterance[rows].copy()
    books.new_utterance[rows] = False
    all_streams = books.streams
    streams = [all_streams[r] for r in rows.tolist()]
    in_ring = received - books.spilled[rows]
    if (end > in_ring).any() or (in_ring - start > ring.width).any():  # the books and the ring disagree
        bad = int(np.flatnonzero((end > in_ring) | (in_ring - start > ring.width))[0])
        raise RuntimeError(f"stream {streams[bad].stream_id}: chunk [{start[bad]}, {end[bad]}) is not in its ring "
                           f"({in_ring[bad]} samples written, {ring.width} kept)")
    samples = RingSamples(ring, rows, start, end)
    endpointing: dict[int, EndpointingParams] = {}
    # A chunk is ready since the audio that completed it arrived; one that the end of audio
    # completed, since the end arrived.
    ready_at = books.completed_time(rows, k, queued_at)
    for i in np.flatnonzero(ended_here & (end < need)).tolist():
        ready_at[i] = streams[i].ended_at or now
    for i in np.flatnonzero(first).tolist():
        if streams[i].endpointing is not None:
            endpointing[i] = streams[i].endpointing
    batch = StepBatch(rows=rows, streams=streams, stream_ids=[s.stream_id for s in streams], samples=samples,
                       first=first, audio_ended=ended_here, new_utterance=new_utterance, endpointing=endpointing,
                       ready_at=ready_at, consumed=end)
    return batch, now - queued_at


async def run_isolated(batch: StepBatch, engine_step: Callable[[StepPlan], Awaitable[tuple[StepResult, float]]],
                       max_batch: int, books: SlotBooks, executions: Callable[[], dict[str, int]]) -> StepOutcome:
    """Run the batch, isolating what fails (this logic on the loop, each engine step through
    `engine_step`; the slot books say which rows still take chunks).

    The engine promises that a step that raises changed no stream's state, so any subset
    of the batch may simply run again:
      - BadChunkError: the named streams are rejected, the rest runs again at once;
      - EngineOverloadedError (out of device memory): the batch runs again in halves, and
        the maximum batch drops to the size that could not run, halved;
      - StreamStateLostError: the named streams fail (their state is gone), the rest runs again;
      - any other error: the same batch runs once more (a transient fault), then in halves,
        recursively, so the stream whose chunk makes the engine fail fails alone and the
        others go on. A bounded number of attempts keeps a dead engine from being tried
        2n times per batch: what is left when they run out fails.
    Chunks of streams that ended meanwhile are dropped before every attempt. A group is an
    array of positions in the batch; the common case is one attempt with all of them."""
    out = StepOutcome()
    n = len(batch)
    ids = batch.stream_ids
    budget = 2 + 4 * math.ceil(math.log2(n)) if n > 1 else 2  # attempts for failures other than memory
    # (group, retried): retried groups, and halves of a failed group, split on their next failure.
    work: collections.deque[tuple[np.ndarray, bool]] = collections.deque([(np.arange(n), False)])
    while work:
        group, retried = work.popleft()
        group = group[books.live[batch.rows[group]]]
        if not group.size:
            continue
        if group.size > max_batch:
            parts = [group[i:i + max_batch] for i in range(0, group.size, max_batch)]
            work.extendleft((part, retried) for part in reversed(parts))
            continue
        try:
            result, seconds = await engine_step(batch.plan(group))
            out.step_seconds += seconds
        except BadChunkError as exc:
            bad = set(exc.stream_ids) & {ids[p] for p in group.tolist()}
            if not bad:
                raise
            for stream_id in bad:
                out.rejected[stream_id] = str(exc)
            work.appendleft((np.array([p for p in group.tolist() if ids[p] not in bad], dtype=np.int64), retried))
            continue
        except StreamStateLostError as exc:
            lost = set(exc.stream_ids) & {ids[p] for p in group.tolist()}
            out.faults.append("lost")
            out.errors.append(f"{type(exc).__name__}: {exc}")
            for p in group.tolist():
                if ids[p] in lost or not lost:
                    out.lost[ids[p]] = str(exc)
            rest = np.array([p for p in group.tolist() if ids[p] not in out.lost], dtype=np.int64)
            if rest.size:
                work.appendleft((rest, retried))
            continue
        except EngineOverloadedError as exc:
            out.errors.append(f"{type(exc).__name__}: {exc}")
            if group.size == 1:  # out of memory even alone: nothing smaller to try
                out.faults.append("isolated")
                out.failed[ids[group[0]]] = f"the engine ran out of memory on this stream alone: {exc}"
                continue
            out.faults.append("overloaded")
            half = (group.size + 1) // 2
            if half < max_batch:
                max_batch = half
                out.max_batch = max_batch
            work.appendleft((group[half:], retried))
            work.appendleft((group[:half], retried))
            continue
        except Exception as exc:  # noqa: BLE001 - the engine failed: retry, then isolate
            out.errors.append(f"{type(exc).__name__}: {exc}")
            budget -= 1
            if budget <= 0:
                for p in group.tolist():
                    out.failed[ids[p]] = f"engine step failed: {exc}"
                for rest, _ in work:
                    for p in rest.tolist():
                        out.failed[ids[p]] = f"engine step failed: {exc}"
                work.clear()
                break
            if not retried:
                out.faults.append("retry")
                work.appendleft((group, True))
            elif group.size > 1:
                out.faults.append("split")
                half = (group.size + 1) // 2
                work.appendleft((group[half:], True))
                work.appendleft((group[:half], True))
            else:
                out.faults.append("isolated")
                out.failed[ids[group[0]]] = f"engine step failed: {exc}"
            continue
        out.done.append((group, result))
    out.executions = dict(executions())
    return out
