"""The unmodified `nvidia-riva-client` package against this server: its ASRService streams a WAV
file through AudioChunkFileIterator (paced in real time and not, with interim results), runs
offline_recognize, lists models as the `--list-models` scripts do, and gets a clear refusal for
speaker diarization. Its transcripts equal the native API's for the same audio, and every
audio message it sends gets its response.

The client pins its own protobuf/grpcio, so it lives in its own virtual environment, built once
under .cache/riva-venv (git-ignored; NEMOSTREAM_RIVA_VENV overrides the place) from PyPI
(tests/client_venvs.py); the tests skip, saying why, where that cannot be installed. The driver
script (tests/riva_client_driver.py) runs in that environment as a subprocess against a real
server on loopback, here with the real builtin:tiny engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.client_venvs import build_venv, venv_place
from tests.server_harness import RATE, pcm16_audio, requests_for, run_stream, running_server, stub_for, wav_bytes

DRIVER = Path(__file__).resolve().parent / "riva_client_driver.py"
VENV = venv_place("NEMOSTREAM_RIVA_VENV", "riva-venv")
PACKAGE = os.environ.get("NEMOSTREAM_RIVA_CLIENT", "nvidia-riva-client")


@pytest.fixture(scope="session")  # session: resolved before the session's tiny_engine, so a skip builds no model
def riva_python() -> Path:
    python, why = build_venv(VENV, [PACKAGE], "import riva.client; print(riva.client.__version__)")
    if python is None:
        pytest.skip(f"cannot install {PACKAGE} into {VENV} (PyPI needed once): {why}")
    return python


async def _run_driver(python: Path, out: Path, *args: str, timeout: float = 240) -> dict:
    proc = await asyncio.create_subprocess_exec(
        str(python), str(DRIVER), "--out", str(out), *args, cwd=str(out.parent),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")})
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    return json.loads(out.read_text())


def test_wire_format_matches_the_riva_client(riva_python, tmp_path):
    """Every field we declare has Riva's number, type, label and type name, the service has
    the same methods, and we declare every field Riva's clients can send."""
    from proto.riva import riva_asr_pb2, riva_audio_pb2, riva_common_pb2
    from tests.proto_shape import describe

    done = subprocess.run([str(riva_python), str(DRIVER), "--dump-descriptors", "--out", str(tmp_path / "d.json")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    theirs = json.loads((tmp_path / "d.json").read_text())
    ours = describe((riva_audio_pb2, riva_common_pb2, riva_asr_pb2))
    for name, fields in ours.items():
        assert name in theirs, f"{name} is not in Riva's protos"
        for field, spec in fields.items():
            assert theirs[name].get(field) == spec, f"{name}.{field}: ours {spec}, Riva's {theirs[name].get(field)}"
    sent_by_clients = ("nvidia.riva.asr.RecognitionConfig", "nvidia.riva.asr.StreamingRecognizeRequest",
                       "nvidia.riva.asr.RecognizeRequest", "nvidia.riva.asr.StreamingRecognitionConfig",
                       "nvidia.riva.asr.EndpointingConfig", "nvidia.riva.asr.SpeakerDiarizationConfig",
                       "nvidia.riva.asr.SpeechContext", "nvidia.riva.AudioEncoding",
                       "nvidia.riva.asr.RivaSpeechRecognition")
    for name in sent_by_clients:
        assert set(theirs[name]) == set(ours[name]), f"{name}: Riva's has {set(theirs[name]) - set(ours[name])} more"


@pytest.mark.asyncio
async def test_riva_client_scripts_against_the_real_tiny_engine(riva_python, tiny_engine, tmp_path):
    clip = pcm16_audio(7, int(1.3 * RATE) + 123)
    wav = tmp_path / "speech.wav"
    wav.write_bytes(wav_bytes(clip))
    async with running_server(tiny_engine) as server, stub_for(server) as native:
        # The native reference runs beside the Riva clients, so they share the engine's batches.
        driver = asyncio.create_task(_run_driver(riva_python, tmp_path / "riva.json", "--server",
                                                 f"127.0.0.1:{server.port}", "--input-file", str(wav)))
        reference = await run_stream(native, requests_for(wav.read_bytes(), seed=3, sample_rate=0))
        got = await driver
        assert server.scheduler.active_streams == 0
    final = reference[-1].results[0]
    assert final.is_final
    native_words = [[w.word, round(w.start_seconds * 1000), round(w.end_seconds * 1000)] for w in final.words]
    assert final.transcript and native_words  # random weights, but text all the same
    print(f"nvidia-riva-client {got['riva_client_version'].strip()}; transcript {final.transcript!r}")

    for name in ("paced", "fast", "fast_odd_chunks"):
        run = got[name]
        assert "error" not in run, f"{name}: {run.get('error')}"
        responses = run["responses"]
        # One response per audio message, in order, the final on the last one.
        assert len(responses) == run["messages"] > 5, name
        assert all(len(rs) <= 1 for rs in responses), name
        finals = [rs[0] for rs in responses if rs and rs[0]["is_final"]]
        assert len(finals) == 1 and responses[-1] and responses[-1][0]["is_final"], name
        assert finals[0]["transcript"] == final.transcript, name
        assert finals[0]["audio_processed"] == pytest.approx(clip.size / RATE, abs=1e-3), name
        if name == "fast_odd_chunks":  # interim_results off: empty responses until the final
            assert all(rs == [] for rs in responses[:-1]), name
        else:
            assert all(len(rs) == 1 for rs in responses), name
            interims = [rs[0] for rs in responses[:-1]]
            assert all(final.transcript.startswith(r["transcript"]) for r in interims), name
            assert all(not r["is_final"] and r["stability"] == 1.0 for r in interims), name
        print(f"{name}: {run['messages']} messages, latency ms per message {run['latencies_ms']}")
    assert got["paced"]["responses"][-1][0]["words"] == native_words
    assert got["fast"]["responses"][-1][0]["words"] == []  # not asked for
    assert got["paced"]["printed"].count("Transcript 0:") == 1  # the scripts' printer took the final

    offline = got["offline"]
    assert "error" not in offline, offline.get("error")
    (result,) = offline["results"]
    assert result["transcript"] == final.transcript and result["words"] == native_words
    assert f"Final transcript: {final.transcript}" in offline["printed"]

    name = tiny_engine.model_info.name
    assert got["models"] == {"online": {"en,hi": [{"model": [name]}]}, "offline": {"en,hi": [{"model": [name]}]}}
    assert got["health"] == {"(server)": "SERVING", "nvidia.riva.asr.RivaSpeechRecognition": "SERVING"}
    assert got["refused"]["code"] == "INVALID_ARGUMENT" and "diarization" in got["refused"]["details"]
