"""Prometheus metrics of the service, on their own registry (several servers may share a
process in tests), served over HTTP on the metrics port."""

from __future__ import annotations

import gc
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.ops.bulk_histogram import BulkHistogram
from server.ops.lifecycle import Lifecycle, LifecycleState

from server.ops.ops_http import OpsHttpServer
from server.scheduling.scheduler import Scheduler, SchedulerObserver

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PHASE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25)
# The way to an engine worker process and back (StepTimings, server.runtime.engine_worker).
WORKER_PARTS = ("to_worker", "worker_before", "worker_after", "from_worker", "unpack")


class _ExecutionsCollector:
    """Engine executions by engine name, from the snapshot the engine thread took after the
    last step: what really ran, not what was configured."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def collect(self):
        family = CounterMetricFamily("asr_engine_executions", "Encoder executions by engine name", labels=["engine"])
        for name, count in sorted(self._scheduler.executions.items()):
            family.add_metric([name], count)
        yield family


class _LifecycleCollector:
    """asr_lifecycle_state{role,state}: 1 for each role's current state, 0 for the others (a
    series per state, so a dashboard can sum or alert on DEAD or DRAINING). The roles are read
    at every scrape: `roles()` gives the LifecycleState of each (a frontend started again is a
    new instance under the same role name)."""

    def __init__(self, roles):
        self._roles = roles

    def collect(self):
        family = GaugeMetricFamily("asr_lifecycle_state", "Each process role's lifecycle state (server, core-N, "
                                   "frontend-N): 1 for the state it is in, 0 for the others", labels=["role", "state"])
        for lifecycle in self._roles():
            for state in Lifecycle:
                family.add_metric([lifecycle.role, state.name], 1.0 if lifecycle.state is state else 0.0)
        yield family


class _GcPauseTimer:
    """Times Python's garbage collections (gc.callbacks): a full collection over the objects of
    thousands of live streams stops every thread of the server, event loop included, and shows
    up as a tail-latency stall that no other metric explains.

    A collection starts at any allocation, in any thread, also inside prometheus_client while it
    holds a metric's lock: the callback therefore takes no lock and calls nothing, it appends
    to a list (atomic under the interpreter lock) that ServerMetrics.flush_gc empties later.
    Observing from here deadlocked a server (`labels()` re-entered under its own lock)."""

    def __init__(self, pending: list):
        self._pending = pending  # (generation: str, seconds: float)
        self._started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._pending.append((str(info.get("generation", "?")), time.perf_counter() - self._started))
            self._started = None


class _GcCollector:
    """The GC histogram, with the pauses recorded since the last scrape moved in first."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def collect(self):
        self._metrics.flush_gc()
        return self._metrics.gc_pause.collect()


