"""A fleet of real `asr-server --model builtin:tiny` processes on loopback, for tests/test_fleet.py.

Every server listens on its own loopback address (127.0.0.11, .12, ...) with the same gRPC and
metrics ports, as pods behind a headless Service do; a name in a DnsStub lists the servers
in the fleet. The servers start in parallel (each loads the model: tens of seconds of CPU on a
2-core machine), so a test asks for them all at once and waits for the ones it needs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
STREAMED = "asr_rpcs_total{code=OK,method=StreamingRecognize}"
START_TIMEOUT_S = 300.0

# What the fleet's servers run with: a short connection age so that clients resolve the
# name again within the test (and find new servers), a drain notice longer than the proxy's
# check interval, a drain grace that a slow machine cannot outrun (the test checks that every
# stream finishes, not how fast: on a 2-core machine busy with other work, four servers of
# builtin:tiny ran 29 times slower than real time), and room for the streams of a test.
# ASR_FLEET_ENGINE=fake runs the fleet on the fake engine instead (starts in a second: for
# working on the fleet tests themselves; the balancing does not depend on the model).
ENGINE_FLAGS = (("--engine-factory", "tests.fake_engine:build_fake_engine") if os.environ.get("ASR_FLEET_ENGINE") == "fake"
                else ("--model", "builtin:tiny", "--device", "cpu"))
SERVER_FLAGS = (*ENGINE_FLAGS, "--max-streams", "24", "--max-batch", "24",
                "--drain-grace-s", "600", "--drain-notice-s", "1.5", "--max-connection-age-s", "2",
                "--idle-timeout-s", "30", "--log-level", "WARNING")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class FleetServer:
    address: str
    port: int
    metrics_port: int
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> FleetServer:
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            raise AssertionError(f"server {self.address} did not start: {''.join(self.lines[-20:])}")
        return self

    def metrics(self) -> dict[str, float]:
        return scrape_at(self.address, self.metrics_port)

    def streamed(self) -> float:
        """Streams that finished OK on this server so far."""
        return self.metrics().get(STREAMED, 0.0)

    def active(self) -> float:
        return self.metrics().get("asr_active_streams", 0.0)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if re.search(r"asr-server: listening on ", line):
                self.ready.set()
        self.ready.set()  # exited: wait_ready sees the exit


def scrape_at(address: str, port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Fleet:
    def __init__(self):
        self.port = free_port()
        self.metrics_port = free_port()
        self.servers: list[FleetServer] = []
        self._next = 11

    def start(self) -> FleetServer:
        address = f"127.0.0.{self._next}"
        self._next += 1
        cmd = [sys.executable, "-m", "server.service.cli", *SERVER_FLAGS, "--host", address, "--port", str(self.port),
               "--metrics-host", address, "--metrics-port", str(self.metrics_port)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server = FleetServer(address, self.port, self.metrics_port, proc)
        threading.Thread(target=server._read, daemon=True).start()
        self.servers.append(server)
        return server

    def close(self) -> None:
        for s in self.servers:
            if s.proc.poll() is None:
                s.proc.kill()
        for s in self.servers:
            s.proc.wait(30)


def haproxy_binary() -> str | None:
    return shutil.which("haproxy")


class HAProxy:
    """deploy/haproxy/haproxy.cfg as shipped, its resolver pointed at the DnsStub and its
    check timings shortened for a test."""

    def __init__(self, workdir: Path, dns_port: int, name: str, backend_port: int, metrics_port: int):
        self.port = free_port()
        cfg = HAPROXY_CFG.read_text()
        assert "parse-resolv-conf" in cfg
        cfg = cfg.replace("    parse-resolv-conf", f"    nameserver stub 127.0.0.1:{dns_port}\n    timeout resolve 200ms")
        cfg = cfg.replace("local0 warning", "local0 info")  # every stream in the log, for a failure's story
        self.path = workdir / "haproxy.cfg"
        self.path.write_text(cfg)
        env = dict(os.environ, ASR_PROXY_BIND=f"127.0.0.1:{self.port}", ASR_BACKEND_DNS=f"{name}:{backend_port}",
                   ASR_METRICS_PORT=str(metrics_port), ASR_PROXY_STATS=str(workdir / "haproxy.sock"))
        self.log = open(workdir / "haproxy.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(self.path)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.workdir = workdir

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def servers_up(self) -> set[str]:
        """Addresses of the servers HAProxy would send a new stream to now (admin socket)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.workdir / "haproxy.sock"))
            except (FileNotFoundError, ConnectionRefusedError):
                return set()  # still starting
            s.sendall(b"show servers state asr\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        up = set()
        for line in data.decode().splitlines():
            fields = line.split()
            # be_id be_name srv_id srv_name srv_addr srv_op_state ...; op_state 2: running
            if len(fields) > 6 and fields[1] == "asr" and fields[5] == "2" and fields[4] != "-":
                up.add(fields[4])
        return up

    def log_mark(self) -> int:
        """Where the log ends now (its line count), for aborts_since."""
        return len((self.workdir / "haproxy.log").read_text().splitlines())

    def aborts_since(self, mark: int) -> list[int]:
        """The log lines (their numbers) since `mark` of streams whose server side aborted during
        the data phase (HAProxy's termination state "SD"): the server's connection closed under
        them."""
        time.sleep(0.2)  # HAProxy logs a stream as it ends: let the last lines of a batch land
        lines = (self.workdir / "haproxy.log").read_text().splitlines()
        return [i for i in range(mark, len(lines)) if " SD-- " in lines[i]]

    def wait_up(self, addresses: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.servers_up() == addresses:
                return
            time.sleep(0.05)
        raise AssertionError(f"HAProxy sends to {self.servers_up()}, expected {addresses}: "
                             f"{(self.workdir / 'haproxy.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
