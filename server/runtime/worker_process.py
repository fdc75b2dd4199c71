"""The engine worker process (its parent side: server.runtime.engine_worker, whose docstring
tells the whole design).

`child_main` reads `Configure` (the engine factory, as `asr-server --engine-factory` names it,
the EngineConfig and the logging and GC options), builds the engine, sends the `Hello`
handshake, then answers requests in order until the link closes. A frame it cannot read closes
the link (logged), and the child exits. It ignores SIGINT and SIGTERM: the parent decides when
it stops (a Ctrl-C reaches the whole process group, and the parent's drain still needs it).

With two steps in flight it overlaps them (`ReadAhead`, `begin_step`, `finish_step`): while the
device runs step n it reads and prepares step n+1, queues n+1's device work from the stage the
engine names (`next_at`), then does n's host part while the device computes n+1.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Callable

from engines.api import DEVICE_DONE, QUEUED, EngineError, StepPlan
from engines.config import EngineConfig
from engines.sample_ring import SampleRing
from server.runtime import wire as w
from server.runtime.worker_link import (NOTHING, RING, ChildSlots, Link, SampleBuffer, state_of, step_reply,
                                        unpack_step)

log = logging.getLogger("nemostream.engine_worker")
PROCESS_NAME = "asr-engine"  # what ps shows for the child


def load_factory(spec: str) -> Callable[[EngineConfig], object]:
    """The engine factory `module:function` names (`asr-server --engine-factory`)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr or "build_engine")
    except (ImportError, AttributeError) as exc:
        raise EngineError(f"cannot load the engine factory {spec!r}: {exc}") from exc


def error_reply(request: int, exc: BaseException, engine=None) -> w.Error:
    return w.Error(request, type(exc).__name__, str(exc), tuple(getattr(exc, "stream_ids", ()) or ()),
                   getattr(exc, "batch_size", None), dict(engine.executions()) if engine is not None else None,
                   state_of(engine))


def child_main(sock: socket.socket) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # a name for ps and top, and for the load generator's CPU report (client.loadgen_report)
        with open("/proc/self/comm", "w") as f:
            f.write(PROCESS_NAME)
    except OSError:
        pass
    from server.runtime.gc_policy import apply_gc_policy
    from server.runtime.logging_setup import configure_logging

    link = Link(sock, w.TO_WORKER)
    try:
        start = link.read()
    except (OSError, w.WireError):
        return
    if not isinstance(start, w.Configure):
        return  # not our parent's first message: nothing to build
    configure_logging(start.log_level, start.log_format)
    try:
        engine = load_factory(start.factory)(start.config)
        report = getattr(engine, "startup_report", None)
        link.send(w.Hello(version=w.PROTOCOL_VERSION, role=w.ROLE_ENGINE_WORKER, model_info=engine.model_info,
                          geometry=engine.geometry, capacity=engine.capacity, max_batch=engine.max_batch,
                          startup_report=w.plain_report(report.as_dict() if hasattr(report, "as_dict") else None),
                          executions=dict(engine.executions())))
    except BaseException as exc:  # noqa: BLE001 - the parent reports why the engine cannot start
        with contextlib.suppress(OSError):
            link.send(w.Error(0, type(exc).__name__, f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)))
        return
    slots = ChildSlots(engine)
    buffers: dict[int, SampleBuffer] = {}
    ahead = ReadAhead(link, engine, slots, buffers)
    started: Started | None = None  # the next step, its device work already queued
    while True:
        if started is not None:
            message, early = started.message, None
        else:
            try:
                message, early = ahead.next()
            except OSError:  # the parent is gone
                return
            except w.WireError as exc:
                log.error("closing the engine worker's link: bad frame", extra={"error": str(exc)})
                return
        kind = type(message)
        if kind is w.Step:
            current, started = started, None
            try:
                if current is None:
                    current = begin_step(message, early, engine, ahead, slots, buffers)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the scheduler
                current = Started(message, time.monotonic(), time.monotonic(), None, error=exc)
            # a failure of this step is its reply; a next step begun meanwhile carries on
            reply, started = finish_step(current, engine, ahead, slots)
        elif kind is w.Claim or kind is w.Release:
            _apply_slot_message(message, slots)
            continue
        elif kind is w.Attach or kind is w.AttachRing:
            try:
                if kind is w.Attach:
                    buffers[message.index] = SampleBuffer(message.path, message.samples)
                else:
                    buffers[RING] = SampleRing.attach(message.path, message.slots, message.width)
                reply = w.Done(message.id, None, dict(engine.executions()), state_of(engine))
            except BaseException as exc:  # noqa: BLE001 - the parent then sends audio another way
                reply = error_reply(message.id, exc, engine)
        elif kind is w.Warmup:
            try:
                name = engine.warmup()
                apply_gc_policy(start.gc_freeze, start.gc_threshold)
                reply = w.Done(message.id, name, dict(engine.executions()), state_of(engine))
            except BaseException as exc:  # noqa: BLE001
                reply = error_reply(message.id, exc, engine)
        elif kind is w.Stop or message is None:
            return
        else:  # a second Configure: the decoder admits nothing else
            log.error("closing the engine worker's link: unexpected message", extra={"kind": kind.__name__})
            return
        try:
            link.send(reply)
        except OSError:
            return