class ServerMetrics(SchedulerObserver):
    def __init__(self, max_batch: int = 32):
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_streams = Gauge("asr_active_streams", "Streams open now", registry=r)
        self.slots_in_use = Gauge("asr_slots_in_use", "Engine cache slots held now", registry=r)
        self.slots_capacity = Gauge("asr_slots_capacity", "Engine cache slots in all (--max-streams): open streams "
                                    "over this is the slot utilisation an autoscaler follows", registry=r)
        self.engine_up = Gauge("asr_engine_up", "1 while the engine serves, 0 before warm-up or when dead", registry=r)
        batch_buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < max_batch} | {max_batch})
        self._batch_buckets = batch_buckets
        self.batch_size = Histogram("asr_batch_size", "Chunks per engine step", buckets=batch_buckets, registry=r)
        # Observed per chunk, a step's at once (server.ops.bulk_histogram says why).
        self.queue_wait = BulkHistogram("asr_queue_wait_seconds", "Ready chunk to step start", _LATENCY_BUCKETS)
        r.register(self.queue_wait)
        self.step_time = Histogram("asr_step_seconds", "Engine step wall time, as the scheduler waits for it",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.engine_step_time = Histogram(
            "asr_engine_step_seconds", "Engine step time inside the engine (asr_step_seconds less the way to an "
            "engine worker process and back)", buckets=_PHASE_BUCKETS, registry=r)
        self.worker_time = Histogram(
            "asr_engine_worker_seconds", "The way of a step to the engine worker process and back, by part: "
            "to_worker (includes waiting behind the step before it: two are in flight), worker_before (the "
            "worker before the engine's step), worker_after, from_worker, unpack",
            ["part"], buckets=_PHASE_BUCKETS, registry=r)
        self.engine_phase_time = Histogram(
            "asr_engine_phase_seconds", "Engine step phases, from the steps that synchronized the device at each "
            "phase boundary (every --profile-every steps)", ["phase"], buckets=_PHASE_BUCKETS, registry=r)
        self.chunk_latency = BulkHistogram("asr_chunk_latency_seconds", "Arrival of a chunk's last audio to its result",
                                           _LATENCY_BUCKETS)
        r.register(self.chunk_latency)
        # Per response written, one list append (BulkHistogram.observe); with --frontends each
        # frontend forwards its counts (RemoteMetrics) to the engine process's endpoint.
        self.chunk_written = BulkHistogram(
            "asr_chunk_written_seconds", "Arrival of a chunk's last audio to its response written to the gRPC call "
            "(asr_chunk_latency_seconds, plus the way to the frontend process that holds the call, its work and "
            "gRPC's write; a write waits while the client's flow-control window is full)", _LATENCY_BUCKETS)
        r.register(self.chunk_written)
        self.utterance_final_time = Histogram(
            "asr_utterance_final_seconds", "An utterance's final, from the audio that made it due (endpoint, "
            "end_of_audio: the chunk's last audio; client: the client's request) to the final's result",
            ["closed_by"], buckets=_LATENCY_BUCKETS, registry=r)
        self.steps = Counter("asr_steps", "Engine steps by the engine name the step reported", ["engine"], registry=r)
        self.steps_prepared_ahead = Counter(
            "asr_engine_steps_prepared_ahead", "Engine steps whose host preparation (validation, waveform "
            "windows) ran while the step before them was on the device (the engine worker's read-ahead)",
            registry=r)
        self.errors = Counter("asr_errors", "RPCs that ended with an error, by status code", ["method", "code"], registry=r)
        self.rpcs = Counter("asr_rpcs", "RPCs finished, by status code", ["method", "code"], registry=r)
        self.audio_seconds = Counter("asr_audio_seconds", "Seconds of audio received", registry=r)
        self.step_faults = Counter("asr_step_faults", "Failed engine step attempts, by what the scheduler did "
                                   "(retry, split, overloaded, isolated, lost)", ["kind"], registry=r)
        self.max_batch = Gauge("asr_max_batch", "Largest batch the scheduler forms now (lowered after out of memory)",
                               registry=r)
        self.refused = Counter("asr_refused", "Calls refused before any work, by reason (unauthenticated, "
                               "client_stream_limit)", ["reason"], registry=r)
        self.gc_pause = Histogram("asr_gc_pause_seconds", "Python garbage collections (every thread of that process "
                                  "stops), by generation and process (server; or engine and frontend-N with "
                                  "--frontends)", ["generation", "process"], buckets=_LATENCY_BUCKETS, registry=None)
        r.register(_GcCollector(self))
        self._gc_pending: list[tuple[str, float]] = []
        self.process_name = "server"  # this process's name in asr_gc_pause_seconds
        self._gc_timer: _GcPauseTimer | None = None
        self._http = None
        # Roles whose lifecycle this process reports (watch_lifecycle), by role name.
        self.lifecycles: dict[str, LifecycleState] = {}
        r.register(_LifecycleCollector(lambda: list(self.lifecycles.values())))

    def watch_lifecycle(self, lifecycle: LifecycleState) -> None:
        """Report this role in asr_lifecycle_state (the same role again replaces the last one)."""
        self.lifecycles[lifecycle.role] = lifecycle

    def bind(self, scheduler: Scheduler) -> None:
        self.active_streams.set_function(lambda: scheduler.active_streams)
        self.slots_in_use.set_function(scheduler.slots_in_use)
        self.slots_capacity.set_function(lambda: scheduler.capacity)
        self.max_batch.set_function(lambda: scheduler.max_batch)
        self.registry.register(_ExecutionsCollector(scheduler))
        if hasattr(scheduler, "cores"):  # server.runtime.engine_cores: the same, per core
            self._bind_cores(scheduler)
        if self._gc_timer is None:
            self._gc_timer = _GcPauseTimer(self._gc_pending)
            gc.callbacks.append(self._gc_timer)

    def _bind_cores(self, cores) -> None:
        """Per-core series, labelled with the core's index and device (`asr-server --gpus`,
        `--engine-cores`). The unlabelled metrics above stay the server's totals, under the
        same names as with one engine, so dashboards and autoscalers built on them go on."""
        r, labels = self.registry, ["core", "device"]
        up = Gauge("asr_core_up", "1 while the engine core serves, 0 before warm-up or once it is dead",
                   labels, registry=r)
        in_use = Gauge("asr_core_slots_in_use", "Engine cache slots held now, per core", labels, registry=r)
        capacity = Gauge("asr_core_slots_capacity", "Engine cache slots per core (--max-streams)", labels, registry=r)
        active = Gauge("asr_core_active_streams", "Streams open now, per core (placed on the core with the most "
                       "free slots, kept there for life)", labels, registry=r)
        step = Histogram("asr_core_step_seconds", "Engine step wall time, as the scheduler waits for it, per core",
                         labels, buckets=_LATENCY_BUCKETS, registry=r)
        batch = Histogram("asr_core_batch_size", "Chunks per engine step, per core", labels,
                          buckets=self._batch_buckets, registry=r)

        def key(core) -> dict[str, str]:
            return {"core": str(core.index), "device": core.device}

        for core in cores.cores:
            s = core.scheduler
            self.watch_lifecycle(core.lifecycle)
            up.labels(**key(core)).set_function(
                lambda s=s: float(s.engine_name is not None and s.dead_reason is None))
            in_use.labels(**key(core)).set_function(s.slots_in_use)
            capacity.labels(**key(core)).set_function(lambda s=s: s.capacity)
            active.labels(**key(core)).set_function(lambda s=s: s.active_streams)
            step.labels(**key(core))   # every core's series exists from the start, stepped or not
            batch.labels(**key(core))

        def on_step(core, batch_size: int, step_seconds: float, timings) -> None:
            step.labels(**key(core)).observe(step_seconds)
            batch.labels(**key(core)).observe(batch_size)

        cores.on_core_step = on_step

    # -- SchedulerObserver -------------------------------------------------------------------
    def step_done(self, batch_size, step_seconds, queue_waits, engine, executions, timings=None) -> None:
        self.batch_size.observe(batch_size)
        self.step_time.observe(step_seconds)
        self.queue_wait.observe_many(queue_waits)
        self.steps.labels(engine=engine).inc()
        if timings is not None and timings.total_ms > 0:
            self.engine_step_time.observe(timings.total_ms / 1e3)
            if timings.prepared_ahead:
                self.steps_prepared_ahead.inc()
            if timings.to_worker_ms > 0:
                for part in WORKER_PARTS:
                    self.worker_time.labels(part=part).observe(max(0.0, getattr(timings, f"{part}_ms")) / 1e3)
            if timings.synced:
                for phase, ms in timings.phases().items():
                    self.engine_phase_time.labels(phase=phase).observe(max(0.0, ms) / 1e3)

    def chunks_answered(self, latencies_seconds) -> None:
        self.chunk_latency.observe_many(latencies_seconds)

    def utterance_final(self, closed_by, latency_seconds: float) -> None:
        self.utterance_final_time.labels(closed_by=closed_by.value).observe(max(0.0, latency_seconds))

    def engine_dead(self, reason: str) -> None:
        self.engine_up.set(0)

    def step_fault(self, kind: str) -> None:
        self.step_faults.labels(kind=kind).inc()

    def flush_gc(self) -> None:
        """Move the pauses the GC callback recorded into the histogram (never from the callback)."""
        while self._gc_pending:
            try:  # the scrape thread and the event loop may both flush
                generation, seconds = self._gc_pending.pop(0)
            except IndexError:
                return
            self.gc_paused(generation, seconds)

    def gc_paused(self, generation: str, seconds: float, process: str | None = None) -> None:
        """A collection in this process or, with frontend processes, in one of them (`process`):
        every process's pauses land in the one histogram the engine process serves."""
        self.gc_pause.labels(generation=generation, process=process or self.process_name).observe(seconds)

    def call_refused(self, reason: str) -> None:
        self.refused.labels(reason=reason).inc()

    # -- transport ---------------------------------------------------------------------------
    def rpc_finished(self, method: str, code: str) -> None:
        self.rpcs.labels(method=method, code=code).inc()
        if code != "OK":
            self.errors.labels(method=method, code=code).inc()

    def serve(self, host: str, port: int, status) -> int:
        """Start the HTTP endpoint (server.ops.ops_http: /metrics, and /health and /ready answered
        from `status()`, a dict); returns the bound port (port 0: any free)."""
        self._http = OpsHttpServer(host, port, self.registry, status)
        return self._http.port

    def close(self) -> None:
        if self._gc_timer is not None and self._gc_timer in gc.callbacks:
            gc.callbacks.remove(self._gc_timer)
        self._gc_timer = None
        if self._http is not None:
            self._http.close()
            self._http = None


class MetricsObserver(SchedulerObserver):
    """The scheduler's hooks into the metrics, plus what the owner does when the engine dies
    (health NOT_SERVING; with frontends, telling them) and, optionally, after every step."""

    def __init__(self, metrics: ServerMetrics, on_engine_dead, on_step=None):
        self._metrics, self._on_engine_dead, self._on_step = metrics, on_engine_dead, on_step

    def step_done(self, *args) -> None:
        self._metrics.step_done(*args)
        if self._on_step is not None:
            self._on_step()

    def chunks_answered(self, latencies_seconds) -> None:
        self._metrics.chunks_answered(latencies_seconds)

    def utterance_final(self, closed_by, latency_seconds: float) -> None:
        self._metrics.utterance_final(closed_by, latency_seconds)

    def engine_dead(self, reason: str) -> None:
        self._metrics.engine_dead(reason)
        self._on_engine_dead(reason)

    def step_fault(self, kind: str) -> None:
        self._metrics.step_fault(kind)
