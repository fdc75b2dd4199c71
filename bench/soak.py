"""Soak: thousands of short streams with random cancellations against an `asr-server`
(builtin:tiny on CPU by default); at the end, no errors but the cancelled streams, no stream
open and no slot in use, and the server's resident memory before and after.

    python bench/soak.py --streams 3000 --concurrency 48 --cancel-fraction 0.25 --json soak.json

By default it starts the server itself (`python -m server.service.cli --model builtin:tiny --device
cpu ...`, or --server-args) on loopback and stops it with SIGTERM at the end (exit status 0
expected); --target HOST:PORT --metrics-port N [--server-pid PID] uses a running one instead.

Each stream sends a random 0.2-1.2 s of noise-like audio in random-size messages as fast as
it can, half-closes and reads to its final, unless it is one of the cancelled ones: those are
cancelled at a random point (while sending, after the half-close before the final, or by a
short client deadline). Resident memory (VmRSS) of every process of the server (the parent, the
engine worker, each frontend, and any other descendant) is sampled after the warm-up streams,
along the run, and once every stream is closed; the figures are the sum over the processes,
with each process's own figure beside it. Figures of a run are recorded in bench/SOAK.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client.provenance import describe, source_revision  # noqa: E402
from proto import asr_stream_pb2 as pb  # noqa: E402
from proto import asr_stream_pb2_grpc as pb_grpc  # noqa: E402

RATE = 16000
CANCEL_KINDS = ("cancel-while-sending", "cancel-before-final", "deadline")


@dataclass
class SoakReport:
    streams: int = 0
    completed: int = 0                 # finals received
    cancelled: int = 0                 # cut short by the client on purpose (any kind)
    cancelled_by_kind: dict = field(default_factory=dict)
    finished_before_cancel: int = 0    # chosen for cancellation, but the final came first
    deadline_reported_internal: int = 0  # client deadlines grpc.aio reported as INTERNAL (counted as cancelled)
    errors: int = 0                    # any other outcome
    error_codes: dict = field(default_factory=dict)
    error_samples: list = field(default_factory=list)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    active_streams_end: float | None = None
    slots_in_use_end: float | None = None
    server_errors: dict = field(default_factory=dict)     # error statuses the server sent, CANCELLED aside
    server_rpcs: dict = field(default_factory=dict)       # StreamingRecognize calls by status, server side
    health_end: str = ""
    # Resident memory of the whole server: the sum over its processes (parent and descendants).
    rss_mib_start: float | None = None       # after warm-up
    rss_mib_before: float | None = None      # after the warm-up streams
    rss_mib_after: float | None = None       # once every stream is closed
    rss_mib_samples: list = field(default_factory=list)  # (streams done, MiB) along the run
    # The same moments per process ({role: MiB}); roles from process_roles().
    rss_by_process_start: dict = field(default_factory=dict)
    rss_by_process_before: dict = field(default_factory=dict)
    rss_by_process_after: dict = field(default_factory=dict)
    rss_by_process_samples: list = field(default_factory=list)  # (streams done, {role: MiB})
    server_exit_code: int | None = None
    command: str = ""
    machine: str = ""
    source_revision: dict = field(default_factory=dict)  # client/provenance.py: commit, dirty flag, tree hash

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_mib_before is None or self.rss_mib_after is None:
            return None
        return round(self.rss_mib_after - self.rss_mib_before, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "rss_growth_mib": self.rss_growth_mib}

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.cancelled_by_kind.items()))
        codes = ", ".join(f"{k} {v}" for k, v in sorted(self.error_codes.items())) or "none"
        lines = [
            f"streams {self.streams}: completed {self.completed}, cancelled {self.cancelled} ({kinds}), "
            f"final before the cancel {self.finished_before_cancel}, errors {self.errors} ({codes}); "
            f"client deadlines grpc.aio reported as INTERNAL: {self.deadline_reported_internal}",
            *(f"  {sample}" for sample in self.error_samples),
            f"audio {self.audio_seconds:.0f} s in {self.wall_seconds:.0f} s wall",
            f"at the end: active streams {self.active_streams_end:g}, slots in use {self.slots_in_use_end:g}, "
            f"health {self.health_end}; server side: {self.server_rpcs} (error statuses other than CANCELLED: "
            f"{self.server_errors or 'none'})",
        ]
        if self.rss_mib_after is not None:
            lines.append(f"server RSS, all {len(self.rss_by_process_after)} processes: {self.rss_mib_start} MiB after "
                         f"warm-up, {self.rss_mib_before} MiB after the warm-up streams, {self.rss_mib_after} MiB at "
                         f"the end (growth {self.rss_growth_mib} MiB)")
            for role, after in sorted(self.rss_by_process_after.items()):
                lines.append(f"  {role}: {self.rss_by_process_before.get(role)} -> {after} MiB")
        if self.server_exit_code is not None:
            lines.append(f"server exit status after SIGTERM: {self.server_exit_code}")
        return "\n".join(lines)


def rss_mib(pid: int | None) -> float | None:
    """VmRSS of one process, MiB (None when it is gone)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    """The process and every process below it (read from /proc's parent ids)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the parent id follows the state.
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def process_role(pid: int, root: int) -> str:
    """What a server process is, from its command line: the parent, an engine worker (a spawned
    multiprocessing child), a frontend (--frontend-name), multiprocessing's resource tracker."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"gone-{pid}"
    text = " ".join(argv)
    if pid == root:
        return "parent"
    if "--frontend-name" in argv:
        return argv[argv.index("--frontend-name") + 1]
    if "resource_tracker" in text:
        return "resource-tracker"
    if "spawn_main" in text:
        return "engine-worker"
    return "other"


