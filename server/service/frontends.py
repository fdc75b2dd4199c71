"""`asr-server --frontends N`: one engine process, N gRPC frontend processes on one port.

The engine process (this one, the parent) loads the model, runs the scheduler and the metrics
endpoint (server.runtime.engine_host), and supervises the frontends: `python -m server.service.cli` again
with the same arguments plus `--frontend-of SOCKET`, each a grpc.aio server on the shared port
(SO_REUSEPORT: the kernel spreads new connections across them) with a
server.runtime.remote_scheduler in place of the scheduler. Frontends import no torch.

Lifecycle:
  - start-up: the engine warms up first; the port is reserved before any frontend starts (a
    bound socket the parent holds), so port 0 works and a taken port fails at once; "listening"
    is printed once every frontend has reported ready;
  - SIGTERM/SIGINT: the frontends drain (health NOT_SERVING, new streams UNAVAILABLE, open ones
    finish within --drain-grace-s), then the engine stops;
  - a frontend that dies is started again; the engine process closes its streams, so their
    slots come back and no other stream notices;
  - each frontend's lifecycle (server.ops.lifecycle), kept here from the parent's side and listed in
    the engine process's /health (`frontends`) and asr_lifecycle_state{role="frontend-N"}:
    STARTING when spawned, SERVING once it reported ready, DRAINING once told to drain (SIGUSR1
    notice or SIGTERM), STOPPED when it exits with status 0, DEAD (with its exit status) when it
    exits otherwise; one started again is a new STARTING instance;
  - the engine dies: the frontends answer UNAVAILABLE and NOT_SERVING, and after
    --exit-on-engine-death-s the whole server exits with status 3 for a supervisor to restart.

Per-client stream limits (--max-streams-per-client) hold over the whole server: a client's
connections may land on different frontends, so the engine process counts its streams (the
identity travels with each OPEN) and refuses the one past the limit, whichever frontend it
came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile

from server.service.app import AsrServer, ServerSettings
from server.runtime.engine_host import EngineHost
from server.ops.lifecycle import Lifecycle, LifecycleState
from server.runtime.remote_scheduler import RemoteMetrics, RemoteScheduler
from server.transport.security import REFUSAL_DRAIN_SECONDS

log = logging.getLogger("nemostream.frontends")
EXIT_ENGINE_DEAD = 3
READY_TIMEOUT_S = 120.0
RESTART_BACKOFF_S = 1.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) the port with SO_REUSEPORT and keep it: the frontends bind the same
    port beside it, and nothing else can take it in between. Port 0 picks a free one.

    First a plain bind, without SO_REUSEPORT: it fails on a port any socket holds, also one of
    another asr-server's frontends, which the kernel would otherwise let this server share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = host.strip("[]")
    # SO_REUSEADDR as gRPC sets it: connections of a server that just stopped (TIME_WAIT) do
    # not hold the port; a listening socket does.
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port))  # OSError (address in use) ends the start-up
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


class FrontendSupervisor:
    def __init__(self, host: EngineHost, count: int, argv: list[str], port: int, socket_path: str):
        self.host = host
        self.count = count
        self.argv = argv
        self.port = port
        self.socket_path = socket_path
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.lifecycles: dict[int, LifecycleState] = {}
        self.last_exit: dict[int, str] = {}   # how each frontend's last process ended
        self.restarts_of: dict[int, int] = {}  # how often each frontend was started again
        host.on_frontend_ready = self._ready
        host.frontend_status = self.status
        self.restarts = 0
        self._stopping = False
        self._watchers: set[asyncio.Task] = set()

    def _command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "server.service.cli", *self.argv, "--port", str(self.port),
                "--frontend-of", self.socket_path, "--frontend-name", f"frontend-{index}"]

    async def start(self) -> None:
        for i in range(self.count):
            await self._spawn(i)
        ready = asyncio.ensure_future(self.host.wait_ready(self.count))
        exited = [asyncio.ensure_future(p.wait()) for p in self.procs.values()]
        done, _ = await asyncio.wait([ready, *exited], timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        for f in exited:
            f.cancel()
        if ready not in done:
            ready.cancel()
            codes = {i: p.returncode for i, p in self.procs.items() if p.returncode is not None}
            raise RuntimeError(f"frontend processes did not become ready (exited: {codes or 'none'}; "
                               f"ready {self.host.ready_frontends} of {self.count})")
        for i in self.procs:
            self._watch(i)

    async def _spawn(self, index: int) -> None:
        if index in self.lifecycles:
            self.restarts_of[index] = self.restarts_of.get(index, 0) + 1
        lifecycle = self.lifecycles[index] = LifecycleState(f"frontend-{index}")
        self.host.metrics.watch_lifecycle(lifecycle)
        self.procs[index] = await asyncio.create_subprocess_exec(*self._command(index))

    def _ready(self, name: str) -> None:
        for index, lifecycle in self.lifecycles.items():
            if lifecycle.role == name and lifecycle.state is Lifecycle.STARTING:
                lifecycle.serving()

    def _exited(self, index: int, code: int) -> None:
        """Its process is gone: STOPPED with status 0, DEAD otherwise (one already STOPPED or
        DEAD stays so)."""
        if self.lifecycles[index].state.final:
            return
        self.last_exit[index] = f"the frontend process exited with status {code}"
        if code == 0:
            self.lifecycles[index].stop()
        else:
            self.lifecycles[index].die(self.last_exit[index])

    def notice_drain(self) -> None:
        """SIGUSR1 to every frontend: health NOT_SERVING while new streams are still taken."""
        for index, proc in self.procs.items():
            self.lifecycles[index].drain()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)

    def status(self) -> list[dict]:
        """Each frontend's entry in the engine process's /health."""
        return [{"frontend": index, "name": lifecycle.role, "pid": self.procs[index].pid, "state": lifecycle.name,
                 "reason": lifecycle.reason, "restarts": self.restarts_of.get(index, 0),
                 "last_exit": self.last_exit.get(index)} for index, lifecycle in sorted(self.lifecycles.items())
                if index in self.procs]

    def _watch(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._keep_alive(index))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _keep_alive(self, index: int) -> None:
        """Start a frontend again when it dies (not when the server is stopping)."""
        while True:
            code = await self.procs[index].wait()
            self._exited(index, code)
            if self._stopping or self.host.scheduler.dead_reason is not None:
                return
            self.restarts += 1
            self.host.frontend_restarts.inc()
            log.error("frontend exited; starting it again", extra={"frontend": index, "code": code,
                                                                    "restarts": self.restarts})
            await asyncio.sleep(RESTART_BACKOFF_S)
            if self._stopping:
                return
            await self._spawn(index)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to every frontend (each drains), wait, then kill what is left."""
        self._stopping = True
        for task in list(self._watchers):
            task.cancel()
        for index, proc in self.procs.items():
            if proc.returncode is None:
                self.lifecycles[index].drain()
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [p.wait() for p in self.procs.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace_s + 10.0)
        except TimeoutError:
            for proc in self.procs.values():
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in self.procs.values()))
        for index, proc in self.procs.items():
            self._exited(index, proc.returncode)


