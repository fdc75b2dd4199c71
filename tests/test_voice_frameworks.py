"""The voice-agent frameworks users run, unmodified, against a real `asr-server` with the demo
model: Pipecat's `NvidiaSTTService` (pipecat-ai[nvidia] 1.14) and LiveKit Agents' `nvidia.STT`
(livekit-plugins-nvidia 1.8.9), each with its default settings but the server address, TLS off
and (LiveKit) an empty model name, drive a live call: the English examples spoken one after
another with pauses of 1.5 s, fed in real time in 20 ms frames. Each utterance's final arrives
while the stream is open (at least one final per utterance, all before the call's audio ends,
4 s after the last word: the server's default stop_history, which LiveKit's plugin keeps, is
800 ms), and the finals hold the words spoken.

Each framework pins its own protobuf/grpcio, so each lives in its own virtual environment,
built once under .cache/ (tests/client_venvs.py; NEMOSTREAM_PIPECAT_VENV and
NEMOSTREAM_LIVEKIT_VENV override the places); the tests skip, saying why, where PyPI cannot be
reached. A driver script per framework (tests/pipecat_driver.py, tests/livekit_driver.py) runs
in its environment as a subprocess and writes what it received as JSON.

Words: the finals of a call, joined, against the examples' texts. The server resets the demo
model's state at each utterance (it was trained on single utterances), and with Pipecat's
stop_history of 320 ms it also ends an utterance at a longer gap between words, where the
word after the cut is decoded without the words before it ("we could eleven | imports" for
"... airports"). Which words suffer depends on where the utterances fall on the server's chunk
grid: the same call with 100 or 300 ms more silence in its first pause gave 4-5 wrong words
of 23 instead of 1. Bound: 25% word error rate (6 of 23 words, 7 of 31): the demo model's own
English bound on single utterances (10%) plus one word per extra cut. Measured with these
calls: LiveKit 0% (no extra cut), Pipecat 9.7% (3 wrong words of 31: one at a cut, two on the
stream after the reconnect).

Pipecat's keepalive and reconnect, with the server's idle timeout lowered to 4 s: after the
last utterance's final the input goes quiet for 6 s twice. The first time the service's own
silence keepalive runs (its idle time before a keepalive lowered from 30 s to 1.5 s, so the test
need not wait) and the stream stays open; the second time, with the service's 30 s, the server
ends the idle stream and the service reconnects by itself; the first example, spoken again
after that, gets its final on the new stream. (The quiet times come after the measured
utterances because the keepalive's 100 ms messages move the rest of the call on the chunk grid.)
The engine steps on one torch thread (OMP_NUM_THREADS=1): on two busy cores, torch's default
threads contend with the drivers and a step of this small model took seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from bench.soak import scrape
from tests.client_venvs import ROOT, build_venv, venv_place

sys.path.insert(0, str(ROOT / "train"))
from wer import wer  # noqa: E402

EXAMPLES = ROOT / "examples"
WEIGHTS = ROOT / "engines" / "assets" / "demo" / "weights.pt"
RATE = 16000
LEAD_S, PAUSE_S, TAIL_S = 0.5, 1.5, 4.0
FRAME_MS = 20
WER_BOUND = 0.25
IDLE_TIMEOUT_S = 4.0                 # the server's, for the Pipecat test's quiet times
QUIET_S = 6.0                        # each quiet time, longer than that
AFTER_LAST_S, KEEPALIVE_AT_S, RECONNECT_AT_S = 4.0, 2.0, 3.0  # the quiet times after the last utterance
KEEPALIVE_S = 1.5                    # Pipecat's idle time before a keepalive, in the first one

PIPECAT = (venv_place("NEMOSTREAM_PIPECAT_VENV", "pipecat-venv"), ["pipecat-ai[nvidia]==1.14.*"],
           "import importlib.metadata as m, pipecat.services.nvidia.stt; print('pipecat-ai', m.version('pipecat-ai'))")
LIVEKIT = (venv_place("NEMOSTREAM_LIVEKIT_VENV", "livekit-venv"),
           ["livekit-agents==1.8.9", "livekit-plugins-nvidia==1.8.9"],
           "import importlib.metadata as m, livekit.plugins.nvidia; "
           "print('livekit-plugins-nvidia', m.version('livekit-plugins-nvidia'))")

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"demo model weights missing: {WEIGHTS}")


def _framework_python(spec) -> Path:
    venv, requirements, probe = spec
    python, why = build_venv(venv, requirements, probe)
    if python is None:
        pytest.skip(f"cannot install {' '.join(requirements)} into {venv} (PyPI needed once): {why}")
    return python


@pytest.fixture(scope="session")
def pipecat_python() -> Path:
    return _framework_python(PIPECAT)


@pytest.fixture(scope="session")
def livekit_python() -> Path:
    return _framework_python(LIVEKIT)


# -- the call -------------------------------------------------------------------------------------
def english_examples() -> list[dict]:
    rows = [json.loads(line) for line in (EXAMPLES / "manifest.json").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r["lang"] == "en"]


class Call:
    """Utterances one after another: LEAD_S of silence, then each utterance followed by its
    pause (digital silence, as a muted or noise-suppressed input sends)."""

    def __init__(self, rows: list[dict], pauses: list[float]):
        parts, self.spans, pos = [np.zeros(int(LEAD_S * RATE), np.int16)], [], int(LEAD_S * RATE)
        for row, pause in zip(rows, pauses, strict=True):
            with wave.open(str(EXAMPLES / row["audio_filepath"])) as w:
                assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
                pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
            self.spans.append((pos / RATE, (pos + pcm.size) / RATE))
            parts += [pcm, np.zeros(int(pause * RATE), np.int16)]
            pos += pcm.size + int(pause * RATE)
        self.texts = [r["text"] for r in rows]
        self.pcm = np.concatenate(parts)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pcm.astype("<i2").tobytes())
        return path


def _sent_at(got: dict, audio_s: float) -> float:
    """When the driver sent the frame holding this point of the call's audio."""
    frame = min(int(audio_s * 1000 / got["frame_ms"]), len(got["sent_at"]) - 1)
    return got["sent_at"][frame]