@dataclasses.dataclass
class Started:
    """A step whose run has begun: its request, when it was read and began, and its StepRun
    (at QUEUED, or finished), or why it could not begin."""

    message: w.Step
    got: float
    began: float
    plan: StepPlan | None
    run: object = None           # a StepRun, or a plain engine's StepResult
    error: BaseException | None = None


def begin_step(message: w.Step, early: "Early | None", engine, ahead: "ReadAhead", slots: "ChildSlots",
           buffers: dict) -> Started:
    """Unpack (or take the prepared plan of) a step and queue its device work."""
    if early is None:
        got = time.monotonic()
        plan = unpack_step(message, buffers, slots)
        work = plan
    else:  # read and prepared while the previous step ran on the device
        got, plan, work = early.unwrap()
    began = time.monotonic()
    if not ahead.stages:  # an engine without stages (a test's fake): its whole step, here
        return Started(message, got, began, plan, engine.step(work))
    run = engine.start_step(work)
    run.advance()
    return Started(message, got, began, plan, run)


def finish_step(current: Started, engine, ahead: "ReadAhead", slots: "ChildSlots"):
    """Run a begun step to its end: while its device work runs, read ahead (the next step is
    prepared); once the device has finished it, queue the next step's device work; then this
    step's host part, and its reply. Returns (the reply, the next step begun or None)."""
    nxt = None
    try:
        if current.error is not None:
            raise current.error
        run = current.run
        if ahead.stages:
            # From which stage the next step's device work may be queued behind this one's:
            # QUEUED where the engine decodes on a stream of its own (the next encoder runs
            # beside this decode), else DEVICE_DONE.
            early_next = getattr(engine, "next_at", DEVICE_DONE) == QUEUED
            # A step that synchronizes the device at each phase (one in profile_every, for the
            # per-phase times) begins no next step before it has finished: its later phases would
            # otherwise wait for the next step's features, gather and encoder too (queued on the
            # same stream before its own last work), and report them as its own.
            overlap = not getattr(run, "synced", False)
            if run.stage == QUEUED:
                ahead.during_step(run)
                if early_next and overlap:
                    nxt = ahead.start_next()
                run.advance()
            if run.stage == DEVICE_DONE and nxt is None and overlap:
                if early_next:  # a step that came during the decode goes on the device before the results
                    ahead.during_step(run, wait=False)
                nxt = ahead.start_next()
            while run.advance():
                pass
            result = run.result
        else:
            result = run
        reply = step_reply(current.message.id, current.plan, result, slots, (current.got, current.began, time.monotonic()),
                       engine)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the scheduler, in its turn
        reply = error_reply(current.message.id, exc, engine)
    return reply, nxt


