"""Several engine cores behind the face of one scheduler (`asr-server --gpus` / `--engine-cores`).

A core is one server.scheduling.scheduler.Scheduler around its own engine (normally an engine worker
process) on one device. EngineCores places each new stream on the live core with the most
free slots and keeps it there for life: the StreamHandle it returns is the core's own, and the
per-stream operations that take a StreamState (server.runtime.engine_host, which relays frontend
processes' streams) find the stream's core by its id. The servicers, AsrServer's drain and the
engine host see the same attributes and operations as on a single Scheduler.

A core that dies fails its own streams with UNAVAILABLE (its scheduler does that, naming the
core) and takes no new one; the others go on. The owner hears of an engine death (observer
`engine_dead`, `dead_reason`) only once every core is dead, so health stays SERVING and the
server keeps running while any core serves.

Pure Python, no gRPC, no torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engines.api import EndpointingParams, StepTimings
from server.ops.lifecycle import Lifecycle, LifecycleState
from server.scheduling.scheduler import Scheduler, SchedulerObserver, StreamHandle, StreamListener
from server.scheduling.stream_events import ErrorKind, StreamError, StreamEvent
from server.scheduling.stream_state import StreamState

log = logging.getLogger("nemostream.engine_cores")


@dataclass(eq=False)
class EngineCore:
    """One engine on one device, with its scheduler, and the core's lifecycle (server.ops.lifecycle):
    STARTING until its warm-up ran, SERVING, DRAINING once the server drains, STOPPED, or DEAD
    when its engine died (its reason: the scheduler's). EngineCores moves it, from the
    scheduler's side: the engine worker process says nothing of its own state."""

    index: int
    device: str
    scheduler: Scheduler
    lifecycle: LifecycleState = field(init=False)

    def __post_init__(self) -> None:
        self.lifecycle = LifecycleState(f"core-{self.index}")

    @property
    def name(self) -> str:
        return f"core {self.index} ({self.device})"

    @property
    def free_slots(self) -> int:
        return self.scheduler.capacity - self.scheduler.active_streams

    @property
    def state(self) -> str:
        """The lifecycle state's name (server.ops.lifecycle.Lifecycle)."""
        return self.lifecycle.name

    def status(self) -> dict:
        """This core's entry in /health and /ready (server.ops.ops_http)."""
        s = self.scheduler
        return {"core": self.index, "device": self.device, "state": self.state, "engine": s.engine_name,
                "pid": getattr(s.engine, "pid", None),  # its engine worker process (None: in this one)
                "slots_in_use": int(s.slots_in_use()), "slots_capacity": int(s.capacity),
                "active_streams": int(s.active_streams), "dead_reason": self.lifecycle.reason or s.dead_reason}


class _CoreObserver(SchedulerObserver):
    """A core's scheduler hooks: everything goes to the owner's observer, except an engine
    death, which the router decides about (the owner hears it only when every core is dead)."""

    def __init__(self, cores: EngineCores, core: EngineCore):
        self._cores, self._core = cores, core

    def step_done(self, batch_size, step_seconds, queue_waits, engine, executions, timings=None) -> None:
        self._cores.observer.step_done(batch_size, step_seconds, queue_waits, engine, executions, timings)
        if self._cores.on_core_step is not None:
            self._cores.on_core_step(self._core, batch_size, step_seconds, timings)

    def chunks_answered(self, latencies_seconds) -> None:
        self._cores.observer.chunks_answered(latencies_seconds)

    def utterance_final(self, closed_by, latency_seconds: float) -> None:
        self._cores.observer.utterance_final(closed_by, latency_seconds)

    def engine_dead(self, reason: str) -> None:
        self._cores.core_died(self._core, reason)

    def step_fault(self, kind: str) -> None:
        self._cores.observer.step_fault(kind)

    def max_batch_lowered(self, max_batch: int) -> None:
        self._cores.observer.max_batch_lowered(max_batch)


class EngineCores:
    """The Scheduler face over several cores (see the module doc). Every core serves the same
    model with the same geometry; `engine` is the first core's (model_info, geometry)."""

    def __init__(self, cores: list[EngineCore]):
        if not cores:
            raise ValueError("EngineCores needs at least one core")
        self.cores = cores
        first = cores[0].scheduler
        self.engine = first.engine
        self.config = first.config
        self.geometry = first.geometry
        self._observer: SchedulerObserver = SchedulerObserver()
        self._listener: StreamListener = StreamListener()
        # (core, batch_size, step_seconds, timings) after every step: the per-core metrics
        # (server.ops.metrics.ServerMetrics.bind sets it).
        self.on_core_step: Callable[[EngineCore, int, float, StepTimings | None], None] | None = None
        self.on_core_dead: Callable[[EngineCore], None] | None = None
        self._core_of: dict[str, EngineCore] = {}  # open stream id -> its core
        self.draining = False
        self.dead_reason: str | None = None
        for core in cores:
            core.scheduler.observer = _CoreObserver(self, core)
            if len(cores) > 1:  # one core: the messages stay those of a single engine
                core.scheduler.label = core.name

    # -- what the owner sets -----------------------------------------------------------------
    @property
    def observer(self) -> SchedulerObserver:
        return self._observer

    @observer.setter
    def observer(self, observer: SchedulerObserver) -> None:
        self._observer = observer

    @property
    def listener(self) -> StreamListener:
        return self._listener

    @listener.setter
    def listener(self, listener: StreamListener) -> None:
        self._listener = listener
        for core in self.cores:
            core.scheduler.listener = listener

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        for core in self.cores:
            await core.scheduler.start()

    async def warmup(self) -> str:
        """Warm every core up at once (each on its own engine); raises if any fails. Each core
        is SERVING once its own warm-up ran."""
        async def warm(core: EngineCore) -> str:
            name = await core.scheduler.warmup()
            if core.lifecycle.state is Lifecycle.STARTING:  # not dead (its worker exited) or stopped meanwhile
                core.lifecycle.serving()
            return name

        names = await asyncio.gather(*(warm(core) for core in self.cores))
        return names[0]

    async def stop(self, grace_s: float = 5.0) -> None:
        for core in self.cores:  # first: its engine worker exiting as told is no death
            core.lifecycle.stop()  # (a dead core stays DEAD)
        await asyncio.gather(*(core.scheduler.stop(grace_s) for core in self.cores))

    def begin_drain(self) -> None:
        self.draining = True
        for core in self.cores:
            core.scheduler.begin_drain()
            core.lifecycle.drain()

    async def wait_idle(self, timeout_s: float) -> bool:
        results = await asyncio.gather(*(core.scheduler.wait_idle(timeout_s) for core in self.cores))
        return all(results)

    def core_died(self, core: EngineCore, reason: str) -> None:
        """A core's scheduler marked its engine dead (and failed its streams). The owner hears
        of a death only when no core is left serving."""
        core.lifecycle.die(reason)
        alive = [c for c in self.cores if c.scheduler.dead_reason is None]
        log.critical("engine core dead", extra={"core": core.index, "device": core.device, "reason": reason,
                                                "cores_alive": len(alive)})
        if self.on_core_dead is not None:
            self.on_core_dead(core)
        if alive or self.dead_reason is not None:
            return
        self.dead_reason = reason if len(self.cores) == 1 else "every engine core failed: " + "; ".join(
            f"{c.name}: {c.scheduler.dead_reason}" for c in self.cores)
        self._observer.engine_dead(self.dead_reason)

    # -- the books, summed over the cores -----------------------------------------------------
    @property
    def engine_name(self) -> str | None:
        """What the warm-up really executed: the first core's (None until every core warmed up)."""
        names = [core.scheduler.engine_name for core in self.cores]
        return None if None in names else names[0]

    @property
    def executions(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for core in self.cores:
            for name, count in core.scheduler.executions.items():
                total[name] = total.get(name, 0) + count
        return total

    @property
    def active_streams(self) -> int:
        return sum(core.scheduler.active_streams for core in self.cores)

    @property
    def capacity(self) -> int:
        """Slots of the cores that serve (a dead core's slots are gone)."""
        return sum(core.scheduler.capacity for core in self._alive()) if self.dead_reason is None else 0

    def slots_in_use(self) -> int:
        return sum(core.scheduler.slots_in_use() for core in self.cores)

    @property
    def max_batch(self) -> int:
        return max(core.scheduler.max_batch for core in self.cores)

    @property
    def ready_streams(self) -> int:
        return sum(core.scheduler.ready_streams for core in self.cores)

    def core_status(self) -> list[dict]:
        return [core.status() for core in self.cores]

    # -- admission and placement ------------------------------------------------------------------
    def _alive(self) -> list[EngineCore]:
        return [core for core in self.cores if core.scheduler.dead_reason is None]

    def _place(self) -> EngineCore:
        """The live core with the most free slots (the lowest index among equals)."""
        alive = self._alive()
        if not alive:
            raise StreamError(ErrorKind.UNAVAILABLE, f"the engine failed and serves no more streams: {self.dead_reason}")
        return max(alive, key=lambda core: (core.free_slots, -core.index))

    def check_admission(self) -> None:
        """Raise StreamError when a new stream would be refused (the core it would go to says why)."""
        self._place().scheduler.check_admission()

    def open_stream(self, label: str = "", finalize_at_limit: bool = True, stream_id: str | None = None,
                    endpointing: EndpointingParams | None = None) -> StreamHandle:
        if stream_id is not None and stream_id in self._core_of:
            raise StreamError(ErrorKind.INTERNAL, f"stream id {stream_id} is already open")
        core = self._place()
        handle = core.scheduler.open_stream(label=label, finalize_at_limit=finalize_at_limit, stream_id=stream_id,
                                            endpointing=endpointing)
        self._core_of[handle.stream_id] = core
        # The stream's operations go straight to its core; closing it also forgets its core.
        return StreamHandle(_ClosingScheduler(core.scheduler, self._core_of), handle.state)

    # -- per-stream operations by StreamState (server.runtime.engine_host) -----------------------------------
    def scheduler_of(self, stream: StreamState) -> Scheduler:
        """The scheduler of the stream's core (the engine host calls its accept_audio directly:
        one lookup per stream, not per message)."""
        return self._core_of[stream.stream_id].scheduler


    def accept_audio(self, stream: StreamState, samples: np.ndarray) -> bool:
        return self.scheduler_of(stream).accept_audio(stream, samples)

    async def push_audio(self, stream: StreamState, samples: np.ndarray) -> bool:
        return await self.scheduler_of(stream).push_audio(stream, samples)

    def end_audio(self, stream: StreamState) -> None:
        self.scheduler_of(stream).end_audio(stream)

    def fail_stream(self, stream: StreamState, kind: ErrorKind, message: str) -> None:
        self.scheduler_of(stream).fail_stream(stream, kind, message)

    def end_utterance(self, stream: StreamState) -> bool:
        return self.scheduler_of(stream).end_utterance(stream)

    def take_event(self, stream: StreamState) -> StreamEvent | None:
        return self.scheduler_of(stream).take_event(stream)

    def acknowledge(self, stream: StreamState, n: int) -> None:
        self.scheduler_of(stream).acknowledge(stream, n)

    async def next_event(self, stream: StreamState) -> StreamEvent | None:
        return await self.scheduler_of(stream).next_event(stream)

    def close_stream(self, stream: StreamState) -> None:
        core = self._core_of.pop(stream.stream_id, None)
        if core is not None:
            core.scheduler.close_stream(stream)


class _ClosingScheduler:
    """A core's scheduler as a StreamHandle sees it: its six per-stream operations, closing a
    stream also dropping it from the router's stream -> core map."""

    def __init__(self, scheduler: Scheduler, core_of: dict[str, EngineCore]):
        self._scheduler, self._core_of = scheduler, core_of
        self.push_audio = scheduler.push_audio
        self.end_audio = scheduler.end_audio
        self.fail_stream = scheduler.fail_stream
        self.end_utterance = scheduler.end_utterance
        self.next_event = scheduler.next_event

    def close_stream(self, stream: StreamState) -> None:
        self._core_of.pop(stream.stream_id, None)
        self._scheduler.close_stream(stream)
