"""Assembles the service around an engine: gRPC server, scheduler, health, reflection,
metrics, and the start-up and drain sequences. Engine-agnostic: it takes any StreamingEngine,
so tests run it on the fake engine and the CLI on the real one."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from engines.api import EndpointingParams, StreamingEngine
from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.transport.call_limits import RecognizeBudget
from server.transport.call_skeleton import TransportLimits
from server.runtime.gc_policy import apply_gc_policy
from server.ops.lifecycle import Lifecycle, LifecycleState
from server.ops.metrics import MetricsObserver, ServerMetrics
from server.ops.ops_http import scheduler_status
from server.transport.riva_convert import RivaSettings
from server.transport.riva_servicer import RIVA_SERVICE_NAME, RivaSpeechRecognitionServicer, add_riva_servicer
from server.scheduling.scheduler import Scheduler, SchedulerConfig
from server.transport.security import REFUSAL_DRAIN_SECONDS, SecuritySettings
from server.transport.servicer import SpeechRecognitionServicer
from server.transport.stream_config import ServedModel

log = logging.getLogger("nemostream.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpeechRecognition"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_health(state: Lifecycle):
    """gRPC health for a lifecycle state: SERVING only while SERVING (what clients saw before)."""
    return _SERVING if state is Lifecycle.SERVING else _NOT_SERVING


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 50051                      # 0: any free port (see AsrServer.port)
    metrics_host: str = "127.0.0.1"        # plain HTTP without authentication: loopback unless asked
    metrics_port: int | None = 9400        # None: no metrics endpoint; 0: any free port
    max_message_bytes: int = 32 << 20      # transport limit; a unary Recognize carries a whole file
    stream_window_bytes: int = 256 << 10   # HTTP/2 receive window per stream: unread request bytes held
    drain_grace_s: float = 30.0            # SIGTERM: how long open streams may take to finish
    # SIGTERM: seconds of notice before new streams are refused: health NOT_SERVING and /ready
    # 503 at once, streams still accepted meanwhile, so a balancer that polls /ready (HAProxy,
    # deploy/haproxy) stops sending before the server starts refusing. 0: refuse at once.
    drain_notice_s: float = 0.0
    # Once the engine is dead: seconds to keep answering (health NOT_SERVING, new streams
    # UNAVAILABLE) after the open streams got UNAVAILABLE, then stop, so the process exits and an
    # orchestrator restarts it. None: keep running dead (a library user decides).
    exit_on_engine_death_s: float | None = None
    model_aliases: tuple[str, ...] = ()    # other names clients may use for the served model
    # Endpointing: what a client's unset settings mean (native API, Riva API). Riva streams
    # have endpointing on unless their config turns it off; native streams ask for it.
    endpointing: EndpointingParams = field(default_factory=EndpointingParams)
    limits: TransportLimits = field(default_factory=TransportLimits)
    riva: RivaSettings = field(default_factory=RivaSettings)  # the Riva-compatible API on the same port
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    security: SecuritySettings = field(default_factory=SecuritySettings)  # TLS, tokens, per-client limits
    # After warm-up, move every object alive then (torch, NeMo, the model: ~670k objects) out of
    # the garbage collector's reach (gc.freeze): a full collection over them stops every thread
    # for ~0.35 s on a 2-core CPU; after the freeze it takes ~2 ms. Off by default for library
    # use (tests start many servers in one process); asr-server turns it on.
    gc_freeze: bool = False
    # gc.set_threshold after warm-up (server.runtime.gc_policy says why); None: Python's defaults.
    gc_threshold: tuple[int, int, int] | None = None
    # Share the port with other processes (SO_REUSEPORT): the frontend processes of one server
    # (`asr-server --frontends N`). Off otherwise, so a second server on a taken port fails.
    share_port: bool = False
    # Connection age: after about this long (gRPC adds +-10% jitter) the server sends GOAWAY on
    # a connection; clients open new streams on a new connection (to whichever server a balancer
    # or their resolver picks then, so new servers get streams), while the streams open on the
    # old one go on. None: never. The grace is how long those may still take before the
    # connection is closed under them; None: no limit (streams end at their own limits).
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port {self.metrics_port} out of range")
        if self.stream_window_bytes < 1024:
            raise ValueError("stream_window_bytes must be >= 1024")
        if self.max_message_bytes < self.limits.max_audio_message_bytes:
            raise ValueError("max_message_bytes must be at least limits.max_audio_message_bytes")
        if self.drain_grace_s < 0:
            raise ValueError("drain_grace_s must be >= 0")
        if self.drain_notice_s < 0:
            raise ValueError("drain_notice_s must be >= 0")
        if self.exit_on_engine_death_s is not None and self.exit_on_engine_death_s < 0:
            raise ValueError("exit_on_engine_death_s must be >= 0 (or None: never)")
        for name in ("max_connection_age_s", "max_connection_age_grace_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (or None: no limit)")

    def connection_age_options(self) -> list[tuple[str, int]]:
        """gRPC server options for the connection age (GOAWAY) and its grace."""
        options = []
        if self.max_connection_age_s is not None:
            options.append(("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)))
        if self.max_connection_age_grace_s is not None:
            options.append(("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000)))
        return options


class AsrServer:
    """`scheduler` and `metrics` default to a local Scheduler on `engine` and metrics served
    here. A frontend process passes a server.runtime.remote_scheduler.RemoteScheduler (whose `engine`
    is the engine process's EngineFacts) and its RemoteMetrics."""

    def __init__(self, engine: StreamingEngine, settings: ServerSettings | None = None,
                 scheduler: Scheduler | None = None, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.settings = settings or ServerSettings()
        self.metrics = metrics or ServerMetrics(max_batch=engine.max_batch)
        self.scheduler = scheduler or Scheduler(engine, self.settings.scheduler)
        self.scheduler.observer = MetricsObserver(self.metrics, self._on_engine_dead)
        self.metrics.bind(self.scheduler)
        self.served = ServedModel(engine.model_info, engine.geometry, self.settings.model_aliases,
                                  self.settings.endpointing)
        self.health = HealthServicer()
        # This process's role: the whole server, or one frontend process (server.service.frontends).
        self.lifecycle = LifecycleState("server")
        self.metrics.watch_lifecycle(self.lifecycle)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._drain_started = False
        self._stopping = False
        self._death_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Listen, warm the engine up, then report SERVING. Raises if the warm-up fails."""
        s = self.settings
        await self._publish_health()  # probes see NOT_SERVING during the warm-up (STARTING)
        # Tokens and per-client limits are checked in an interceptor, before any handler runs.
        self._grpc = grpc.aio.server(interceptors=s.security.interceptors(self.metrics.call_refused), options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # A second server on the same port must fail, not share it; frontends of one server share.
            ("grpc.so_reuseport", 1 if s.share_port else 0),
            # A fixed per-stream receive window: a client the server stops reading (backpressure)
            # can have no more than this in flight (no BDP probing, which would grow it).
            ("grpc.http2.lookahead_bytes", s.stream_window_bytes), ("grpc.http2.bdp_probe", 0),
            *s.connection_age_options(),
        ])
        # Responses are checked against the send limit; one Recognize byte budget for both APIs.
        limits = dataclasses.replace(s.limits, max_send_bytes=s.max_message_bytes)
        budget = RecognizeBudget(limits.recognize)
        pb_grpc.add_SpeechRecognitionServicer_to_server(
            SpeechRecognitionServicer(self.scheduler, self.served, limits, self.metrics, budget), self._grpc)
        add_riva_servicer(RivaSpeechRecognitionServicer(self.scheduler, self.served, limits, self.metrics, s.riva,
                                                        budget), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, RIVA_SERVICE_NAME,
                                             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME), self._grpc)
        credentials = s.security.server_credentials()
        address = f"{_host(s.host)}:{s.port}"
        self.port = (self._grpc.add_secure_port(address, credentials) if credentials
                     else self._grpc.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.port}")
        await self.scheduler.start()
        await self._grpc.start()
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port, self.http_status)
        name = await self.scheduler.warmup()  # raises EngineError unless the engine really ran
        apply_gc_policy(s.gc_freeze, s.gc_threshold)
        self.metrics.engine_up.set(1)
        if self.lifecycle.state is Lifecycle.STARTING:  # not dead, drained or stopped meanwhile
            self.lifecycle.serving()
        await self._publish_health()
        log.info("serving", extra={"port": self.port, "metrics_port": self.metrics_port, "engine": name,
                                   "model": self.served.info.name, "max_streams": self.scheduler.capacity,
                                   "max_batch": self.engine.max_batch})

    def http_status(self) -> dict:
        """What /health and /ready on the metrics port answer (server.ops.ops_http)."""
        return scheduler_status(self.scheduler, self.served.info.name, self.lifecycle)

    async def _publish_health(self) -> None:
        """gRPC health from the lifecycle (grpc_health). After enter_graceful_shutdown (a drain)
        the servicer keeps NOT_SERVING whatever is set."""
        status = grpc_health(self.lifecycle.state)
        for service in ("", SERVICE_NAME, RIVA_SERVICE_NAME):
            await self.health.set(service, status)

    def _on_engine_dead(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        self.lifecycle.die(reason)
        loop.create_task(self._publish_health())
        if self.settings.exit_on_engine_death_s is not None and not self._stopping:
            self._death_task = loop.create_task(self._stop_after_engine_death(reason))

    async def _stop_after_engine_death(self, reason: str) -> None:
        # The open streams were failed with UNAVAILABLE; let their handlers send that out.
        await self.scheduler.wait_idle(max(5.0, self.settings.exit_on_engine_death_s))
        await asyncio.sleep(self.settings.exit_on_engine_death_s)
        log.critical("stopping: the engine is dead", extra={"reason": reason})
        # Handlers may still read what their clients send before the status (settle_reader).
        await self.stop(grace_s=REFUSAL_DRAIN_SECONDS + 1.0)

    @property
    def engine_failure(self) -> str | None:
        """Why the engine was marked dead, or None while it serves."""
        return self.scheduler.dead_reason

    async def notice_drain(self) -> None:
        """The drain's notice (a frontend process's SIGUSR1, --drain-notice-s): DRAINING and
        gRPC health NOT_SERVING at once; new streams are still taken until drain() refuses them."""
        self.lifecycle.drain()
        await self.health.enter_graceful_shutdown()

    async def drain(self) -> bool:
        """Graceful shutdown: DRAINING (gRPC health NOT_SERVING), refuse new streams with
        UNAVAILABLE, let open streams finish within the grace period, then STOPPED. True when
        every stream finished in time."""
        if self._drain_started:
            return False
        self._drain_started = True
        await self.notice_drain()
        if self.settings.drain_notice_s > 0:
            log.info("draining: notice before refusing new streams", extra={"notice_s": self.settings.drain_notice_s})
            await asyncio.sleep(self.settings.drain_notice_s)
        self.scheduler.begin_drain()
        open_streams = self.scheduler.active_streams
        log.info("draining", extra={"open_streams": open_streams, "grace_s": self.settings.drain_grace_s})
        finished = await self.scheduler.wait_idle(self.settings.drain_grace_s)
        if not finished:
            log.warning("grace period over; cancelling open streams",
                        extra={"open_streams": self.scheduler.active_streams})
        await self.stop(grace_s=1.0 if finished else 0.0)
        return finished

    async def stop(self, grace_s: float = 0.0) -> None:
        if self._stopping:
            return await self._stopped.wait()
        self._stopping = True
        self.lifecycle.stop()  # a dead server stays DEAD
        await self.scheduler.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        self.metrics.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
