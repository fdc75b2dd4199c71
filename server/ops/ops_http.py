"""The HTTP endpoint on the metrics port: /metrics (Prometheus), /health and /ready (JSON).

/health and /ready are for balancers and platforms that cannot speak gRPC health (cloud load
balancers, serverless GPU platforms). They report the serving state and the engine that really
executed: the engine named by the warm-up whose execution counter moved, with every engine's
execution count, not the engine the server was configured with (a check of the configured name
is fooled by a silent fallback).

    /health  200 while the process is alive and the server is not DEAD; 503 once it is DEAD
    /ready   200 only while the server is SERVING (with frontend processes: and one of them
             serves): 503 while STARTING, DRAINING, STOPPED or DEAD
    /metrics Prometheus text format
    other    404

Bounded: a fixed pool of worker threads takes accepted connections from a bounded queue; a
connection that arrives while the queue is full is closed at once, and a connection that
sends no complete request within READ_TIMEOUT_S is dropped. prometheus_client's own server
started a thread per connection, so 500 half-open connections made 512 threads.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.ops.lifecycle import Lifecycle, LifecycleState

log = logging.getLogger("nemostream.ops_http")

WORKERS = 4            # threads answering requests
BACKLOG = 32           # accepted connections waiting for a worker; more are closed at once
READ_TIMEOUT_S = 5.0   # a connection must send its request (and read the answer) within this

def scheduler_status(scheduler, model: str, lifecycle: LifecycleState) -> dict:
    """The JSON both endpoints answer with: the server's lifecycle state (`status`, by its enum
    name, server.ops.lifecycle), then the scheduler that batches (its own warm-up proved the engine
    ran: Scheduler.warmup). `ready` is what /ready answers by: SERVING (an owner may add more,
    server.runtime.engine_host: a frontend that serves)."""
    return {
        "status": lifecycle.name,
        "ready": lifecycle.state is Lifecycle.SERVING,
        "engine": scheduler.engine_name,                 # what the warm-up really executed
        "engine_executions": dict(scheduler.executions),  # encoder executions by engine, after the last step
        "model": model,
        "slots_in_use": int(scheduler.slots_in_use()),
        "slots_capacity": int(scheduler.capacity),
        "active_streams": int(scheduler.active_streams),
        "dead_reason": lifecycle.reason if lifecycle.state is Lifecycle.DEAD else scheduler.dead_reason,
        # Several engine cores (server.runtime.engine_cores): each with its device, engine and state.
        **({"cores": scheduler.core_status()} if hasattr(scheduler, "core_status") else {}),
    }


class _Handler(BaseHTTPRequestHandler):
    server: OpsHttpServer
    timeout = READ_TIMEOUT_S
    protocol_version = "HTTP/1.0"  # one request per connection: no worker held by an idle keep-alive

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path in ("/health", "/ready"):
            status = self.server.status()
            ok = status["ready"] is True if path == "/ready" else status["status"] != Lifecycle.DEAD.name
            self._send(200 if ok else 503, "application/json", json.dumps(status).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: /metrics, /health, /ready\n")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - scrapes every few seconds: no log line each
        pass


class OpsHttpServer(HTTPServer):
    """HTTPServer whose requests are answered by WORKERS threads from a queue of BACKLOG."""

    allow_reuse_address = True
    request_queue_size = 128  # the kernel's accept backlog: the accept loop empties it quickly

    def __init__(self, host: str, port: int, registry: CollectorRegistry, status: Callable[[], dict]):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host.strip("[]"), port), _Handler)
        self.registry = registry
        self.status = status
        self._queue: queue.Queue = queue.Queue(maxsize=BACKLOG)
        self.dropped = 0  # connections closed because the queue was full
        self._workers = [threading.Thread(target=self._work, name=f"ops-http-{i}", daemon=True)
                         for i in range(WORKERS)]
        for t in self._workers:
            t.start()
        self._acceptor = threading.Thread(target=self.serve_forever, name="ops-http-accept", daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address) -> None:
        # In place of TCPServer's (answer, then close): a worker answers and closes it.
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            self.dropped += 1
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - a broken connection must not end the worker
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics connection failed", exc_info=True, extra={"client": str(client_address)})

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        while True:  # connections still queued are closed unanswered
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self._workers:
            self._queue.put(None)