async def serve_with_frontends(engine, settings: ServerSettings, count: int, argv: list[str], scheduler=None) -> int:
    """The parent: engine host + supervisor; returns the process exit status."""
    try:
        reserved = reserve_port(settings.host, settings.port)
    except OSError as exc:
        print(f"asr-server: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    port = reserved.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="asr-engine-")
    socket_path = os.path.join(workdir, "engine.sock")
    host = EngineHost(engine, settings.scheduler, socket_path, gc_freeze=settings.gc_freeze,
                      gc_threshold=settings.gc_threshold,
                      max_streams_per_client=settings.security.max_streams_per_client, scheduler=scheduler)
    supervisor = FrontendSupervisor(host, count, argv, port, socket_path)
    try:
        try:
            name = await host.start(settings.metrics_host, settings.metrics_port)
            await supervisor.start()
            host.serving()
        except Exception as exc:  # noqa: BLE001 - start-up must fail loudly
            log.critical("start-up failed", exc_info=exc)
            print(f"asr-server: start-up failed: {exc}", file=sys.stderr, flush=True)
            await supervisor.stop(grace_s=0.0)
            return 1
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals: list[str] = []

        def on_signal(signame: str) -> None:
            signals.append(signame)
            log.info("signal received, draining the frontends", extra={"signal": signame})
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        metrics = (f", metrics on http://{settings.metrics_host}:{host.metrics_port}/metrics"
                   if host.metrics_port else "")
        cores = len(getattr(host.scheduler, "cores", ()))
        on_cores = f", {cores} engine cores" if cores > 1 else ""
        print(f"asr-server: listening on {settings.host}:{port} (engine {name}{on_cores}, {count} frontend processes)"
              f"{metrics}", flush=True)
        death = loop.create_task(host.engine_dead.wait())
        stopped = loop.create_task(stop.wait())
        await asyncio.wait([death, stopped], return_when=asyncio.FIRST_COMPLETED)
        if host.engine_dead.is_set() and not stop.is_set():
            reason = host.scheduler.dead_reason
            if settings.exit_on_engine_death_s is None:
                await stopped  # keep answering NOT_SERVING until told to stop
            else:
                await asyncio.sleep(settings.exit_on_engine_death_s)
            host.begin_drain()
            await supervisor.stop(grace_s=1.0)
            await host.stop()
            print(f"asr-server: the engine failed ({reason}); exiting with status {EXIT_ENGINE_DEAD} "
                  "so that a supervisor restarts the server", file=sys.stderr, flush=True)
            return EXIT_ENGINE_DEAD
        death.cancel()
        if settings.drain_notice_s > 0:  # /ready 503 (and the frontends' health, below) before refusing
            host.notice_drain()
            supervisor.notice_drain()
            await asyncio.sleep(settings.drain_notice_s)
        host.begin_drain()
        await supervisor.stop(grace_s=settings.drain_grace_s)
        await host.stop()
        return EXIT_ENGINE_DEAD if host.scheduler.dead_reason is not None else 0
    finally:
        reserved.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def serve_frontend(settings: ServerSettings, socket_path: str, name: str) -> int:
    """One frontend process: the gRPC service on a RemoteScheduler. It drains on SIGTERM (the
    parent's), ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the
    parent coordinates), and exits when the engine process is gone."""
    remote = RemoteScheduler(socket_path, name=name)
    try:
        facts = await remote.connect()
    except (OSError, ConnectionError, TimeoutError) as exc:
        print(f"asr-server {name}: cannot reach the engine process: {exc}", file=sys.stderr, flush=True)
        return 1
    # The parent gives the drain notice (SIGUSR1 here: health NOT_SERVING) before its SIGTERM.
    settings = dataclasses.replace(settings, share_port=True, metrics_port=None, drain_notice_s=0.0)
    server = AsrServer(facts, settings, scheduler=remote, metrics=RemoteMetrics(remote, max_batch=facts.max_batch))
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001
        print(f"asr-server {name}: start-up failed: {exc}", file=sys.stderr, flush=True)
        await server.stop()
        return 1
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task] = []

    def on_term() -> None:
        # After an engine death there is nothing to drain: the open streams were failed, and the
        # server stops once their handlers have sent that (AsrServer's engine-death path); a
        # drain's short stop would cut those handlers off.
        if not draining and remote.dead_reason is None:
            draining.append(loop.create_task(server.drain()))

    async def exit_when_orphaned() -> None:
        # The engine process is gone (killed, crashed): the streams got UNAVAILABLE; let
        # their handlers send it, then exit, whatever --exit-on-engine-death-s says.
        await remote.disconnected.wait()
        if not draining:
            # Handlers may still read what their clients send before the status (settle_reader):
            # wait until they have closed their streams (bounded), so that a loaded machine does
            # not turn their UNAVAILABLE into the transport's "Cancelling all calls".
            deadline = loop.time() + REFUSAL_DRAIN_SECONDS + 5.0
            await asyncio.sleep(0.2)
            while remote.active_streams and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await server.stop(grace_s=REFUSAL_DRAIN_SECONDS + 1.0)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(server.notice_drain()))
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    orphan_watch = loop.create_task(exit_when_orphaned())
    remote.announce_ready()
    await server.wait_stopped()
    orphan_watch.cancel()
    return EXIT_ENGINE_DEAD if remote.dead_reason is not None else 0
