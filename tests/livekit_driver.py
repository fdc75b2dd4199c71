"""Drives LiveKit Agents' unmodified NVIDIA speech-to-text plugin (`livekit.plugins.nvidia.STT`)
the way an agent session does, against a server, and writes what it received as JSON. Runs
inside the LiveKit environment (tests/test_voice_frameworks.py builds it and starts this script
as a subprocess); imports nothing from this project.

`STT.stream()` opens one recognition stream for the call; the call's audio (raw PCM16 mono,
16 kHz) is pushed as rtc.AudioFrames of --frame-ms, paced at --speed times real time, as a room's
audio track delivers them; SpeechEvents are read as they come. The plugin keeps its defaults
(punctuation on, interim results, word times, no endpointing config: the server's) except the
server address, TLS off and model="" (its default names a Riva NIM model; "" asks for the
server's default). Before the call, the plugin's own GetRivaSpeechRecognitionConfig helper
(STT.log_asr_models) lists the server's models (see main for the name it lacks).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import time

import riva.client
from riva.client.proto import riva_asr_pb2
from livekit import rtc
from livekit.agents import stt as agents_stt
from livekit.plugins import nvidia
from livekit.plugins.nvidia import auth

RATE = 16000


async def main(args) -> dict:
    pcm = open(args.audio, "rb").read()
    clock0 = time.monotonic()
    stt = nvidia.STT(server=args.server, use_ssl=False, model="")
    service = riva.client.ASRService(auth.create_riva_auth(
        api_key=stt.nvidia_api_key, function_id=stt._opts.function_id, server=args.server, use_ssl=False))
    try:
        models, models_error = stt.log_asr_models(service), ""
    except AttributeError as exc:
        # The helper names riva.client.RivaSpeechRecognitionConfigRequest, which nvidia-riva-client
        # does not export (it lives in riva.client.proto.riva_asr_pb2): it fails before any RPC,
        # whatever the server. Give the riva package that name and run the helper unchanged.
        models_error = f"{type(exc).__name__}: {exc}"
        riva.client.RivaSpeechRecognitionConfigRequest = riva_asr_pb2.RivaSpeechRecognitionConfigRequest
        models = stt.log_asr_models(service)

    finals, interims, events = [], 0, []
    stream = stt.stream()

    async def read():
        nonlocal interims
        async for ev in stream:
            t = time.monotonic() - clock0
            events.append([ev.type.value, round(t, 3)])
            if ev.type == agents_stt.SpeechEventType.FINAL_TRANSCRIPT:
                alt = ev.alternatives[0]
                finals.append({"text": alt.text, "t": t, "start_time": alt.start_time, "end_time": alt.end_time,
                               "words": len(alt.words or [])})
            elif ev.type == agents_stt.SpeechEventType.INTERIM_TRANSCRIPT:
                interims += 1

    reader = asyncio.create_task(read())
    samples = int(RATE * args.frame_ms / 1000)
    sent_at = []
    start = time.monotonic()
    for pos in range(0, len(pcm), samples * 2):
        chunk = pcm[pos:pos + samples * 2]
        await asyncio.sleep(max(0.0, start + pos / 2 / RATE / args.speed - time.monotonic()))
        stream.push_frame(rtc.AudioFrame(data=chunk, sample_rate=RATE, num_channels=1,
                                         samples_per_channel=len(chunk) // 2))
        sent_at.append(round(time.monotonic() - clock0, 4))
    stream.end_input()
    await asyncio.wait_for(reader, 60)
    await stream.aclose()
    return {
        "version": importlib.metadata.version("livekit-plugins-nvidia"),
        "agents_version": importlib.metadata.version("livekit-agents"),
        "riva_client_version": importlib.metadata.version("nvidia-riva-client"),
        "models": models, "models_error": models_error, "finals": finals, "interims": interims, "events": events,
        "frame_ms": args.frame_ms, "sent_at": sent_at, "last_audio_sent": sent_at[-1],
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--audio", required=True, help="raw PCM16 mono 16 kHz")
    p.add_argument("--out", required=True)
    p.add_argument("--frame-ms", type=float, default=20)
    p.add_argument("--speed", type=float, default=1.0)
    a = p.parse_args()
    result = asyncio.run(main(a))
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
