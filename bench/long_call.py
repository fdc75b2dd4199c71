"""Long call: one stream of an hour of audio (utterances separated by pauses) sent faster than
real time through a real `asr-server` process, with endpointing on; the resident memory (VmRSS)
of every server process (the server, its engine worker, its frontends with --frontends) and the
size of every response, over the call. Both must stay flat: a stream keeps only its open
utterance, and interim results carry only that utterance's text.

    python bench/long_call.py --minutes 60 --json bench/results/long_call_fake.json
    python bench/long_call.py --minutes 60 --server-args "--model builtin:demo --device cpu" \\
        --audio examples --json bench/results/long_call_demo.json

The server is started here (`python -m server.service.cli` on loopback, --max-stream-seconds above the
call's length) and stopped with SIGTERM at the end. Utterances are the --audio clips (WAV files,
cycled) or synthetic speech-like clips, each followed by --pause-s of silence (exact zeros).
Audio goes in messages of --chunk-ms as fast as the server takes it (--speed N: N times real
time). Memory is sampled every --sample-every-s seconds of audio the server has decoded (the
audio_processed of its responses); response sizes are the
serialized size of each response, summarized per sampling window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak import rss_mib, start_server  # noqa: E402
from client.loadgen_audio import AudioItem, AudioSpec  # noqa: E402
from client.loadgen_report import child_pids, child_role  # noqa: E402
from proto import asr_stream_pb2 as pb  # noqa: E402
from proto import asr_stream_pb2_grpc as pb_grpc  # noqa: E402

FAKE_ENGINE_ARGS = "--engine-factory tests.fake_engine:build_fake_engine --max-streams 8 --max-batch 8"


@dataclass
class Window:
    """One sampling point: memory now, and the responses received since the last point."""

    audio_s: float              # audio sent so far
    wall_s: float               # since the call started
    rss_mib: dict[str, float]   # per server process ("server", "engine", "frontend-<pid>", ...)
    rss_total_mib: float
    responses: int = 0
    response_bytes_max: int = 0
    response_bytes_mean: float = 0.0
    finals: int = 0


@dataclass
class LongCallReport:
    settings: dict
    windows: list[Window] = field(default_factory=list)
    utterances_sent: int = 0
    finals: int = 0
    end_reasons: dict[str, int] = field(default_factory=dict)
    responses: int = 0
    response_bytes_max: int = 0
    transcript_chars_max: int = 0   # longest transcript in any one result
    status: str = ""
    wall_s: float = 0.0
    server_exit_code: int | None = None

    def flat(self, skip_fraction: float = 0.1) -> dict:
        """Growth from the first window past `skip_fraction` of the call (warm-up: allocator
        pools, first-use caches) to the last: total and per process RSS, and the largest
        response of a window."""
        ws = self.windows
        if len(ws) < 2:
            return {}
        start = next((w for w in ws if w.audio_s >= skip_fraction * ws[-1].audio_s), ws[0])
        end = ws[-1]
        per_process = {k: round(end.rss_mib.get(k, 0.0) - v, 1) for k, v in start.rss_mib.items()}
        later = [w.response_bytes_max for w in ws if w.audio_s > start.audio_s and w.responses]
        first = [w.response_bytes_max for w in ws if w.audio_s <= start.audio_s and w.responses]
        return {"from_audio_s": start.audio_s, "to_audio_s": end.audio_s,
                "rss_total_growth_mib": round(end.rss_total_mib - start.rss_total_mib, 1),
                "rss_growth_mib_by_process": per_process,
                "rss_total_max_mib": max(w.rss_total_mib for w in ws),
                "response_bytes_max_before": max(first, default=0),
                "response_bytes_max_after": max(later, default=0)}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["flat"] = self.flat()
        return d


def server_rss(pid: int) -> dict[str, float]:
    """VmRSS of the server process and each of its children, by role."""
    out = {}
    if (v := rss_mib(pid)) is not None:
        out["server"] = v
    for child in child_pids(pid):
        role = child_role(child)
        if (v := rss_mib(child)) is not None:
            out[role if role == "engine" else f"{role}-{child}"] = v
    return out


def utterance_clips(args) -> list[AudioItem]:
    spec = AudioSpec(paths=tuple(args.audio), synthetic_clips=args.clips, synthetic_seconds=args.utterance_s)
    items = spec.load()
    head = items[0]
    return [i for i in items if (i.sample_rate, i.encoding, i.channels) == (head.sample_rate, head.encoding, head.channels)]


async def run_call(target: str, pid: int, args, log=print) -> LongCallReport:
    clips = utterance_clips(args)
    rate, fb = clips[0].sample_rate, clips[0].frame_bytes
    step = int(rate * args.chunk_ms / 1000) * fb
    pause = bytes(int(args.pause_s * rate) * fb)
    total_s = args.minutes * 60.0
    report = LongCallReport(settings={
        "minutes": args.minutes, "pause_s": args.pause_s, "chunk_ms": args.chunk_ms, "speed": args.speed,
        "clips": [c.name for c in clips], "clip_seconds": [round(c.seconds, 3) for c in clips],
        "sample_every_s": args.sample_every_s, "stop_history_ms": args.stop_history_ms,
        "interim": not args.no_interim})
    window = {"n": 0, "bytes": 0, "max": 0, "finals": 0}
    t0 = time.monotonic()
    sent_s = 0.0
    processed_s = 0.0

    def sample() -> None:
        rss = server_rss(pid)
        n = window["n"]
        report.windows.append(Window(
            audio_s=round(processed_s, 1), wall_s=round(time.monotonic() - t0, 1), rss_mib=rss,
            rss_total_mib=round(sum(rss.values()), 1), responses=n, response_bytes_max=window["max"],
            response_bytes_mean=round(window["bytes"] / n, 1) if n else 0.0, finals=window["finals"]))
        window.update(n=0, bytes=0, max=0, finals=0)

    async def requests():
        nonlocal sent_s
        config = pb.RecognitionConfig(sample_rate=rate, encoding=pb.PCM16 if clips[0].encoding == "PCM16" else pb.FLOAT32,
                                      channels=clips[0].channels, interim_results=not args.no_interim,
                                      client_label="long-call")
        config.endpointing.CopyFrom(pb.EndpointingConfig(stop_history_ms=args.stop_history_ms))
        yield pb.StreamingRecognizeRequest(config=config)
        k = 0
        while sent_s < total_s:
            data = clips[k % len(clips)].data + pause
            k += 1
            report.utterances_sent += 1
            for at in range(0, len(data), step):
                piece = data[at:at + step]
                yield pb.StreamingRecognizeRequest(audio=piece)
                sent_s += len(piece) / fb / rate
                if args.speed > 0:
                    delay = t0 + sent_s / args.speed - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SpeechRecognitionStub(channel)
        call = stub.StreamingRecognize(requests())
        next_sample = args.sample_every_s
        try:
            async for r in call:
                processed_s = r.audio_processed
                size = r.ByteSize()
                report.responses += 1
                report.response_bytes_max = max(report.response_bytes_max, size)
                window["n"] += 1
                window["bytes"] += size
                window["max"] = max(window["max"], size)
                for res in r.results:
                    report.transcript_chars_max = max(report.transcript_chars_max, len(res.transcript))
                    if res.is_final:
                        report.finals += 1
                        window["finals"] += 1
                        report.end_reasons[res.end_reason] = report.end_reasons.get(res.end_reason, 0) + 1
                if processed_s >= next_sample:  # memory as the server has got this far into the call
                    sample()
                    w = report.windows[-1]
                    log(f"  {processed_s / 60:6.1f} min of audio decoded, {w.wall_s:6.1f} s: server RSS "
                        f"{w.rss_total_mib:.1f} MiB {w.rss_mib}, largest response {w.response_bytes_max} B, "
                        f"{report.finals} finals")
                    next_sample += args.sample_every_s
            report.status = "OK"
        except grpc.aio.AioRpcError as exc:
            report.status = f"{exc.code().name}: {exc.details()}"
    sample()  # after the final: the stream is closed
    report.wall_s = round(time.monotonic() - t0, 1)
    return report


async def long_call_with_own_server(args, log=print) -> LongCallReport:
    server_args = [*args.server_args.split(), "--max-stream-seconds", str(args.minutes * 60 * 1.5 + 600)]
    proc, target, _ = await start_server(server_args)
    try:
        report = await run_call(target, proc.pid, args, log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 120)
    report.server_exit_code = code
    report.settings["server_args"] = server_args
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="audio in the call")
    p.add_argument("--audio", nargs="*", default=[], help="WAV clips (or folders) for the utterances (default: synthetic)")
    p.add_argument("--clips", type=int, default=6, help="synthetic clips")
    p.add_argument("--utterance-s", type=float, default=4.0, help="length of each synthetic clip")
    p.add_argument("--pause-s", type=float, default=1.0, help="silence after each utterance")
    p.add_argument("--chunk-ms", type=float, default=160.0, help="audio per message")
    p.add_argument("--speed", type=float, default=0.0, help="times real time (0: as fast as the server takes it)")
    p.add_argument("--stop-history-ms", type=int, default=320, help="endpointing stop_history")
    p.add_argument("--no-interim", action="store_true", help="finals only")
    p.add_argument("--sample-every-s", type=float, default=120.0, help="sample memory every this many s of audio")
    p.add_argument("--server-args", default=FAKE_ENGINE_ARGS, help="asr-server flags")
    p.add_argument("--json", default=None, help="write the report here")
    return p.parse_args(argv)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    report = asyncio.run(long_call_with_own_server(args))
    d = report.as_dict()
    d.update(commit=_commit(), argv=sys.argv[1:], host={"cpus": os.cpu_count(), "python": platform.python_version()})
    flat = d["flat"]
    print(f"long call: {report.status}, {d['windows'][-1]['audio_s'] / 60:.1f} min of audio in {report.wall_s:.0f} s, "
          f"{report.utterances_sent} utterances, {report.finals} finals {report.end_reasons}, {report.responses} "
          f"responses (largest {report.response_bytes_max} B; before/after warm-up {flat.get('response_bytes_max_before')}"
          f"/{flat.get('response_bytes_max_after')} B), server RSS growth {flat.get('rss_total_growth_mib')} MiB "
          f"{flat.get('rss_growth_mib_by_process')}, server exit {report.server_exit_code}")
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=1))
    return 0 if report.status == "OK" and report.server_exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