def process_rss(pid: int | None) -> dict[str, float]:
    """{role: VmRSS MiB} for the server process and all its descendants (a second process of the
    same role, e.g. a restarted engine worker, gets its process id appended)."""
    if pid is None:
        return {}
    out = {}
    for p in descendants(pid):
        mib = rss_mib(p)
        if mib is not None:
            role = process_role(p, pid)
            out[role if role not in out else f"{role}-{p}"] = mib
    return out


def total(by_process: dict[str, float]) -> float | None:
    return round(sum(by_process.values()), 1) if by_process else None


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def clip(rng: np.random.Generator, seconds: float) -> bytes:
    n = int(seconds * RATE)
    env = 0.3 + 0.2 * np.sin(np.arange(n) / float(rng.integers(800, 4000)))
    return np.clip(rng.standard_normal(n) * 6000 * env, -32768, 32767).astype("<i2").tobytes()


async def one_stream(stub, i: int, args, report: SoakReport) -> None:
    rng = np.random.default_rng([args.seed, i])
    data = clip(rng, float(rng.uniform(args.min_audio_s, args.max_audio_s)))
    pieces, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(640, 6400))  # 20-200 ms, odd splits of samples included
        pieces.append(data[pos:pos + n])
        pos += n
    cancel = rng.random() < args.cancel_fraction
    kind = CANCEL_KINDS[int(rng.integers(len(CANCEL_KINDS)))] if cancel else None
    cut_at = int(rng.integers(0, len(pieces) + 1))
    cut = asyncio.Event()
    release = asyncio.Event()

    async def requests():
        yield pb.StreamingRecognizeRequest(config=pb.RecognitionConfig(
            sample_rate=RATE, encoding=pb.PCM16, interim_results=bool(rng.random() < 0.5), client_label=f"soak-{i}"))
        for n, piece in enumerate(pieces):
            if kind == "cancel-while-sending" and n == cut_at:
                cut.set()
                await release.wait()
            yield pb.StreamingRecognizeRequest(audio=piece)
        if kind == "cancel-while-sending":
            cut.set()

    timeout = float(rng.uniform(0.01, 0.3)) if kind == "deadline" else 120.0
    call = stub.StreamingRecognize(requests(), timeout=timeout)
    final = False
    details = ""
    try:
        if kind == "cancel-while-sending":
            await cut.wait()
            call.cancel()
        elif kind == "cancel-before-final":
            reads = int(rng.integers(0, 3))
            for _ in range(reads):
                if await call.read() is grpc.aio.EOF:
                    break
            call.cancel()
        while (r := await call.read()) is not grpc.aio.EOF:
            final = final or any(x.is_final for x in r.results)
        code = await call.code()
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        details = exc.details()
    finally:
        release.set()
    report.streams += 1
    report.audio_seconds += len(data) / 2 / RATE
    if code == grpc.StatusCode.OK and final:
        if kind is not None:
            report.finished_before_cancel += 1
        report.completed += 1
    elif kind is not None and code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        report.cancelled += 1
        report.cancelled_by_kind[kind] = report.cancelled_by_kind.get(kind, 0) + 1
    elif kind == "deadline" and code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
        # grpc.aio reports a deadline that expires while it writes as this (grpc/grpc#36066); the
        # server saw a cancelled call (its own error counters show it).
        report.cancelled += 1
        report.cancelled_by_kind[kind] = report.cancelled_by_kind.get(kind, 0) + 1
        report.deadline_reported_internal += 1
    else:
        report.errors += 1
        name = code.name if code != grpc.StatusCode.OK else "OK_WITHOUT_FINAL"
        report.error_codes[name] = report.error_codes.get(name, 0) + 1
        if len(report.error_samples) < 10:
            report.error_samples.append(f"stream {i} ({kind or 'not cancelled'}): {name}: {details}")