def check_call(got: dict, call: Call, name: str) -> None:
    """At least one final per utterance, every one before the call's audio ended (the stream
    still open: the server ends an utterance on its endpointing, not at the end of the audio),
    their words within the bound, interim results between them."""
    finals = got["finals"]
    hyp = " ".join(f["text"] for f in finals)
    error = wer([" ".join(call.texts)], [hyp]) if finals else 1.0
    ends = [_sent_at(got, end) for _, end in call.spans]
    report = [f"{name}: {len(finals)} finals, {got['interims']} interims, WER {error:.1%}; audio ended at "
              f"{got['last_audio_sent']:.2f} s"]
    for f in finals:  # arrival, and the time since the last utterance whose audio had ended
        done = [i for i, e in enumerate(ends) if e < f["t"]]
        since = f"{1000 * (f['t'] - ends[done[-1]]):.0f} ms after utterance {done[-1]}'s audio ended" if done else ""
        report.append(f"  {f['t']:6.2f} s {f['text']!r} {since}")
    report.append(f"  reference: {' | '.join(call.texts)}")
    print("\n".join(report))
    assert len(finals) >= len(call.spans), "\n".join(report)
    assert all(f["t"] < got["last_audio_sent"] for f in finals), "\n".join(report)
    assert got["interims"] > 0, name
    assert error <= WER_BOUND, "\n".join(report)


# -- the server -----------------------------------------------------------------------------------
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+).*metrics on http://127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """A real asr-server process with the demo model on the CPU: (gRPC port, metrics port)."""
    log_path = tmp_path_factory.mktemp("asr-server") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.service.cli", "--model", "builtin:demo", "--device", "cpu",
             "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
             "--idle-timeout-s", f"{IDLE_TIMEOUT_S:g}"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 300
        while not (match := READY.search(log_path.read_text(errors="replace"))):
            assert proc.poll() is None, f"server exited: {log_path.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"server not listening: {log_path.read_text(errors='replace')[-3000:]}"
            time.sleep(0.2)
        yield int(match.group(1)), int(match.group(2)), log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]


def run_driver(python: Path, driver: str, port: int, audio: Path, out: Path, *args: str, timeout: float = 120) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(python), str(ROOT / "tests" / driver), "--server", f"127.0.0.1:{port}",
                           "--audio", str(audio), "--out", str(out), "--frame-ms", str(FRAME_MS), *args],
                          cwd=out.parent, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def wait_idle(metrics_port: int) -> dict:
    """The server's streams and cache slots back to zero (a close reaches the engine a moment
    after the client is gone)."""
    deadline = time.monotonic() + 30
    while True:
        m = scrape(metrics_port)
        if m["asr_active_streams"] == 0 and m["asr_slots_in_use"] == 0:
            return m
        assert time.monotonic() < deadline, f"streams {m['asr_active_streams']}, slots {m['asr_slots_in_use']} left"
        time.sleep(0.05)


