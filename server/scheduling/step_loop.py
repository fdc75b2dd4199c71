"""The steps, the scheduler's half that runs them (server.scheduling.scheduler.Scheduler is a
StepLoop): the batching task decides when a batch is due (full, its deadline reached, or behind a
running step near its end), forms it from the books as array operations
(server.scheduling.step_batch.form_batch), submits it (up to `pipeline_depth` steps at once),
and, when a step returns, has its results applied (server.scheduling.step_results), its failures
isolated, and its rows put back into the ready set. It also watches for an engine that stops
answering, and marks the engine dead after enough failed steps in a row: every open stream then
gets UNAVAILABLE.

The scheduler provides what this class uses: `engine`, `config`, `observer`, `listener`,
`max_batch`, `_books`, `_ring`, `_streams`, `_wakeup`, `dead_reason`, `label`, `_executor`,
`_stopping`, `_fail`, `_scatter`, `_release_slot`, `_maybe_enqueue`, `_room_freed`,
`book_written`. Pure Python and numpy; no gRPC, no torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence

import numpy as np

from engines.api import EngineState, StepPlan, StepResult
from server.scheduling.arrival_rate import ArrivalRate
from server.scheduling.step_batch import StepBatch, StepOutcome, form_batch, run_isolated
from server.scheduling.stream_events import ErrorKind

log = logging.getLogger("nemostream.scheduler")


class StepLoop:
    """The scheduler's methods that run its steps (see the module doc)."""

    def _init_step_loop(self, engine) -> None:
        self._steps_in_flight = 0
        self._step_tasks: set[asyncio.Task] = set()
        self._consecutive_failures = 0
        self._step_async = getattr(engine, "step_async", None)
        self._engine_free_at = 0.0              # when the engine finished its last step (step_async)
        self._running_since = 0.0               # when the step now running began (about)
        self._step_s = 0.0                      # the engine's recent step seconds (moving average)
        self._arrivals = ArrivalRate()          # chunks into steps per second, recently
        self._last_progress = 0.0               # when a step last finished, or one was submitted to an idle engine
        self._slowest_step = 0.0                # the slowest recent step, decaying (the hang deadline's base)

    # -- the batching task -----------------------------------------------------------------
    async def _batch_loop(self) -> None:
        while not self._stopping:
            try:
                self.book_written()
                if not self._batch_due():
                    self._wakeup.clear()
                    timeout = self._time_to_deadline()
                    if timeout is None:
                        await self._wakeup.wait()
                    else:  # a timer, not wait_for: no task per wait
                        timer = asyncio.get_running_loop().call_later(timeout, self._wakeup.set)
                        try:
                            await self._wakeup.wait()
                        finally:
                            timer.cancel()
                    continue
                batch, queue_waits = self._take_batch()
                if batch is not None:
                    self._submit(batch, queue_waits)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a scheduler bug must not stop serving silently
                log.exception("batch loop iteration failed")
                await asyncio.sleep(0.01)  # back off, so a persistent bug does not spin a core

    def _loop_exited(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        if task.cancelled():  # the event loop is closing under us: nothing left to serve
            log.warning("batch loop cancelled without stop()")
            return
        reason = f"batch loop exited unexpectedly: {task.exception()!r}"
        log.critical(reason)
        self._mark_dead(reason)

    def _batch_due(self) -> bool:
        if not self._books.ready_count or self._steps_in_flight >= self.config.pipeline_depth:
            return False
        if self._books.ready_count >= self.max_batch:
            return True
        # Partial batches go to an idle engine after the batching deadline, and behind a running
        # step once it is near its end (`overlap_at`); otherwise chunks keep gathering and the
        # batch grows.
        return self._time_to_deadline() == 0.0

    def _time_to_deadline(self) -> float | None:
        """Seconds until a partial batch is due (0: now), or None while nothing can make it due
        but a wake-up (no chunk ready, the pipeline full, or no overlap behind a running step)."""
        if not self._books.ready_count or self._steps_in_flight >= self.config.pipeline_depth:
            return None
        now = time.monotonic()
        if self._steps_in_flight:
            if self._step_async is None or self.config.overlap_at >= 1.0 or self._steps_in_flight > 1:
                return None
            return max(0.0, self._running_since + self.config.overlap_at * self._step_s - now)
        oldest = self._books.oldest_queued_at()
        return max(0.0, oldest + self._batch_wait(now) - now)

    def _batch_wait(self, now: float) -> float:
        """How long a partial batch for an idle engine waits for company: batch_wait_s when the
        recent load brings at least wait_min_arrivals chunks in that time, else nothing."""
        wait = self.config.batch_wait_s
        if self._arrivals.per_second(now) * wait >= self.config.wait_min_arrivals:
            return wait
        return 0.0

    def _take_batch(self) -> tuple[StepBatch | None, Sequence[float]]:
        return form_batch(self._books, self._ring, self.max_batch)

    def _submit(self, batch: StepBatch, queue_waits: Sequence[float]) -> None:
        now = time.monotonic()
        if self._steps_in_flight == 0:
            self._last_progress = now  # the hang clock starts with the engine's work
            self._running_since = now
        self._arrivals.add(len(batch.rows), now)
        self._steps_in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._complete_step(batch, self._run_step(batch), queue_waits))
        self._step_tasks.add(task)
        task.add_done_callback(self._step_tasks.discard)

    async def _engine_step(self, plan: StepPlan) -> tuple[StepResult, float]:
        """One engine step and the seconds the engine spent on it. An engine with `step_async`
        (server.runtime.engine_worker: the engine in its own process) is awaited here on the loop;
        any other runs on the one engine thread. The seconds leave out waiting behind the
        step before it (two are submitted at once), so they add up to the engine's busy time."""
        if self._step_async is not None:
            start = time.perf_counter()
            result = await self._step_async(plan)
            end = time.perf_counter()
            seconds = end - max(start, self._engine_free_at)
            self._engine_free_at = end
            self._running_since = time.monotonic()  # the step behind this one, if any, runs from here
            self._step_s = seconds if not self._step_s else 0.8 * self._step_s + 0.2 * seconds
            return result, seconds
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_step, plan)

    def _timed_step(self, plan: StepPlan) -> tuple[StepResult, float]:
        t0 = time.perf_counter()
        result = self.engine.step(plan)
        return result, time.perf_counter() - t0

    def _run_step(self, batch: StepBatch) -> Awaitable[StepOutcome]:
        return run_isolated(batch, self._engine_step, self.max_batch, self._books, self.engine.executions)

    async def _complete_step(self, batch: StepBatch, run: Awaitable[StepOutcome],
                             queue_waits: Sequence[float]) -> None:
        try:
            try:
                outcome: StepOutcome = await run
            except Exception as exc:  # noqa: BLE001 - a failed step fails its streams, not the server
                self._step_failed(batch, exc)
                return
            self.executions = outcome.executions
            for kind in outcome.faults:
                self.observer.step_fault(kind)
            if outcome.max_batch is not None and outcome.max_batch < self.max_batch:
                self.max_batch = outcome.max_batch
                log.warning("engine out of memory: max batch lowered", extra={"max_batch": self.max_batch})
                self.observer.max_batch_lowered(self.max_batch)
            if outcome.errors:
                log.error("engine step attempts failed", extra={
                    "streams": batch.stream_ids, "attempts_failed": len(outcome.errors),
                    "isolated": sorted(outcome.failed), "errors": outcome.errors[-3:]})
            for stream_id, message in outcome.rejected.items():
                stream = self._streams.get(stream_id)
                if stream is not None:
                    self._fail(stream, ErrorKind.INVALID_ARGUMENT, f"the engine rejected this stream's audio: {message}")
            for ran, result in outcome.done:
                self._scatter(batch, ran, result, outcome, queue_waits)
                queue_waits = []
            by_id = dict(zip(batch.stream_ids, batch.streams)) if (outcome.lost or outcome.failed) else {}
            for stream_id, message in outcome.lost.items():
                self._fail(by_id[stream_id], ErrorKind.INTERNAL, f"the engine lost this stream's state: {message}")
            if outcome.done:
                self._consecutive_failures = 0
                for stream_id, message in outcome.failed.items():
                    self._fail(by_id[stream_id], ErrorKind.INTERNAL,
                               f"{message} (the other streams of its batch went on)")
            elif outcome.failed or outcome.lost:
                # Nothing of this batch ran: the engine itself may be broken.
                reason = outcome.errors[-1] if outcome.errors else "unknown error"
                self._count_failure(reason)
                for stream_id, message in outcome.failed.items():
                    self._fail(by_id[stream_id], ErrorKind.INTERNAL, message)
        except Exception:  # noqa: BLE001
            log.exception("applying a step result failed")
            for stream in batch.streams:
                self._fail(stream, ErrorKind.INTERNAL, "internal error applying an engine step")
        finally:
            self._requeue(batch)
            self._steps_in_flight -= 1
            self._step_finished(time.monotonic())
            self._wakeup.set()

    def _requeue(self, batch: StepBatch) -> None:
        """A step returned: its rows leave the step. Rows of ended streams give their slot back,
        rows whose next chunk is already complete (under load, most) rejoin the ready set as
        one array operation, in the batch's order; flushing rows take the per-stream way."""
        books, rows = self._books, batch.rows
        books.in_flight[rows] = False
        self._room_freed(rows)  # ring room for audio that waited (server.scheduling.audio_intake)
        live = books.live[rows]
        if not live.all():
            for i in np.flatnonzero(~live).tolist():
                stream = batch.streams[i]
                if stream.status.terminal:
                    self._release_slot(stream)
        runnable = books.runnable_after_step(rows)
        if runnable.size:
            limit = self.config.response_buffer
            if self.listener.wants_rows:  # events here are failures only, of streams no longer live
                keep = runnable[books.unread[runnable] < limit]
            else:
                streams = books.streams
                keep = np.asarray([r for r in runnable.tolist() if len(streams[r].events) < limit], dtype=np.int64)
            if keep.size:
                books.queue_rows(keep, time.monotonic())
        for i in np.flatnonzero(live & books.flushing[rows]).tolist():
            self._maybe_enqueue(batch.streams[i])

    # -- a hung engine -------------------------------------------------------------------
    def hang_deadline(self) -> float:
        """Seconds without a finished step (while one is submitted) after which the engine is
        taken for hung: the configured floor, or a multiple of the slowest recent step."""
        return max(self.config.hang_timeout_s, self.config.hang_step_factor * self._slowest_step)

    def _step_finished(self, now: float) -> None:
        took = now - self._last_progress
        # A decaying maximum: one slow step (a GC pause, a cold kernel) raises the deadline for
        # a while, then it returns to what steps take now.
        self._slowest_step = max(took, self._slowest_step * 0.99)
        self._last_progress = now

    async def _watch_for_hangs(self) -> None:
        """An engine that stops answering (a stopped or wedged worker, a driver hang) fails no
        step: nothing else would notice. Health goes NOT_SERVING, streams get UNAVAILABLE and
        the server exits with status 3, as for a dead engine."""
        period = min(1.0, self.config.hang_timeout_s / 4)
        while self.dead_reason is None and not self._stopping:
            await asyncio.sleep(period)
            if self._steps_in_flight and self.engine_name is not None:
                waited, deadline = time.monotonic() - self._last_progress, self.hang_deadline()
                if waited > deadline:
                    reason = (f"the engine is hung: no step finished for {waited:.1f} s "
                              f"(deadline {deadline:.1f} s, from the step time)")
                    self._mark_dead(reason)
                    abandon = getattr(self.engine, "abandon", None)  # an engine worker: killed, not waited for
                    if callable(abandon):
                        abandon(reason)

    def _step_failed(self, batch: StepBatch, exc: BaseException) -> None:
        """The step's own machinery raised (not an engine error it handles): fail its streams."""
        log.error("engine step failed", exc_info=exc, extra={"streams": batch.stream_ids})
        self._count_failure(f"{type(exc).__name__}: {exc}")
        for stream in batch.streams:
            self._fail(stream, ErrorKind.INTERNAL, f"engine step failed: {exc}")

    @property
    def _of_label(self) -> str:
        return f" of {self.label}" if self.label else ""

    def _count_failure(self, reason: str) -> None:
        """A batch of which nothing ran. Enough in a row mark the engine dead: every open stream
        then gets UNAVAILABLE (retry elsewhere), this batch's included."""
        self._consecutive_failures += 1
        state = getattr(self.engine, "state", None)
        if state is EngineState.DEAD or self._consecutive_failures >= self.config.dead_after_failures:
            self._mark_dead(f"{self._consecutive_failures} consecutive failed steps, last: {reason}")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        log.critical("engine marked dead", extra={"reason": reason, **({"core": self.label} if self.label else {})})
        for stream in list(self._streams.values()):
            self._fail(stream, ErrorKind.UNAVAILABLE, f"the engine{self._of_label} failed: {reason}")
        self.observer.engine_dead(reason)