async def run_soak(target: str, metrics_port: int, args, pid: int | None = None,
                   log=print) -> SoakReport:
    report = SoakReport()
    report.rss_by_process_start = process_rss(pid)
    report.rss_mib_start = total(report.rss_by_process_start)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SpeechRecognitionStub(channel)
        # Warm-up streams (not counted): the allocator and the engine reach their working size.
        warm = SoakReport()
        await asyncio.gather(*(one_stream(stub, 10**9 + i, args, warm) for i in range(args.warmup_streams)))
        warm_rpcs = await settle(metrics_port)
        report.rss_by_process_before = process_rss(pid)
        report.rss_mib_before = total(report.rss_by_process_before)
        started = time.monotonic()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.streams):
            queue.put_nowait(i)
        step = max(1, args.streams // 10)

        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                await one_stream(stub, i, args, report)
                if report.streams % step == 0:
                    by_process = process_rss(pid)
                    report.rss_mib_samples.append((report.streams, total(by_process)))
                    report.rss_by_process_samples.append((report.streams, by_process))
                    log(f"soak: {report.streams}/{args.streams} streams, errors {report.errors}, "
                        f"RSS {total(by_process)} MiB ({by_process})")

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        report.wall_seconds = round(time.monotonic() - started, 1)
        metrics = await settle(metrics_port)
        report.active_streams_end = metrics["asr_active_streams"]
        report.slots_in_use_end = metrics["asr_slots_in_use"]
        report.server_rpcs = {k.split("code=")[1].split(",")[0]: v - warm_rpcs.get(k, 0) for k, v in metrics.items()
                              if k.startswith("asr_rpcs_total{") and "StreamingRecognize" in k}
        report.server_errors = {code: n for code, n in report.server_rpcs.items() if code not in ("OK", "CANCELLED") and n}
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        report.health_end = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    report.rss_by_process_after = process_rss(pid)
    report.rss_mib_after = total(report.rss_by_process_after)
    report.audio_seconds = round(report.audio_seconds, 1)
    return report


async def settle(metrics_port: int, timeout_s: float = 60.0) -> dict:
    """Metrics once the server has closed every stream (it hears of cancellations asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = await asyncio.to_thread(scrape, metrics_port)
        if (metrics["asr_active_streams"] == 0 and metrics["asr_slots_in_use"] == 0) or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.05)


async def start_server(server_args: list[str]) -> tuple[asyncio.subprocess.Process, str, int]:
    cmd = [sys.executable, "-m", "server.service.cli", "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
           "--metrics-port", "0", *server_args]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 300)).decode()
        if not line:
            raise RuntimeError(f"asr-server exited before listening (status {await proc.wait()})")
        if m := re.search(r"listening on 127\.0\.0\.1:(\d+).*metrics on http://127\.0\.0\.1:(\d+)", line):
            asyncio.get_running_loop().create_task(_drain_stdout(proc))
            return proc, f"127.0.0.1:{m.group(1)}", int(m.group(2))


async def _drain_stdout(proc) -> None:
    while await proc.stdout.readline():
        pass


async def soak_with_own_server(args, log=print) -> SoakReport:
    proc, target, metrics_port = await start_server(args.server_args.split())
    try:
        report = await run_soak(target, metrics_port, args, pid=proc.pid, log=log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 120)
    report.server_exit_code = code
    return report


DEFAULT_SERVER_ARGS = "--model builtin:tiny --device cpu --max-streams 64 --max-batch 32"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=48, help="streams open at once (keep under --max-streams)")
    p.add_argument("--cancel-fraction", type=float, default=0.25)
    p.add_argument("--min-audio-s", type=float, default=0.2)
    p.add_argument("--max-audio-s", type=float, default=1.2)
    p.add_argument("--warmup-streams", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="asr-server flags when the soak starts it")
    p.add_argument("--target", default=None, help="HOST:PORT of a running server (default: start one)")
    p.add_argument("--metrics-port", type=int, default=None, help="its metrics port (with --target)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="its process id, for RSS of it and its descendants (with --target)")
    p.add_argument("--json", default=None, help="write the report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    revision = source_revision()  # before the run: the source that runs, not what it became meanwhile
    if args.target and args.metrics_port is None:
        raise SystemExit("--target needs --metrics-port")
    if args.target:
        report = asyncio.run(run_soak(args.target, args.metrics_port, args, pid=args.server_pid))
    else:
        report = asyncio.run(soak_with_own_server(args))
    report.command = "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report.machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"
    report.source_revision = revision
    print(f"source: {describe(report.source_revision)}")
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2))
    ok = (report.errors == 0 and not report.server_errors and report.active_streams_end == 0
          and report.slots_in_use_end == 0 and report.health_end == "SERVING" and report.server_exit_code in (None, 0))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
