"""The engine process's side of a server with frontend processes (`asr-server --frontends N`).

It owns what one process must own: the engine, the scheduler (unchanged), the metrics
endpoint. Frontend processes (server.runtime.remote_scheduler) run the gRPC transport and connect
over one Unix socket each; this module relays their streams into the scheduler and the
scheduler's events back. Its event loop carries IPC frames and scheduling, not gRPC, which
is what bounded one process at about 3,000 chunks/s (docs/SCALING.md).

The frontends keep their streams' text: a step's answered chunks go to each frontend as one
Rows message of columns (the scheduler's ChunkRows, this listener being one that `wants_rows`),
and the frontend makes the events (server.scheduling.utterances.chunk_event). This process
makes no object per answered chunk; failures and the scheduler's cuts go as messages of their own.

The frontends write their streams' audio too: the Hello names each engine core's sample ring
(engines.sample_ring, shared memory), a stream opened with `ring` is answered with its row
(Opened), and the frontend writes the audio there and says how far once a frame for all its
streams written (Written), which the scheduler books as arrays (Scheduler.audio_written). The
row stays the stream's, its slot out of the pool, until the frontend says it writes no more
(End, Fail, Close, Stopped, or its link ends): a late write never lands in another stream's row.
A frontend that cannot map the rings sends its audio in Audio messages instead.

Per stream it keeps the scheduler's own rules:
  - audio goes in with Scheduler.audio_written or accept_audio (no wait here); the frontend
    applies the backpressure, from the consumed-sample count each row carries, and writes no
    further ahead of it than the ring's width;
  - a stream with `response_buffer` rows in a frontend's hands unacknowledged is not scheduled
    (Scheduler.acknowledge), as for a client that does not read;
  - a frontend whose connection ends has its streams closed: their slots come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge

from engines.api import EndpointingParams, StreamingEngine
from server.runtime import wire as w
from server.runtime.wire import FrameReader, FrameWriter
from server.runtime.gc_policy import apply_gc_policy
from server.ops.lifecycle import Lifecycle, LifecycleState
from server.ops.metrics import MetricsObserver, ServerMetrics
from server.transport.call_limits import shown
from server.ops.ops_http import scheduler_status
from server.scheduling.loop_calls import OncePerIteration
from server.scheduling.scheduler import Scheduler, SchedulerConfig, StreamListener
from server.scheduling.stream_events import ChunkRows, ErrorKind, StreamError, StreamEvent, StreamFailure, UtteranceEnd
from server.scheduling.stream_state import StreamState

log = logging.getLogger("nemostream.engine_host")

STATE_PERIOD_S = 0.2  # how often frontends hear the engine's state (ListModels, health, metrics)


@dataclass(frozen=True)
class EngineFacts:
    """What a frontend needs to know of the engine: sent once, as the wire's Hello handshake
    (`hello`, `from_hello`). Has the attributes AsrServer reads of an engine (model_info,
    geometry, capacity, max_batch)."""

    model_info: object   # engines.api.ModelInfo
    geometry: object     # engines.geometry.ChunkGeometry
    capacity: int
    max_batch: int
    engine_name: str
    scheduler: SchedulerConfig
    rings: list = field(default_factory=list)  # wire.RingInfo per engine core (none: audio in messages)

    def hello(self) -> w.Hello:
        return w.Hello(version=w.PROTOCOL_VERSION, role=w.ROLE_ENGINE_HOST, model_info=self.model_info,
                       geometry=self.geometry, capacity=self.capacity, max_batch=self.max_batch,
                       engine_name=self.engine_name, scheduler=dataclasses.asdict(self.scheduler),
                       rings=list(self.rings))

    @classmethod
    def from_hello(cls, message: object) -> EngineFacts:
        hello = w.check_hello(message, w.ROLE_ENGINE_HOST)
        try:
            scheduler = SchedulerConfig(**hello.scheduler)
        except (TypeError, ValueError) as exc:
            raise w.WireError(f"the engine host's scheduler settings are not this version's: {exc}") from None
        return cls(model_info=hello.model_info, geometry=hello.geometry, capacity=hello.capacity,
                   max_batch=hello.max_batch, engine_name=hello.engine_name, scheduler=scheduler,
                   rings=list(hello.rings))


@dataclass(eq=False)
class _Relay:
    """One frontend stream inside the scheduler."""

    key: str
    state: StreamState
    frontend: _Frontend
    core: Scheduler | None = None  # its engine core's scheduler
    ring_core: int = -1  # the core whose sample ring the frontend writes the stream's audio into (-1: none)
    client: str | None = None  # counted against --max-streams-per-client


@dataclass(eq=False)
class _Frontend:
    name: str
    out: FrameWriter
    index: int  # marks the ring rows it writes (EngineHost._writers)
    relays: dict[str, _Relay] = field(default_factory=dict)
    ready: bool = False


class EngineHost(StreamListener):
    wants_rows = True  # the frontends make the chunk events (StreamListener)

    def __init__(self, engine: StreamingEngine, config: SchedulerConfig, socket_path: str,
                 gc_freeze: bool = False, gc_threshold: tuple[int, int, int] | None = None,
                 max_streams_per_client: int = 0, scheduler=None):
        # `scheduler`: several engine cores (server.runtime.engine_cores.EngineCores, whose `engine` is
        # the first core's); by default a Scheduler on `engine`.
        self.engine = engine
        # Streams per client over every frontend (a client's connections may land on any of
        # them); each frontend's interceptor still counts its own, which can only be fewer.
        self.max_streams_per_client = max_streams_per_client
        self._client_streams: dict[str, int] = {}
        self.config = config
        self.socket_path = socket_path
        self.gc_freeze = gc_freeze
        self.gc_threshold = gc_threshold
        self.metrics = ServerMetrics(max_batch=engine.max_batch)
        self.metrics.process_name = "engine"
        # The server's lifecycle, as the engine process sees it: SERVING once the engine warmed
        # up and the frontends first reported ready (server.service.frontends says so: `serving()`).
        self.lifecycle = LifecycleState("server")
        self.metrics.watch_lifecycle(self.lifecycle)
        # Each frontend process's entry in /health ({"name", "pid", "state", ...}), from its
        # supervisor (server.service.frontends); None: no frontend is listed.
        self.frontend_status = None
        self.on_frontend_ready = None  # called with a frontend's name when it reports ready
        self.scheduler = scheduler or Scheduler(engine, config)
        # The engine cores' schedulers, and the frontend writing each row of each core's sample
        # ring (-1: none), checked against every Written message.
        self._cores: list[Scheduler] = [c.scheduler for c in getattr(self.scheduler, "cores", ())] or [self.scheduler]
        self._core_index = {id(core): i for i, core in enumerate(self._cores)}
        self._writers = [np.full(core.sample_ring.slots, -1, dtype=np.int32) for core in self._cores]
        # What the Hello offers the frontends: every core's ring, when all are shared (else none:
        # audio in messages).
        rings = [core.sample_ring for core in self._cores]
        self._ring_infos = [w.RingInfo(r.path, r.slots, r.width) for r in rings] if all(r.path for r in rings) else []
        self._frontend_count = 0
        self.scheduler.observer = MetricsObserver(self.metrics, self._on_engine_dead, on_step=self.state_changed)
        self.scheduler.listener = self
        self.metrics.bind(self.scheduler)
        r = self.metrics.registry
        self.frontends_ready = Gauge("asr_frontends_ready", "Frontend processes connected and serving", registry=r)
        self.frontends_ready.set_function(lambda: self.ready_frontends)
        self.frontend_streams = Counter("asr_frontend_streams", "Streams opened, by frontend process (how evenly "
                                        "the kernel spreads connections)", ["frontend"], registry=r)
        self.frontend_restarts = Counter("asr_frontend_restarts", "Frontend processes started again after they died",
                                         registry=r)
        self.metrics_port: int | None = None
        self.engine_dead = asyncio.Event()
        self._relays: dict[str, _Relay] = {}
        self._frontends: list[_Frontend] = []
        self._dirty: dict[str, _Relay] = {}
        # Once per loop iteration: a step's failures for many streams go out in one frame, and
        # the state after a step once, ahead of the step's results.
        self._forward_soon = OncePerIteration(self._forward_dirty)
        self._state_soon = OncePerIteration(self._send_state)
        self._server: asyncio.AbstractServer | None = None
        self._state_task: asyncio.Task | None = None
        self._ready_changed = asyncio.Event()
        self._conn_tasks: set[asyncio.Task] = set()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, metrics_host: str | None = None, metrics_port: int | None = None) -> str:
        """Warm the engine up (proved by its execution counter), then listen for frontends."""
        await self.scheduler.start()
        name = await self.scheduler.warmup()
        apply_gc_policy(self.gc_freeze, self.gc_threshold)
        self.metrics.engine_up.set(1)
        if metrics_port is not None:
            self.metrics_port = self.metrics.serve(metrics_host or "127.0.0.1", metrics_port, self.http_status)
        self._server = await w.serve_links(self.socket_path, w.FRONTEND_TO_ENGINE, self._serve_connection)
        self._state_task = asyncio.get_running_loop().create_task(self._broadcast_state(), name="engine-state")
        return name

    def http_status(self) -> dict:
        """/health and /ready on the metrics port (server.ops.ops_http), with the frontends ready."""
        status = scheduler_status(self.scheduler, self.engine.model_info.name, self.lifecycle)
        status["frontends_ready"] = self.ready_frontends
        # Nothing listens for gRPC while every frontend is (re)starting: not ready, though SERVING.
        status["ready"] = status["ready"] and self.ready_frontends > 0
        if self.frontend_status is not None:
            status["frontends"] = self.frontend_status()
        return status

    def serving(self) -> None:
        """The engine is warm and the frontends reported ready: the server is SERVING (unless it
        died or began to drain meanwhile)."""
        if self.lifecycle.state is Lifecycle.STARTING:
            self.lifecycle.serving()

    def notice_drain(self) -> None:
        """SIGTERM with --drain-notice-s: DRAINING (/ready 503) while new streams are still taken."""
        self.lifecycle.drain()

    def frontend_ready(self, name: str) -> bool:
        """Whether the frontend process of this name is connected and reported ready."""
        return any(f.ready and f.name == name for f in self._frontends)

    def facts(self) -> EngineFacts:
        return EngineFacts(model_info=self.engine.model_info, geometry=self.engine.geometry,
                           capacity=self.scheduler.capacity, max_batch=self.engine.max_batch,
                           engine_name=self.scheduler.engine_name or "", scheduler=self.config,
                           rings=self._ring_infos)

    @property
    def ready_frontends(self) -> int:
        return sum(f.ready for f in self._frontends)

    async def wait_ready(self, count: int) -> None:
        while self.ready_frontends < count:
            self._ready_changed.clear()
            await self._ready_changed.wait()

    def begin_drain(self) -> None:
        self.lifecycle.drain()
        self.scheduler.begin_drain()
        self._send_state()

    async def stop(self) -> None:
        self.lifecycle.stop()  # a dead server stays DEAD
        if self._state_task is not None:
            self._state_task.cancel()
        if self._server is not None:
            self._server.close()
        for frontend in list(self._frontends):
            frontend.out.close()
        for task in list(self._conn_tasks):
            task.cancel()
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        await self.scheduler.stop()
        self.metrics.close()

    # -- connections ---------------------------------------------------------------------
    async def _serve_connection(self, frames: FrameReader) -> None:
        task = asyncio.current_task()
        self._conn_tasks.add(task)
        self._frontend_count += 1
        frontend = _Frontend(name="?", out=FrameWriter(frames.transport), index=self._frontend_count)
        self._frontends.append(frontend)
        frontend.out.send(self.facts().hello())
        self._send_state_to(frontend)
        try:
            while (batch := await frames.read_frames()) is not None:
                for frame in batch:
                    for message in frame:
                        self._dispatch(frontend, message)
        except w.WireError as exc:
            # A frame this side cannot read: the link is closed (its streams with it), the
            # frontend told why; the other frontends' streams go on.
            log.error("closing a frontend's link: bad frame", extra={"frontend": frontend.name, "error": str(exc),
                                                                     "open_streams": len(frontend.relays)})
            frontend.out.send(w.Error(id=0, name="WireError", message=str(exc)))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # A frontend that exits (drained, or stopping) may reset rather than close: only a
            # connection lost with streams open is an error.
            level = logging.ERROR if frontend.relays else logging.INFO
            log.log(level, "frontend connection lost", extra={"frontend": frontend.name, "error": str(exc),
                                                              "open_streams": len(frontend.relays)})
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - a bad frame loses that frontend, not the engine
            log.exception("frontend frame failed", extra={"frontend": frontend.name})
        finally:
            self._drop_frontend(frontend)
            with contextlib.suppress(Exception):
                frontend.out.close()
            self._conn_tasks.discard(task)

    def _drop_frontend(self, frontend: _Frontend) -> None:
        """The frontend is gone (exited, killed, or its connection broke): close its streams so
        their slots come back; no other frontend's stream notices."""
        if frontend in self._frontends:
            self._frontends.remove(frontend)
        if frontend.relays:
            log.warning("frontend gone; closing its streams",
                        extra={"frontend": frontend.name, "streams": len(frontend.relays)})
        for relay in list(frontend.relays.values()):
            self._close(relay)
        frontend.ready = False
        self._ready_changed.set()

    def _dispatch(self, frontend: _Frontend, m: w.Message) -> None:
        kind = type(m)
        if kind is w.Audio:
            relay = frontend.relays.get(m.key)
            if relay is not None:  # else refused or closed: its audio goes nowhere
                relay.core.accept_audio(relay.state, np.frombuffer(m.samples, dtype=np.float32))
        elif kind is w.Ack:
            relay = frontend.relays.get(m.key)
            if relay is not None:
                self.scheduler.acknowledge(relay.state, m.n)
        elif kind is w.Written:
            self._written(frontend, m)
        elif kind is w.Open:
            self._open(frontend, m.key, m.label, m.finalize_at_limit, m.endpointing, m.client, m.ring)
        elif kind is w.EndUtterance:
            relay = frontend.relays.get(m.key)
            if relay is not None:
                self.scheduler.end_utterance(relay.state)
        elif kind is w.End:
            relay = frontend.relays.get(m.key)
            if relay is not None:
                self._detach_writer(relay)
                self.scheduler.end_audio(relay.state)
        elif kind is w.Stopped:
            relay = frontend.relays.get(m.key)
            if relay is not None:
                self._detach_writer(relay)
        elif kind is w.Close:
            relay = frontend.relays.get(m.key)
            if relay is not None:
                self._close(relay)
        elif kind is w.Fail:
            relay = frontend.relays.get(m.key)
            if relay is not None:
                self._detach_writer(relay)
                self.scheduler.fail_stream(relay.state, ErrorKind(m.kind), m.message)
        elif kind is w.UtteranceFinal:
            self.scheduler.observer.utterance_final(UtteranceEnd(m.closed_by), m.seconds)
        elif kind is w.Rpc:
            self.metrics.rpc_finished(m.method, m.code)
        elif kind is w.AudioSeconds:
            self.metrics.audio_seconds.inc(m.seconds)
        elif kind is w.Refused:
            self.metrics.call_refused(m.reason)
        elif kind is w.Gc:
            self.metrics.gc_paused(m.generation, m.seconds, process=frontend.name)
        elif kind is w.ChunksWritten:
            try:
                self.metrics.chunk_written.add_counts(np.frombuffer(m.counts, dtype=np.int64), m.seconds)
            except ValueError as e:
                raise w.WireError(str(e)) from None
        elif kind is w.Sync:
            frontend.out.send(w.Synced(m.id))
        elif kind is w.Ready:
            frontend.name, frontend.ready = m.name, True
            self._ready_changed.set()
            if self.on_frontend_ready is not None:
                self.on_frontend_ready(frontend.name)
            log.info("frontend ready", extra={"frontend": frontend.name})
        elif kind is w.Error:
            raise w.WireError(f"the frontend reported an error: {m.name}: {m.message}")
        else:  # the decoder admits only this direction's messages
            raise w.WireError(f"unexpected message {kind.__name__} from a frontend")

    def _written(self, frontend: _Frontend, m: w.Written) -> None:
        """A frontend wrote its streams' audio into a core's sample ring: the scheduler books it
        for all of them at once. Rows the frontend does not write (never given, or detached) are
        a broken frontend: its link is closed."""
        if not 0 <= m.core < len(self._cores):
            raise w.WireError(f"Written names engine core {m.core} of {len(self._cores)}")
        n = len(m.slots) // w.I64.itemsize
        slots = w.column(m.slots, w.I64, n, "slots")
        totals = w.column(m.totals, w.I64, n, "totals")
        writers = self._writers[m.core]
        if ((slots < 0) | (slots >= writers.size)).any() or (writers[slots] != frontend.index).any():
            raise w.WireError(f"Written names ring rows of core {m.core} that this frontend does not write")
        self._cores[m.core].audio_written(slots, totals)

    def _detach_writer(self, relay: _Relay) -> None:
        """The frontend writes no more of the stream's audio."""
        if relay.ring_core < 0:
            return
        slot = relay.state.slot
        writers = self._writers[relay.ring_core]
        if writers[slot] == relay.frontend.index:
            writers[slot] = -1
        relay.ring_core = -1
        relay.core.writer_detached(relay.state)

    def _open(self, frontend: _Frontend, key: str, label: str, finalize_at_limit: bool,
              endpointing: EndpointingParams | None, client: str | None = None, ring: bool = False) -> None:
        if key in self._relays:
            frontend.out.send(w.Failed(key, 0, ErrorKind.INTERNAL.value, f"stream id {key} is already open"))
            return
        limit = self.max_streams_per_client
        if client is not None and limit and self._client_streams.get(client, 0) >= limit:
            self.metrics.call_refused("client_stream_limit")
            log.warning("refused: streams per client (over every frontend)", extra={"client": client, "limit": limit})
            frontend.out.send(w.Failed(key, 0, ErrorKind.RESOURCE_EXHAUSTED.value,
                                       f"client {shown(client)} already has {limit} streams open (the limit per "
                                       "client, --max-streams-per-client, over every frontend); retry when one has "
                                       "finished"))
            return
        try:
            handle = self.scheduler.open_stream(label=label, finalize_at_limit=finalize_at_limit, stream_id=key,
                                                endpointing=endpointing)
        except StreamError as exc:  # admission: the engine process owns the slots
            frontend.out.send(w.Failed(key, 0, exc.kind.value, exc.message))
            return
        self.frontend_streams.labels(frontend=frontend.name).inc()
        core_of = getattr(self.scheduler, "scheduler_of", None)  # several engine cores
        core = core_of(handle.state) if core_of else self.scheduler
        relay = _Relay(key, handle.state, frontend, core)
        if client is not None and limit:
            relay.client = client
            self._client_streams[client] = self._client_streams.get(client, 0) + 1
        frontend.relays[key] = relay
        self._relays[key] = relay
        if ring and self._ring_infos:
            # The frontend writes the stream's audio into its core's ring: the slot stays the
            # stream's until the frontend says it writes no more (Scheduler.writer_detached).
            index = self._core_index[id(core)]
            relay.ring_core = index
            handle.state.writer_attached = True
            self._writers[index][handle.state.slot] = frontend.index
            frontend.out.send(w.Opened(key, index, handle.state.slot))

    def _close(self, relay: _Relay) -> None:
        self._detach_writer(relay)
        if relay.client is not None:
            left = self._client_streams.get(relay.client, 0) - 1
            if left > 0:
                self._client_streams[relay.client] = left
            else:
                self._client_streams.pop(relay.client, None)
            relay.client = None
        self.scheduler.close_stream(relay.state)
        relay.frontend.relays.pop(relay.key, None)
        self._relays.pop(relay.key, None)
        self._dirty.pop(relay.key, None)

    # -- StreamListener: the scheduler's events go out ------------------------------------
    def events_added(self, stream: StreamState) -> None:
        relay = self._relays.get(stream.stream_id)
        if relay is not None:
            self._mark_dirty(relay)

    def audio_cut(self, stream: StreamState) -> None:
        relay = self._relays.get(stream.stream_id)
        if relay is not None:
            relay.frontend.out.send(w.Cut(relay.key, stream.end_reason or ""))

    def _mark_dirty(self, relay: _Relay) -> None:
        self._dirty[relay.key] = relay
        self._forward_soon.request()

    def _forward_dirty(self) -> None:
        # The events a scheduler with this listener keeps are failures: one per stream, its last.
        dirty, self._dirty = self._dirty, {}
        take = self.scheduler.take_event
        for relay in dirty.values():
            state, send = relay.state, relay.frontend.out.send
            while (event := take(state)) is not None:
                send(event_message(relay.key, relay.core.consumed_samples(state), event))

    def chunk_rows(self, rows: ChunkRows) -> None:
        """A step's answered chunks: one Rows message to each frontend with streams among them."""
        if not rows.streams:
            return
        relays = self._relays
        owners = [relays.get(stream.stream_id) for stream in rows.streams]
        only = owners[0].frontend if owners[0] is not None else None
        if only is not None and all(o is not None and o.frontend is only for o in owners):
            only.out.send(rows_message(rows))
            return
        shares: dict[int, tuple[_Frontend, list[int]]] = {}
        for i, owner in enumerate(owners):
            if owner is not None:  # (a stream whose relay closed is no longer live: none is expected)
                shares.setdefault(id(owner.frontend), (owner.frontend, []))[1].append(i)
        for frontend, positions in shares.values():
            frontend.out.send(rows_message(rows.take(positions)))

    # -- state ---------------------------------------------------------------------------
    def _state_message(self) -> w.State:
        s = self.scheduler
        return w.State(s.engine_name or "", dict(s.executions), s.max_batch, s.slots_in_use(), s.active_streams,
                       s.dead_reason, s.draining)

    def _send_state_to(self, frontend: _Frontend) -> None:
        frontend.out.send(self._state_message())

    def _on_engine_dead(self, reason: str) -> None:
        self.lifecycle.die(reason)
        self._send_state()  # the frontends hear it at once, not at the next period
        self.engine_dead.set()

    def state_changed(self) -> None:
        """After a step: the executions moved. Once per loop iteration, ahead of the step's
        results, so a client that got its final sees what ran in ListModels."""
        self._state_soon.request()

    def _send_state(self) -> None:
        message = self._state_message()
        for frontend in self._frontends:
            frontend.out.send(message)

    async def _broadcast_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_PERIOD_S)
            self._send_state()


def event_message(key: str, consumed: int, event: StreamEvent) -> w.Failed:
    """A scheduler event as the wire's message. The scheduler of a listener that makes the chunk
    events (`wants_rows`) keeps failures only; a chunk's event here is a bug, said so loudly."""
    if not isinstance(event, StreamFailure):
        raise TypeError(f"a chunk event reached the engine host's relay: {type(event).__name__}")
    return w.Failed(key, consumed, event.kind.value, event.message)


def rows_message(rows: ChunkRows) -> w.Rows:
    """ChunkRows as the wire's message (the streams by their keys: the frontends' stream ids)."""
    return w.Rows([stream.stream_id for stream in rows.streams], rows.columns)
