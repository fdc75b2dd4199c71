"""Adversarial soak: normal streams mixed with clients that try to hurt the server (issue 15),
against an `asr-server` it starts itself (builtin:tiny on CPU by default).

    python bench/adversarial_soak.py --streams 12000 --adversarial 0.25 --json result.json

First a quiet run: each of `--clips` audio clips is transcribed once, a few at a time, with
nothing else going on. Then the soak: `--streams` streams, `--concurrency` at once, of which a
fraction `--adversarial` are adversarial. A normal stream (native API, or Riva's for a fifth of
them) sends clip i % clips in random 20-200 ms messages as fast as it can, half-closes and
reads to its final; its transcript must equal the quiet run's for that clip. An adversarial
stream is one of:

  cancel        cancelled while sending, after the half-close, or by a short client deadline
  idle          a config and some audio, then nothing          -> DEADLINE_EXCEEDED (idle)
  keepalive     then an empty message every 0.3 s             -> DEADLINE_EXCEEDED (idle)
  non-reading   sends 6 s of audio, reads nothing for 4 s      -> RESOURCE_EXHAUSTED (or the
                                                                  stall's DEADLINE_EXCEEDED)
  oversized     an audio message over --max-audio-message-kb (INVALID_ARGUMENT), a Recognize
                over --recognize-max-call-mb (RESOURCE_EXHAUSTED), a Riva RequestId of 5,000
                characters, a model name of 20,000 (INVALID_ARGUMENT), FLOAT32 at 3e38, a WAV
                whose data size is smaller than its audio (INVALID_ARGUMENT)

and once, when half of the streams are done, the engine worker process is stopped (SIGSTOP)
for `--hang-s` seconds and continued: below the server's hang deadline, so no stream may be
lost to it. Every outcome must be the status the server means for that kind. Resident memory
(VmRSS) of the server and every process it started is sampled along the run; at the end
streams and slots in use must be 0, health SERVING, and the exit status after SIGTERM 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak import clip, rss_mib, settle, start_server  # noqa: E402
from client.loadgen_report import child_pids, child_role  # noqa: E402
from proto import asr_stream_pb2 as pb  # noqa: E402
from proto import asr_stream_pb2_grpc as pb_grpc  # noqa: E402
from proto.riva import riva_asr_pb2 as rpb  # noqa: E402
from proto.riva import riva_asr_pb2_grpc as rpb_grpc  # noqa: E402

RATE = 16000
KINDS = {"cancel": 0.30, "idle": 0.08, "keepalive": 0.08, "non-reading": 0.10, "oversized": 0.44}
OVERSIZED = ("audio-message", "recognize", "riva-id", "model-name", "float32", "lying-wav")
EXPECTED = {
    "idle": {"DEADLINE_EXCEEDED"}, "keepalive": {"DEADLINE_EXCEEDED"},
    "non-reading": {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"},
    "audio-message": {"INVALID_ARGUMENT"}, "recognize": {"RESOURCE_EXHAUSTED"}, "riva-id": {"INVALID_ARGUMENT"},
    "model-name": {"INVALID_ARGUMENT"}, "float32": {"INVALID_ARGUMENT"}, "lying-wav": {"INVALID_ARGUMENT"},
    "cancel": {"CANCELLED", "DEADLINE_EXCEEDED", "OK"},  # OK: the final came before the cancel
}
SERVER_ARGS = ("--model builtin:tiny --device cpu --max-streams 64 --max-batch 32 --idle-timeout-s 2 "
               "--max-pending-s 2 --response-buffer 4 --max-audio-message-kb 64 --recognize-max-call-mb 1 "
               "--engine-hang-s 30")


@dataclass
class Report:
    streams: int = 0
    normal: int = 0
    adversarial: int = 0
    by_kind: dict = field(default_factory=dict)          # kind -> {status: count}
    normal_exact: int = 0                                # transcripts equal to the quiet run's
    normal_lost: int = 0                                 # any other outcome of a normal stream
    unexpected: int = 0                                  # adversarial outcomes not in EXPECTED
    samples: list = field(default_factory=list)          # the first few of either
    quiet_clips: int = 0
    quiet_nonempty: int = 0
    hang: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    audio_seconds: float = 0.0
    rss_mib: dict = field(default_factory=dict)          # process role -> [(streams done, MiB), ...]
    active_streams_end: float | None = None
    slots_in_use_end: float | None = None
    server_rpcs: dict = field(default_factory=dict)
    health_end: str = ""
    server_exit_code: int | None = None
    stopped_early: bool = False                          # SIGUSR1: fewer streams than asked for
    command: str = ""
    commit: str = ""
    machine: str = ""

    def ok(self) -> bool:
        return (self.normal_lost == 0 and self.unexpected == 0 and self.normal_exact == self.normal
                and self.active_streams_end == 0 and self.slots_in_use_end == 0 and self.health_end == "SERVING"
                and self.server_exit_code == 0 and self.hang.get("done", False))


def process_rss(pid: int) -> dict[str, float]:
    """MiB per process of the server: 'server', 'engine' (the worker), others by role and pid."""
    out = {"server": rss_mib(pid) or 0.0}
    for child in child_pids(pid):
        role = child_role(child)
        out[role if role == "engine" else f"{role}-{child}"] = rss_mib(child) or 0.0
    return out


def pieces_of(data: bytes, rng: np.random.Generator) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(640, 6400))
        out.append(data[pos:pos + n])
        pos += n
    return out


def native_config(**fields) -> pb.StreamingRecognizeRequest:
    fields.setdefault("sample_rate", RATE)
    fields.setdefault("encoding", pb.PCM16)
    return pb.StreamingRecognizeRequest(config=pb.RecognitionConfig(**fields))


def riva_first(request_id: str = "") -> rpb.StreamingRecognizeRequest:
    first = rpb.StreamingRecognizeRequest(streaming_config=rpb.StreamingRecognitionConfig(
        config=rpb.RecognitionConfig(encoding=1, sample_rate_hertz=RATE, verbatim_transcripts=True,
                                     max_alternatives=1)))
    if request_id:
        first.id.value = request_id
    return first


async def _outcome(coro) -> tuple[str, str, object]:
    try:
        return "OK", "", await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or "", None
    except asyncio.CancelledError:
        return "CANCELLED", "", None


# -- normal streams -----------------------------------------------------------------------------
async def native_transcript(stub, pieces: list[bytes], label: str) -> str:
    async def requests():
        yield native_config(client_label=label)
        for p in pieces:
            yield pb.StreamingRecognizeRequest(audio=p)

    finals = [r.results[0].transcript async for r in stub.StreamingRecognize(requests(), timeout=120)
              if r.results and r.results[0].is_final]
    if len(finals) != 1:
        raise RuntimeError(f"{len(finals)} finals")
    return finals[0]


async def riva_transcript(stub, pieces: list[bytes]) -> str:
    async def requests():
        yield riva_first()
        for p in pieces:
            yield rpb.StreamingRecognizeRequest(audio_content=p)

    finals = [r.results[0].alternatives[0].transcript async for r in stub.StreamingRecognize(requests(), timeout=120)
              if r.results and r.results[0].is_final]
    if len(finals) != 1:
        raise RuntimeError(f"{len(finals)} finals")
    return finals[0]


# -- adversarial streams --------------------------------------------------------------------------
async def adversary(kind: str, sub: str, stubs, rng: np.random.Generator, data: bytes) -> tuple[str, str]:
    native, riva = stubs
    if kind == "cancel":
        return await cancelled(native, rng, data)
    if kind in ("idle", "keepalive"):
        async def requests():
            yield native_config()
            yield pb.StreamingRecognizeRequest(audio=data[:6400])
            if kind == "idle":
                await asyncio.sleep(60)
            for _ in range(200):
                await asyncio.sleep(0.3)
                yield pb.StreamingRecognizeRequest(audio=b"")
        code, details, _ = await _outcome(_drain(native.StreamingRecognize(requests(), timeout=60)))
        return code, details
    if kind == "non-reading":
        audio = clip(rng, 6.0)
        call = native.StreamingRecognize(_native_requests(pieces_of(audio, rng)), timeout=60)
        await asyncio.sleep(4.0)  # reads nothing meanwhile
        code, details, _ = await _outcome(_drain(call))
        return code, details
    # oversized and malformed
    if sub == "audio-message":
        requests = [native_config(), pb.StreamingRecognizeRequest(audio=b"\0" * (100 << 10))]
    elif sub == "model-name":
        requests = [native_config(model="m" * 20000), pb.StreamingRecognizeRequest(audio=data[:3200])]
    elif sub == "float32":
        requests = [native_config(encoding=pb.FLOAT32),
                    pb.StreamingRecognizeRequest(audio=np.full(1600, 3e38, "<f4").tobytes())]
    elif sub == "lying-wav":
        requests = [pb.StreamingRecognizeRequest(config=pb.RecognitionConfig()),
                    *(pb.StreamingRecognizeRequest(audio=p) for p in pieces_of(lying_wav(data), rng))]
    elif sub == "recognize":
        code, details, _ = await _outcome(native.Recognize(pb.RecognizeRequest(
            config=pb.RecognitionConfig(sample_rate=RATE, encoding=pb.PCM16), audio=b"\0" * (1536 << 10)),
            timeout=60))
        return code, details
    else:  # riva-id
        first = riva_first("r" * 5000)
        requests_riva = [first, *(rpb.StreamingRecognizeRequest(audio_content=p) for p in pieces_of(data, rng))]
        code, details, _ = await _outcome(_drain(riva.StreamingRecognize(_aiter(requests_riva), timeout=60)))
        return code, details
    code, details, _ = await _outcome(_drain(native.StreamingRecognize(_aiter(requests), timeout=60)))
    return code, details


async def cancelled(stub, rng: np.random.Generator, data: bytes) -> tuple[str, str]:
    how = ("while-sending", "before-final", "deadline")[int(rng.integers(3))]
    pieces = pieces_of(data, rng)
    cut_at = int(rng.integers(0, len(pieces) + 1))
    cut = asyncio.Event()

    async def requests():
        yield native_config()
        for n, piece in enumerate(pieces):
            if how == "while-sending" and n == cut_at:
                cut.set()
                await asyncio.sleep(30)
            yield pb.StreamingRecognizeRequest(audio=piece)
        cut.set()

    call = stub.StreamingRecognize(requests(), timeout=float(rng.uniform(0.01, 0.3)) if how == "deadline" else 60)
    details = ""
    try:
        if how == "while-sending":
            await cut.wait()
            call.cancel()
        elif how == "before-final":
            await call.read()
            call.cancel()
        while await call.read() is not grpc.aio.EOF:
            pass
        code = (await call.code()).name
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    except asyncio.CancelledError:
        code = "CANCELLED"
    if how == "deadline" and code == "INTERNAL" and details == "Internal error from Core":
        return "DEADLINE_EXCEEDED", "reported by grpc.aio as INTERNAL (client-side, grpc/grpc#36066)"
    return code, details


def lying_wav(data: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(data)
    out = buf.getvalue()
    at = out.index(b"data") + 4
    return out[:at] + struct.pack("<I", 3200) + out[at + 4:]  # says 0.1 s, carries all of it


async def _drain(call) -> None:
    async for _ in call:
        pass


async def _aiter(items):
    for item in items:
        yield item


async def _native_requests(pieces):
    yield native_config()
    for p in pieces:
        yield pb.StreamingRecognizeRequest(audio=p)


# -- the run ------------------------------------------------------------------------------------
async def run(args, report: Report, log=print) -> None:
    proc, target, metrics_port = await start_server(args.server_args.split())
    try:
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            native, riva = pb_grpc.SpeechRecognitionStub(channel), rpb_grpc.RivaSpeechRecognitionStub(channel)
            clips = [clip(np.random.default_rng([args.seed, 7, k]),
                          float(np.random.default_rng([args.seed, 8, k]).uniform(args.min_audio_s, args.max_audio_s)))
                     for k in range(args.clips)]
            # The quiet run: each clip alone-ish (8 at a time), nothing adversarial going on.
            quiet: list[str] = [""] * len(clips)
            sem = asyncio.Semaphore(8)

            async def quiet_one(k: int) -> None:
                async with sem:
                    quiet[k] = await native_transcript(native, [clips[k]], f"quiet-{k}")

            await asyncio.gather(*(quiet_one(k) for k in range(len(clips))))
            report.quiet_clips, report.quiet_nonempty = len(clips), sum(bool(t) for t in quiet)
            await settle(metrics_port)
            rss = report.rss_mib
            for role, mib in process_rss(proc.pid).items():
                rss.setdefault(role, []).append((0, mib))
            engine_pids = child_pids(proc.pid, "engine")
            hang_at = args.hang_at if args.hang_at is not None else args.streams // 2

            hang_task: list[asyncio.Task] = []

            async def hang() -> None:
                if not engine_pids:
                    report.hang = {"done": False, "why": "no engine worker process"}
                    return
                pid = engine_pids[0]
                t0 = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(args.hang_s)
                os.kill(pid, signal.SIGCONT)
                report.hang = {"done": True, "pid": pid, "seconds": round(time.monotonic() - t0, 2),
                               "at_stream": report.streams}
                log(f"adversarial soak: engine worker {pid} stopped for {args.hang_s} s and continued")

            queue = collections.deque(range(args.streams))

            def queue_stop() -> None:
                report.stopped_early = True
                queue.clear()
                log("adversarial soak: SIGUSR1, no new streams")

            # SIGUSR1 ends the run early but properly: no new streams, the open ones finish, and
            # the end-of-run checks (streams, slots, health, memory, exit status) still run.
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, queue_stop)
            step = max(1, args.streams // 20)
            started = time.monotonic()

            async def one(i: int) -> None:
                rng = np.random.default_rng([args.seed, i])
                if rng.random() < args.adversarial:
                    kind = str(rng.choice(list(KINDS), p=list(KINDS.values())))
                    sub = OVERSIZED[int(rng.integers(len(OVERSIZED)))] if kind == "oversized" else kind
                    data = clips[i % len(clips)]
                    code, details = await adversary(kind, sub, (native, riva), rng, data)
                    report.adversarial += 1
                    counts = report.by_kind.setdefault(sub, {})
                    counts[code] = counts.get(code, 0) + 1
                    if code not in EXPECTED[sub]:
                        report.unexpected += 1
                        if len(report.samples) < 20:
                            report.samples.append(f"stream {i} ({sub}): {code} {details[:200]}")
                    return
                k = i % len(clips)
                pieces = pieces_of(clips[k], rng)
                api = "riva" if rng.random() < 0.2 else "native"
                report.normal += 1
                report.audio_seconds += len(clips[k]) / 2 / RATE
                code, details, text = await _outcome(
                    riva_transcript(riva, pieces) if api == "riva" else native_transcript(native, pieces, f"n-{i}"))
                counts = report.by_kind.setdefault(f"normal-{api}", {})
                counts[code] = counts.get(code, 0) + 1
                if code == "OK" and text == quiet[k]:
                    report.normal_exact += 1
                else:
                    report.normal_lost += 1
                    if len(report.samples) < 20:
                        report.samples.append(f"stream {i} (normal {api}): {code} {details[:200]} "
                                              f"{text!r} != {quiet[k]!r}" if code == "OK" else
                                              f"stream {i} (normal {api}): {code} {details[:200]}")

            async def worker() -> None:
                while queue:
                    i = queue.popleft()
                    try:
                        await one(i)
                    except Exception as exc:  # noqa: BLE001 - a bug of the soak is an unexpected outcome
                        report.unexpected += 1
                        report.samples.append(f"stream {i}: soak error {type(exc).__name__}: {exc}")
                    report.streams += 1
                    if report.streams == hang_at and not hang_task:
                        hang_task.append(asyncio.ensure_future(hang()))
                    if report.streams % step == 0:
                        for role, mib in process_rss(proc.pid).items():
                            rss.setdefault(role, []).append((report.streams, mib))
                        log(f"adversarial soak: {report.streams}/{args.streams}, normal exact {report.normal_exact}"
                            f"/{report.normal}, unexpected {report.unexpected}, RSS {process_rss(proc.pid)}")
                        if args.json:  # a partial report along the way, in case the run is cut short
                            Path(args.json).write_text(json.dumps({**asdict(report), "partial": True}, indent=2))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            if hang_task:
                await hang_task[0]
            report.wall_seconds = round(time.monotonic() - started, 1)
            metrics = await settle(metrics_port)
            report.active_streams_end = metrics["asr_active_streams"]
            report.slots_in_use_end = metrics["asr_slots_in_use"]
            report.server_rpcs = {k: v for k, v in metrics.items() if k.startswith("asr_rpcs_total{") and v}
            for role, mib in process_rss(proc.pid).items():
                rss.setdefault(role, []).append((report.streams, mib))
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            report.health_end = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        report.server_exit_code = await asyncio.wait_for(proc.wait(), 120)
    report.audio_seconds = round(report.audio_seconds, 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=12000)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--adversarial", type=float, default=0.25, help="fraction of adversarial streams")
    p.add_argument("--clips", type=int, default=200, help="distinct audio clips of the normal streams")
    p.add_argument("--min-audio-s", type=float, default=0.2)
    p.add_argument("--max-audio-s", type=float, default=1.2)
    p.add_argument("--hang-s", type=float, default=10.0, help="SIGSTOP of the engine worker at the midpoint")
    p.add_argument("--hang-at", type=int, default=None, help="streams done when the hang starts (default: half)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default=SERVER_ARGS)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def summary(r: Report) -> str:
    lines = [f"streams {r.streams}: normal {r.normal} (exact {r.normal_exact}, lost {r.normal_lost}), adversarial "
             f"{r.adversarial} ({r.adversarial / max(1, r.streams):.1%}), unexpected outcomes {r.unexpected}",
             f"quiet run: {r.quiet_clips} clips, {r.quiet_nonempty} with a non-empty transcript",
             f"hang: {r.hang}", f"wall {r.wall_seconds} s, normal audio {r.audio_seconds} s",
             *(f"  {kind}: {counts}" for kind, counts in sorted(r.by_kind.items())),
             *(f"  sample: {s}" for s in r.samples[:10]),
             f"end: active streams {r.active_streams_end}, slots in use {r.slots_in_use_end}, health {r.health_end}, "
             f"exit {r.server_exit_code}"]
    for role, series in r.rss_mib.items():
        lines.append(f"  RSS {role}: " + ", ".join(f"{mib:.0f}" for _, mib in series) + " MiB")
    lines.append("PASS" if r.ok() else "FAIL")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(command="python bench/adversarial_soak.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    try:
        report.commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    report.machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    asyncio.run(run(args, report))
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