# -- the tests ------------------------------------------------------------------------------------
def test_livekit_nvidia_stt_call(livekit_python, demo_server, tmp_path):
    port, metrics_port, _ = demo_server
    rows = english_examples()
    call = Call(rows, [PAUSE_S] * (len(rows) - 1) + [TAIL_S])
    got = run_driver(livekit_python, "livekit_driver.py", port, call.write(tmp_path / "call.raw"),
                     tmp_path / "livekit.json")
    print(f"livekit-agents {got['agents_version']}, livekit-plugins-nvidia {got['version']}, "
          f"nvidia-riva-client {got['riva_client_version']}")
    check_call(got, call, "LiveKit nvidia.STT")
    # FINAL_TRANSCRIPTs carry the words' times, from the stream's start, inside the utterance.
    for f in got["finals"]:
        assert f["words"] == len(f["text"].split()) and 0 < f["start_time"] < f["end_time"] < len(call.pcm) / RATE
    # The plugin's GetRivaSpeechRecognitionConfig helper sees the served model as online.
    assert [m for models in got["models"].values() for entry in models for m in entry["model"]] == ["builtin:demo"]
    if got["models_error"]:
        print(f"STT.log_asr_models as shipped: {got['models_error']} (a name nvidia-riva-client lacks)")
    m = wait_idle(metrics_port)
    assert m["asr_rpcs_total{code=OK,method=Riva/GetRivaSpeechRecognitionConfig}"] >= 1


def test_pipecat_nvidia_stt_call_with_keepalive_and_reconnect(pipecat_python, demo_server, tmp_path):
    port, metrics_port, _ = demo_server
    rows = english_examples()
    # The English examples, then (after the quiet times) the first one again on the new stream.
    call = Call(rows + rows[:1], [PAUSE_S] * (len(rows) - 1) + [AFTER_LAST_S, TAIL_S])
    last_end = call.spans[len(rows) - 1][1]
    keepalive_at, reconnect_at = last_end + KEEPALIVE_AT_S, last_end + RECONNECT_AT_S
    before = scrape(metrics_port)
    got = run_driver(pipecat_python, "pipecat_driver.py", port, call.write(tmp_path / "call.raw"),
                     tmp_path / "pipecat.json", "--quiet", f"{keepalive_at:.3f}:{QUIET_S:g}:{KEEPALIVE_S:g}",
                     "--quiet", f"{reconnect_at:.3f}:{QUIET_S:g}:0")
    print(f"pipecat-ai {got['version']}, nvidia-riva-client {got['riva_client_version']}; "
          f"keepalives at {[round(t, 2) for t in got['keepalives']]} s; drops {got['stream_drops']}")
    assert not got["errors"], got["errors"]
    check_call(got, call, "Pipecat NvidiaSTTService")

    # The first quiet time: the service's keepalives kept the stream open past the server's
    # idle timeout (the one drop is in the second).
    (q1, q1_end), (q2, q2_end) = got["quiet_times"]
    assert q1_end - q1 >= QUIET_S and q2_end - q2 >= QUIET_S
    assert any(q1 < t < q1_end for t in got["keepalives"]), got["keepalives"]
    # The second: the server ended the idle stream, the service reconnected once by itself, and
    # the utterance after it was transcribed on the new stream.
    assert len(got["stream_drops"]) == 1 and "DEADLINE_EXCEEDED" in got["stream_drops"][0], got["stream_drops"]
    assert got["reconnects"] == 1
    assert [f for f in got["finals"] if f["t"] > q2_end], "no final on the stream after the reconnect"
    m = wait_idle(metrics_port)
    ended = {code: m.get(f"asr_rpcs_total{{code={code},method=Riva/StreamingRecognize}}", 0)
             - before.get(f"asr_rpcs_total{{code={code},method=Riva/StreamingRecognize}}", 0)
             for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")}
    assert ended["DEADLINE_EXCEEDED"] == 1 and ended["OK"] + ended["CANCELLED"] == 1, ended
