"""Drives Pipecat's unmodified NVIDIA speech-to-text service (`pipecat.services.nvidia.stt.
NvidiaSTTService`) the way a voice-agent pipeline does, against a server, and writes what it
received as JSON. Runs inside the Pipecat environment (tests/test_voice_frameworks.py builds it
and starts this script as a subprocess); imports nothing from this project.

The pipeline is [NvidiaSTTService, collector] under a PipelineWorker run by a WorkerRunner (the
1.x names of PipelineTask/PipelineRunner). The call's audio (raw PCM16 mono, 16 kHz) goes in as
InputAudioRawFrames of --frame-ms, paced at --speed times real time, as an input transport
queues them; the runner sends StartFrame, and an EndFrame ends the pipeline after the audio.
The service keeps its defaults (endpointing stop_history 320 ms, interim results, punctuation
on, verbatim transcripts) except the server address and TLS off (the model name is not sent:
the service always asks for the server's default model).

--quiet AT:SECONDS:KEEPALIVE stops the audio for SECONDS once AT seconds of it were sent (a
muted input, say). During that quiet time the service's idle time before a silence keepalive
is KEEPALIVE seconds instead of its 30 s, so a test need not wait that long (0: the service's
30 s); its idle check then runs every KEEPALIVE/2 s instead of every 5 s for the whole call (a
change made only at the quiet time would wait for the check's 5 s sleep to end). The keepalive
code that runs is the service's; the driver only counts its calls.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import sys
import time

from loguru import logger
from pipecat.frames.frames import (
    EndFrame, ErrorFrame, InputAudioRawFrame, InterimTranscriptionFrame, TranscriptionFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.nvidia.stt import NvidiaSTTService
from pipecat.workers.runner import WorkerRunner

RATE = 16000


class Collector(FrameProcessor):
    """The last processor: notes every transcription frame with its arrival time."""

    def __init__(self, clock0: float):
        super().__init__()
        self.clock0 = clock0
        self.finals: list[dict] = []
        self.interims = 0
        self.errors: list[str] = []

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InterimTranscriptionFrame):
            self.interims += 1
        elif isinstance(frame, TranscriptionFrame):
            self.finals.append({"text": frame.text, "t": time.monotonic() - self.clock0})
        elif isinstance(frame, ErrorFrame):
            self.errors.append(str(frame.error))
        await self.push_frame(frame, direction)


async def main(args) -> dict:
    log_lines: list[str] = []
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    logger.add(lambda m: log_lines.append(m.record["message"]), level="DEBUG")

    pcm = open(args.audio, "rb").read()
    clock0 = time.monotonic()
    stt = NvidiaSTTService(server=args.server, use_ssl=False)
    quiet = sorted(tuple(float(x) for x in q.split(":")) for q in args.quiet)
    default_keepalive = stt._keepalive_timeout
    sooner = [k for _, _, k in quiet if k]
    if sooner:  # before the pipeline starts the service's keepalive task
        stt._keepalive_interval = min(stt._keepalive_interval, min(sooner) / 2)
    keepalives = []
    send_keepalive = stt._send_keepalive

    async def counted_keepalive(silence: bytes):  # observe, then call the service's own sender
        keepalives.append(time.monotonic() - clock0)
        await send_keepalive(silence)

    stt._send_keepalive = counted_keepalive
    collector = Collector(clock0)
    worker = PipelineWorker(Pipeline([stt, collector]), params=PipelineParams(audio_in_sample_rate=RATE),
                            idle_timeout_secs=None, enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())

    frame_bytes = int(RATE * args.frame_ms / 1000) * 2
    await asyncio.sleep(0.5)  # StartFrame through the pipeline, the stream opened
    sent_at, quiet_times = [], []
    start = time.monotonic()
    for pos in range(0, len(pcm), frame_bytes):
        t_audio = pos / 2 / RATE
        if quiet and t_audio >= quiet[0][0]:
            _, seconds, keepalive_after = quiet.pop(0)
            stt._keepalive_timeout = keepalive_after or default_keepalive  # see the module docstring
            quiet_times.append([time.monotonic() - clock0])
            await asyncio.sleep(seconds)  # the input sends nothing for a while
            quiet_times[-1].append(time.monotonic() - clock0)
            stt._keepalive_timeout = default_keepalive
            start += seconds
        await asyncio.sleep(max(0.0, start + t_audio / args.speed - time.monotonic()))
        await worker.queue_frame(InputAudioRawFrame(audio=pcm[pos:pos + frame_bytes], sample_rate=RATE,
                                                    num_channels=1))
        sent_at.append(round(time.monotonic() - clock0, 4))
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(run, 60)
    return {
        "version": importlib.metadata.version("pipecat-ai"),
        "riva_client_version": importlib.metadata.version("nvidia-riva-client"),
        "finals": collector.finals, "interims": collector.interims, "errors": collector.errors,
        "frame_ms": args.frame_ms, "sent_at": sent_at, "last_audio_sent": sent_at[-1],
        "keepalives": keepalives, "quiet_times": quiet_times,
        "stream_drops": [m for m in log_lines if "stream dropped" in m],
        "reconnects": sum("reconnecting" in m for m in log_lines),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--audio", required=True, help="raw PCM16 mono 16 kHz")
    p.add_argument("--out", required=True)
    p.add_argument("--frame-ms", type=float, default=20)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--quiet", action="append", default=[], metavar="AT:SECONDS:KEEPALIVE")
    a = p.parse_args()
    result = asyncio.run(main(a))
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