def _apply_slot_message(message, slots: "ChildSlots") -> None:
    try:
        if type(message) is w.Claim:
            slots.claim(message.slot)
        else:
            slots.release(message.slot)
    except BaseException:  # noqa: BLE001 - a failed claim: the slot's steps will be refused as unknown
        log.exception("applying a slot message in the engine worker failed",
                      extra={"slot": message.slot, "kind": type(message).__name__})


@dataclasses.dataclass
class Early:
    """A step read ahead: when it was read, and its plan prepared, or why it could not be."""

    got: float
    plan: StepPlan | None = None
    prepared: object = None
    error: BaseException | None = None

    def unwrap(self):
        if self.error is not None:
            raise self.error
        return self.got, self.plan, self.prepared


class ReadAhead:
    """The child's reads, with one step of look-ahead: while the device runs a step
    (`finish_step` calls `during_step` once the step's StepRun is QUEUED: features, gather and
    encoder queued, before it first waits for the device), the messages that have already arrived are taken
    without waiting; claims and releases apply at once (they touch no slot of a step in flight:
    the scheduler releases a slot only when no step holds it), and the first step among them is
    unpacked and prepared (StreamingEngine.prepare: its rows checked and its windows assembled,
    host work that no longer waits for the step before it). Its streams are not in the running
    step (a stream is in one submitted step at a time), so the order of their work is kept.
    Replies keep the order of the requests."""

    def __init__(self, link: Link, engine, slots: "ChildSlots", buffers: dict):
        self.link, self.engine, self.slots, self.buffers = link, engine, slots, buffers
        self.stages = callable(getattr(engine, "start_step", None))
        self.prepares = self.stages and callable(getattr(engine, "prepare", None))
        self._backlog: collections.deque = collections.deque()  # (message, Early | None)
        self._broken: BaseException | None = None

    def next(self):
        if self._backlog:
            return self._backlog.popleft()
        if self._broken is not None:
            raise self._broken
        return self.link.read(), None

    def start_next(self) -> "Started | None":
        """The next step begun (its device work queued behind the current one's), when it was
        read and prepared ahead; None otherwise. A failure to begin is kept for its turn."""
        if not self._backlog or type(self._backlog[0][0]) is not w.Step or self._backlog[0][1] is None:
            return None
        message, early = self._backlog.popleft()
        began = time.monotonic()
        if early.error is not None:
            return Started(message, early.got, began, early.plan, error=early.error)
        try:
            run = self.engine.start_step(early.prepared)
            run.advance()
        except BaseException as exc:  # noqa: BLE001 - replied in its turn
            return Started(message, early.got, began, early.plan, error=exc)
        return Started(message, early.got, began, early.plan, run)

    def during_step(self, run, wait: bool = True) -> None:
        """While `run` (at QUEUED) keeps the device busy, take the messages that arrive, until a
        step is among them: the parent sends the next step before this one ends (the
        scheduler's `overlap_at`), and it is prepared here, on the host, while the device works.
        wait=False takes only what has already arrived."""
        if not self.prepares or self._backlog or self._broken is not None:
            return
        busy = getattr(run, "device_busy", None) if wait else None
        while True:
            try:
                message = self.link.poll()
            except (OSError, w.WireError) as exc:  # met again by the main loop, in order
                self._broken = exc
                return
            if message is NOTHING:
                if busy is None or not busy():
                    return
                self.link.wait_readable(DURING_STEP_POLL_S)
                continue
            if type(message) is w.Claim or type(message) is w.Release:
                _apply_slot_message(message, self.slots)
                continue
            early = None
            if type(message) is w.Step:
                early = Early(time.monotonic())
                try:
                    early.plan = unpack_step(message, self.buffers, self.slots)
                    early.prepared = self.engine.prepare(early.plan)
                except BaseException as exc:  # noqa: BLE001 - replied in its turn
                    early.error = exc
            self._backlog.append((message, early))
            return


# How long the child waits for the next step's message at a time while the device is busy: the
# device's state is asked again after each wait.
DURING_STEP_POLL_S = 0.0005
